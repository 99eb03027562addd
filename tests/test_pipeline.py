"""End to end: the smoke experiment through the real CLI, its artifacts, and reload without this project."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK_PROJECT_IMPORTS, RELOAD_CHECK, ROOT, python_env

REQUIRED = ("exact_match", "tool_accuracy", "arg_f1", "valid_json", "perplexity", "num_params")


def _run(args, env, cwd=ROOT, launcher=None):
    cmd = (launcher or [sys.executable]) + ["-m", "distill", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    proc.log = proc.stdout + proc.stderr  # Hydra logs to stdout, tqdm to stderr
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("smoke")
    env = {**python_env(), "DISTILL_CACHE": str(base / "cache")}
    run_dir = base / "run"
    proc = _run(["+exp=smoke", f"hydra.run.dir={run_dir}"], env)
    assert proc.returncode == 0, proc.log[-4000:]
    return run_dir, env, proc


def test_smoke_pipeline_writes_a_self_describing_run_folder(smoke_run):
    run_dir, _, proc = smoke_run
    for name in (
        "config.yaml",
        "metrics.json",
        "manifest.json",
        "report.md",
        "loss.png",
        "student/config.json",
        "student/model.safetensors",
        "student/tokenizer.json",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    m = json.loads((run_dir / "metrics.json").read_text())
    for who in ("teacher", "student"):
        for key in REQUIRED:
            assert key in m[who] and key in {**m[who]["heldout"], "num_params": 0}, (who, key)
    assert {"agreement", "kl", "generation_match"} <= set(m["student"])
    assert 0 <= m["student"]["agreement"] <= 1 and m["student"]["kl"] >= 0
    assert m["student"]["num_params"] < m["teacher"]["num_params"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data_hash"] == m["data_hash"] and manifest["versions"]["torch"].startswith("2.13")
    assert "stage distill: done" in proc.log and "tok_s=" in proc.log  # progress with tokens/s
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]  # no temp leftovers
    # quantize -> export -> gate: one object per ONNX variant, measured under ONNX Runtime
    for v in ("fp32", "int8", "int4"):
        assert (run_dir / "onnx" / v / "model.onnx").is_file() and (run_dir / "onnx" / v / "tokenizer.json").is_file()
        o = m[f"onnx_{v}"]
        for key in (*REQUIRED[:-1], "agreement", "kl", "generation_match", "bytes", "ms_per_token", "prefill_ms"):
            assert key in o, (v, key)
        assert o["bytes"] == sum(p.stat().st_size for p in (run_dir / "onnx" / v).glob("model.onnx*"))
        assert json.loads((run_dir / "onnx" / v / "metrics.json").read_text())["exact_match"] == o["exact_match"]
    # fp32 ONNX is the PyTorch student: same answers, same numbers, on both splits
    assert m["onnx_fp32"]["generation_match"] == m["student"]["generation_match"]
    assert m["onnx_fp32"]["exact_match"] == m["student"]["exact_match"]
    for who in ("onnx_fp32", "onnx_int8"):
        held = m[who]["heldout"]
        assert {"exact_match", "kl", "agreement", "tool_accuracy"} <= set(held)
        assert set(held["slices"]["part"]) == {"values", "phrasing", "both"}
        assert sum(r["n"] for r in held["slices"]["part"].values()) == 48
    assert m["onnx_fp32"]["heldout"]["generation_match"] == m["student"]["heldout"]["generation_match"]
    assert m["onnx_fp32"]["heldout"]["slices"] == m["student"]["heldout"]["slices"]
    assert set(m["retention"]["heldout_parts"]) <= {"values", "phrasing", "both"}
    # every miss of the shipped file beside the teacher's answer: as many as its exact match says
    misses = json.loads((run_dir / "eval" / "onnx_int8" / "misses.json").read_text())
    for split, key in (("test", m["onnx_int8"]), ("heldout", m["onnx_int8"]["heldout"])):
        assert len(misses[split]) == round((1 - key["exact_match"]) * 48)
        assert all(
            {"request", "reference", "answer", "teacher", "teacher_right", "lang", "intent"} <= set(x)
            for x in misses[split]
        )
    assert abs(m["onnx_fp32"]["kl"] - m["student"]["kl"]) < 1e-4
    assert m["onnx_int4"]["bytes"] < m["onnx_int8"]["bytes"] < m["onnx_fp32"]["bytes"]
    assert m["onnx_int8"]["quantization"]["per_channel"] is True and m["onnx_int4"]["quantization"]["bits"] == 4
    assert m["gate"]["passed"] is True and {c["variant"] for c in m["gate"]["checks"]} == {"onnx_int8"}
    for who in ("teacher", "student"):
        assert m[who]["bytes"] > 0 and m[who]["ms_per_token"] > 0
    report = (run_dir / "report.md").read_text()
    assert "Release gate: PASSED" in report and "| student int8 | ONNX Runtime |" in report
    assert "## Exact match per slice: heldout split" in report and "| part | values |" in report
    assert "## Misses on the heldout split" in report
    assert (run_dir / "variants.png").is_file() and "release gate PASSED" in proc.log
    assert (run_dir / "slices.png").is_file()


def test_shipped_onnx_runs_without_torch_or_this_project(smoke_run, tmp_path):
    """What the car embeds: the int8 folder and ``export/runtime.py`` copied on its own, with onnxruntime,
    numpy and tokenizers; torch, transformers and this project cannot be imported."""
    import shutil

    run_dir, env, _ = smoke_run
    folder = run_dir / "onnx" / "int8"
    shutil.copy(ROOT / "export" / "runtime.py", tmp_path / "car_runtime.py")
    blocked = '("core", "families", "distill", "prune", "quantize", "export")'
    assert blocked in BLOCK_PROJECT_IMPORTS
    code = BLOCK_PROJECT_IMPORTS.replace(blocked, blocked[:-1] + ', "torch", "transformers")')
    code += textwrap.dedent(f"""
        from car_runtime import ChatTokenizer, OnnxCausalLM
        tok = ChatTokenizer({str(folder)!r})
        lm = OnnxCausalLM({str(folder)!r})
        ids = tok.encode_chat([{{"role": "user", "content": "Set the driver temperature to 22 degrees"}}])
        greedy = lm.generate([ids], 24)
        sampled = lm.generate([ids], 24, do_sample=True, temperature=0.8, top_p=0.9, seed=1)
        assert greedy[0] and sampled[0]
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print("OK", repr(tok.decode(greedy[0])))
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        env={**env, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def _negated_head(b):
    """A deliberately broken "quantizer": the fp32 graph with its LM head weight negated (argmax flips)."""
    import onnx
    from onnx import numpy_helper

    from core.files import building
    from core.onnx_files import ONNX_FILE, copy_runtime_files

    with building(b.dest) as tmp:
        model = onnx.load(str(b.src / ONNX_FILE))
        (head,) = [n for n in model.graph.node if "logits" in n.output]
        (w,) = [i for i in model.graph.initializer if i.name == head.input[1]]
        w.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), w.name))
        onnx.save(model, str(tmp / ONNX_FILE))
        copy_runtime_files(b.src, tmp)
    return b.dest


@pytest.fixture(scope="module")
def task_teacher(tmp_path_factory):
    """A smoke-sized teacher bootstrapped for 1,000 steps (20 s): it really answers (test exact match about
    0.4, tool accuracy 0.75), so the gate's relative checks have something to retain."""
    from distill.config import compose
    from distill.data import data_hash, load_records
    from distill.teacher import bootstrap_teacher
    from distill.train import make_accelerator

    cache = tmp_path_factory.mktemp("task_teacher")
    rc = compose(["+exp=smoke", "teacher.bootstrap.train.steps=1000", f"teacher.cache_dir={cache}"])
    records = {s: load_records(rc.data, s) for s in ("train", "test")}
    return bootstrap_teacher(
        rc.teacher, records, data_hash(rc.data), rc.eval, accelerator=make_accelerator("no"), max_length=128
    )


def _default_gate(**changes) -> list[str]:
    """conf/gate/default.yaml as overrides (the shipped thresholds), with ``changes``."""
    from omegaconf import OmegaConf

    values = {**OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "gate" / "default.yaml")), **changes}
    return [f"gate.{k}={'null' if v is None else v}" for k, v in values.items() if k != "variants"]


def _negated_at_batch_one(b):
    """A planted batch-dependent "quantizer": the fp32 graph whose logits are negated when the batch is 1
    (what the car runs) and exact at any other batch, as a scheme whose numbers depend on the batch would be."""
    import onnx
    from onnx import TensorProto, helper

    from core.files import building
    from core.onnx_files import ONNX_FILE, copy_runtime_files

    with building(b.dest) as tmp:
        model = onnx.load(str(b.src / ONNX_FILE))
        g = model.graph
        (head,) = [n for n in g.node if "logits" in n.output]
        head.output[list(head.output).index("logits")] = "logits_raw"
        g.initializer.extend(
            [
                helper.make_tensor("planted_zero", TensorProto.INT64, [1], [0]),
                helper.make_tensor("planted_one", TensorProto.INT64, [1], [1]),
                helper.make_tensor("planted_minus_two", TensorProto.FLOAT, [1], [-2.0]),
                helper.make_tensor("planted_one_f", TensorProto.FLOAT, [1], [1.0]),
            ]
        )
        g.node.extend(  # logits = logits_raw * (1 - 2 [batch == 1])
            [
                helper.make_node("Shape", ["input_ids"], ["planted_shape"]),
                helper.make_node("Gather", ["planted_shape", "planted_zero"], ["planted_batch"], axis=0),
                helper.make_node("Equal", ["planted_batch", "planted_one"], ["planted_is_one"]),
                helper.make_node("Cast", ["planted_is_one"], ["planted_f"], to=TensorProto.FLOAT),
                helper.make_node("Mul", ["planted_f", "planted_minus_two"], ["planted_m"]),
                helper.make_node("Add", ["planted_m", "planted_one_f"], ["planted_scale"]),
                helper.make_node("Mul", ["logits_raw", "planted_scale"], ["logits"]),
            ]
        )
        onnx.save(model, str(tmp / ONNX_FILE))
        copy_runtime_files(b.src, tmp)
    return b.dest


def _student_is_teacher(teacher, tmp_path, monkeypatch, gate: list[str], broken=_negated_head, more=()) -> dict:
    """The smoke pipeline with the teacher as its own student (one step at lr 1e-12), fp32 and a planted
    broken "int8" (``broken``: by default the LM head negated) both gated."""
    import quantize
    from distill.config import compose
    from distill.pipeline import run

    monkeypatch.setitem(
        quantize.SCHEMES, "int8", quantize.Scheme(quantize.Int8Settings, broken, lambda s: False, "broken")
    )
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    rc = compose(
        [
            "+exp=smoke",
            f"teacher.path={teacher}",
            "student=folder",
            f"student.path={teacher}",
            "distill.train.steps=1",
            "distill.train.lr=1e-12",  # the student stays the teacher
            "distill.train.eval_every=1",
            "distill.train.eval_generate=16",  # the retention probe: must read 1.0 for the teacher itself
            "distill.features.weight=0",
            "eval.num_test=24",
            "export.openvino=false",
            "quantize.variants=[int8]",
            "gate.variants=[fp32,int8]",
            *gate,
            *more,
        ]
    )
    return run(rc, tmp_path / "run")


def test_gate_passes_a_faithful_artifact_and_fails_a_broken_one_under_default_thresholds(
    task_teacher, tmp_path, monkeypatch
):
    """The shipped thresholds of conf/gate/default.yaml on two artifacts of one run: fp32 ONNX of a student
    equal to its teacher passes every check whose teacher has something to retain (the rest fail saying so);
    an "int8" whose LM head is negated fails. ``min_valid_json`` is
    off: it is absolute, and this 1,000-step teacher writes valid JSON 94% of the time, not 99%."""
    m = _student_is_teacher(task_teacher, tmp_path, monkeypatch, _default_gate(min_valid_json=None))
    checks = m["gate"]["checks"]
    parts = {f"heldout[{p}]/exact_match" for p in ("values", "phrasing", "both")}
    heldout = {"heldout/exact_match", "heldout/tool_accuracy"} | parts
    assert {c["metric"] for c in checks} == {"exact_match", "tool_accuracy", "agreement", "kl"} | heldout
    assert m["teacher"]["exact_match"] >= 0.05  # above gate.min_teacher_score: there is something to retain
    # this smoke teacher never learned to copy a value it did not see (heldout exact match about 0.04): those
    # relative checks fail saying so; every other check of the faithful file passes
    fp32 = [c for c in checks if c["variant"] == "onnx_fp32"]
    nothing = {c["metric"] for c in fp32 if not c["passed"]}
    assert nothing and nothing <= heldout and "heldout[values]/exact_match" in nothing, fp32
    assert all("nothing to retain" in c["note"] for c in fp32 if not c["passed"])
    assert {c["metric"] for c in fp32 if c["passed"]} >= {"exact_match", "tool_accuracy", "agreement", "kl"}
    assert "heldout[phrasing]/exact_match" not in nothing  # new phrasings of seen values: it answers them
    failed = {c["metric"] for c in checks if c["variant"] == "onnx_int8" and not c["passed"]}
    assert {"exact_match", "agreement", "kl"} <= failed, checks
    assert m["gate"]["passed"] is False
    # the retention probe during distillation: the student is the teacher, so it retains exactly 1.0
    info = json.loads((tmp_path / "run" / "student" / "distill_info.json").read_text())
    probe = info["history"][-1]["val_exact_match"]
    assert info["teacher_val_exact_match"] > 0 and probe == info["teacher_val_exact_match"]
    assert (tmp_path / "run" / "retention.png").is_file()
    assert m["onnx_fp32"]["agreement"] > 0.999 and m["onnx_int8"]["agreement"] < 0.5


def test_variants_are_scored_at_the_batch_that_ships(task_teacher, tmp_path, monkeypatch):
    """A planted "int8" that is exact at any batch but batch 1 (its logits negated there): its batch-invariance
    check fails, so it is scored at the deployment batch (``export.deploy_batch``, default 1) and fails the
    gate, while fp32 is shown batch-invariant and scored at eval.batch_size. Deployed at batch 4, the same
    files look faithful: what scoring at a convenient evaluation batch would have shipped."""
    # the heldout exact-match checks off: this smoke teacher copies no unseen value (see the test above)
    gate = _default_gate(min_valid_json=None, min_heldout_exact_match_retention=None, min_heldout_part_retention=None)
    m = _student_is_teacher(task_teacher, tmp_path, monkeypatch, gate, broken=_negated_at_batch_one)
    check = m["onnx_int8"]["batch_invariance"]  # no quantize op mixes rows, but the answers differ
    assert check["ops_mixing_rows"] == [] and check["identical_answers"] < 0.5 and not check["invariant"]
    assert m["onnx_int8"]["batch"] == m["onnx_int8"]["deploy_batch"] == 1
    assert m["onnx_fp32"]["batch_invariance"]["invariant"] and m["onnx_fp32"]["batch"] == 64  # eval.batch_size
    assert m["onnx_int8"]["agreement"] < 0.5 and m["onnx_fp32"]["agreement"] > 0.999
    failed = {c["metric"] for c in m["gate"]["checks"] if c["variant"] == "onnx_int8" and not c["passed"]}
    assert {"exact_match", "agreement", "kl"} <= failed and m["gate"]["passed"] is False
    m4 = _student_is_teacher(
        task_teacher, tmp_path, monkeypatch, gate, broken=_negated_at_batch_one, more=["export.deploy_batch=4"]
    )
    assert m4["onnx_int8"]["deploy_batch"] == 4 and m4["onnx_int8"]["batch_invariance"]["invariant"]
    assert m4["onnx_int8"]["agreement"] > 0.999
    assert m4["onnx_int8"]["exact_match"] == m4["onnx_fp32"]["exact_match"] and m4["gate"]["passed"] is True


def test_gate_fails_a_teacher_with_nothing_to_retain(teacher_dir, tmp_path, monkeypatch):
    """A random teacher scores 0 exact match: the student equal to it would "keep 100%" of nothing. Under the
    default thresholds every relative check fails, saying why."""
    m = _student_is_teacher(teacher_dir, tmp_path, monkeypatch, _default_gate(min_valid_json=None))
    assert m["teacher"]["exact_match"] < 0.05 and m["gate"]["passed"] is False
    rel = [c for c in m["gate"]["checks"] if c["variant"] == "onnx_fp32" and c["relative"]]
    assert rel and all(not c["passed"] and "nothing to retain" in c["note"] for c in rel)
    assert "the teacher scores 0.0000 on exact_match" in m["gate"]["summary"]


def test_failed_gate_fails_the_command(smoke_run, tmp_path):
    """A threshold no artifact can meet: exit code 3, the missed number in the log, report and metrics.json."""
    _, env, _ = smoke_run
    run_dir = tmp_path / "strict"
    proc = _run(
        [
            "+exp=smoke",
            f"hydra.run.dir={run_dir}",
            "distill.train.steps=2",
            "eval.num_test=8",
            "gate.max_kl=0.0",
            "quantize.variants=[int8]",
        ],
        env,
    )
    assert proc.returncode == 3, proc.log[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["gate"]["passed"] is False
    (kl,) = [c for c in m["gate"]["checks"] if c["metric"] == "kl"]
    assert not kl["passed"] and kl["threshold"] == 0.0 and kl["margin"] < 0
    assert "the release gate failed: onnx_int8: kl = " in proc.log and "FAILED, over by" in proc.log
    assert "Release gate: FAILED" in (run_dir / "report.md").read_text()
    assert (run_dir / "onnx" / "int8" / "model.onnx").is_file()  # the evidence stays for inspection


def test_quantization_aware_distillation_ships_the_trained_grid(smoke_run, tmp_path):
    """``int4_qad``: the distilled student trains on ONNX Runtime's int4 grid against the teacher (stage
    ``qad:int4_qad``), is baked onto it (a plain HF folder), exported and quantized; the shipped file stores
    exactly the trained weights (its MatMulNBits dequantize to the baked folder's tensors) and computes
    what the fake-quantized model computes (``vs_fake_quant``), and the gate judges it."""
    import shutil

    import numpy as np
    import torch
    from conftest import as_exported, matmulnbits_weights
    from transformers import AutoModelForCausalLM

    from quantize import fake

    run_src, env, _ = smoke_run
    run_dir = tmp_path / "qad_run"
    shutil.copytree(run_src, run_dir)  # the finished smoke run: only the QAD stages (and evaluation) run
    proc = _run(
        [
            "+exp=smoke",
            f"hydra.run.dir={run_dir}",
            "quantize.variants=[int8,int4,int4_qad,int4_mixed]",
            "gate.variants=[int4_qad]",
            "quantize.int4_qad.steps=8",
            "quantize.int4_qad.block_size=16",
            "quantize.int4_mixed.block_size=16",
            "quantize.int4_mixed.budget=0.3",
            "quantize.int4_mixed.examples=4",
        ],
        env,
    )
    assert proc.returncode == 0, proc.log[-3000:]
    assert "stage distill: skipped" in proc.log and "stage qad:int4_qad: done" in proc.log
    folder = run_dir / "qad" / "int4_qad" / "student"
    info = json.loads((folder / "qad_info.json").read_text())
    assert len(info["history"]) == 8 and info["history"][0]["kd"] > 0  # distilled against the teacher
    qad_model = AutoModelForCausalLM.from_pretrained(str(folder))
    student = AutoModelForCausalLM.from_pretrained(str(run_dir / "student"))
    assert fake.on_grid(qad_model, 4, 16) and not fake.on_grid(student, 4, 16)
    shipped = run_dir / "onnx" / "int4_qad"
    baked = as_exported({n: m.weight.detach().numpy() for n, m in fake.quantized_modules(qad_model).items()}, shipped)
    stored = matmulnbits_weights(shipped)
    assert all(any(np.array_equal(w, b) for b in baked) for w in stored)  # (== : 0.0 == -0.0)
    assert len(stored) in (15, 11)  # traced (7 a layer + head), fused (q, k, v packed); the embedding is the head
    moved = max(float((a - b).abs().max()) for a, b in zip(qad_model.parameters(), student.parameters(), strict=True))
    assert moved > 0 and torch.equal(qad_model.lm_head.weight, qad_model.model.embed_tokens.weight)
    q = json.loads((run_dir / "onnx" / "int4_qad" / "quantization.json").read_text())
    assert q["scheme"] == "int4_weight_only_qad" and q["settings"]["qad"]["steps"] == 8
    assert q["vs_fake_quant"]["kl"] < min(1e-3, q["vs_source"]["kl"])  # the file is the trained model, not fp32
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["onnx_int4_qad"]["vs_fake_quant"] == q["vs_fake_quant"]
    assert {c["variant"] for c in m["gate"]["checks"]} == {"onnx_int4_qad"}
    # int4_mixed, in the same run: the student's per-weight sensitivity, a plan within 30% of the 8-bit bytes,
    # the file holding exactly the plan's nodes at 8 bits
    import onnx
    from onnx import helper

    mp = json.loads((run_dir / "onnx" / "int4_mixed" / "quantization.json").read_text())["settings"]["mixed_precision"]
    assert mp["budget_fraction"] == 0.3 and mp["sensitivity_sequences"] == 4 and len(mp["sensitivity"]) == 15
    assert mp["nodes"] and mp["bytes"] <= mp["budget_bytes"]
    graph = onnx.load(str(run_dir / "onnx" / "int4_mixed" / "model.onnx"), load_external_data=False).graph
    eight = {
        n.name.rsplit("_Q", 1)[0]
        for n in graph.node
        if n.op_type == "MatMulNBits"
        and helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits")) == 8
    }
    assert eight == set(mp["nodes"]), (eight, mp["nodes"])
    assert m["onnx_int4_mixed"]["bytes"] > m["onnx_int4"]["bytes"]

    # quantize.int4_qad.target=student: the same grid distilled from the fp32 student's logits alone; only QAD
    # (and what reads it) runs again. The student is what the grid was rounded from, so its KL starts at the
    # rounding error, below the teacher's at step 1, and the file ends nearer the fp32 student than the
    # teacher-trained one (vs_source: the same 4 sequences, every position)
    proc = _run(
        [
            "+exp=smoke",
            f"hydra.run.dir={run_dir}",
            "quantize.variants=[int4_qad]",
            "gate.variants=[int4_qad]",
            "quantize.int4_qad.steps=8",
            "quantize.int4_qad.block_size=16",
            "quantize.int4_qad.target=student",
        ],
        env,
    )
    assert proc.returncode == 0, proc.log[-3000:]
    assert "stage distill: skipped" in proc.log and "stage qad:int4_qad: start (changed: config.target" in proc.log
    own = json.loads((folder / "qad_info.json").read_text())["history"]
    assert all(abs(h["loss"] - h["kd"]) < 1e-6 for h in own)  # logits alone: no label term
    assert own[0]["kd"] < info["history"][0]["kd"]
    q_own = json.loads((shipped / "quantization.json").read_text())
    assert q_own["vs_source"]["kl"] < q["vs_source"]["kl"], (q_own["vs_source"], q["vs_source"])


def test_student_reloads_without_this_project(smoke_run):
    run_dir, env, _ = smoke_run
    code = (
        BLOCK_PROJECT_IMPORTS
        + RELOAD_CHECK
        + textwrap.dedent(f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(run_dir / "student")!r})
        ids = tok.apply_chat_template([{{"role": "user", "content": "Call Alice Smith"}}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"]
        model = reload_check({str(run_dir / "student")!r}, ids)
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        assert out.shape[1] > len(ids)
        assert "distill" not in sys.modules
        print("OK", type(model).__name__)
    """)
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        env={**env, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK Qwen2ForCausalLM" in proc.stdout, proc.log[-3000:]


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder``: (sha256 of its bytes, mtime in ns)."""
    import hashlib

    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_second_run_reuses_the_cached_teacher(smoke_run, tmp_path):
    """A second run with the same teacher settings reads the cached teacher: the same folder, every file
    byte-identical and not rewritten (same mtimes), no new cache entry, and its manifest records the reuse."""
    run_dir, env, _ = smoke_run
    first = json.loads((run_dir / "metrics.json").read_text())
    folder = Path(first["teacher_dir"])
    cache = Path(env["DISTILL_CACHE"]) / "teachers"
    before, entries = _files(folder), sorted(p.name for p in cache.iterdir())
    proc = _run(
        [
            "+exp=smoke",
            f"hydra.run.dir={tmp_path / 'again'}",
            "distill.train.steps=2",
            "eval.num_test=4",
            "export.enabled=false",
        ],
        env,
    )
    assert proc.returncode == 0, proc.log[-3000:]
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert Path(again["teacher_dir"]) == folder and again["teacher_hash"] == first["teacher_hash"]
    assert again["stages"]["teacher"]["status"] == "skipped"
    assert _files(folder) == before and sorted(p.name for p in cache.iterdir()) == entries


def test_bad_config_fails_fast_with_every_problem(tmp_path):
    env = {**python_env(), "DISTILL_CACHE": str(tmp_path / "cache")}
    proc = _run(
        [
            "+exp=smoke",
            f"hydra.run.dir={tmp_path / 'bad'}",
            "distill.train.lr=0",
            f"teacher.path={tmp_path / 'missing'}",
        ],
        env,
    )
    assert proc.returncode == 2
    assert "distill.train.lr: must be > 0" in proc.log and "teacher.path" in proc.log
    assert not (tmp_path / "bad" / "student").exists() and not (tmp_path / "cache").exists()


TWO_PROCESS_RUN = ["+exp=smoke", "eval.num_test=8"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The run ``test_pipeline_under_two_processes`` is compared with: one process, twice the per-process
    batch (teacher bootstrap and distillation), so every optimizer step sees the same global batch."""
    base = tmp_path_factory.mktemp("one_process")
    env = {**python_env(), "DISTILL_CACHE": str(base / "cache")}
    proc = _run(
        [
            *TWO_PROCESS_RUN,
            f"hydra.run.dir={base / 'run'}",
            "distill.train.batch_size=32",
            "teacher.bootstrap.train.batch_size=32",
            "export.enabled=false",
        ],
        env,
    )
    assert proc.returncode == 0, proc.log[-4000:]
    return base / "run"


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_pipeline_under_two_processes(sharding, one_process, tmp_path):
    """The whole pipeline under 2 processes, data parallel or FSDP2-sharded (teacher bootstrap and
    distillation, with validation and sharded checkpoints): only rank 0 writes, and the sharded run's
    models (gathered, rebuilt) are then evaluated, exported and gated like any other. Compared with one
    process at twice the batch (the same global batches): the same distillation loss at every step, the
    same student weights (float round-off apart) and the same size."""
    env = {**python_env(), "DISTILL_CACHE": str(tmp_path / "cache")}
    run_dir = tmp_path / sharding
    # data parallel: quantization-aware distillation too (every process trains; rank 0 bakes and exports)
    qad = ["quantize.variants=[int8,int4_qad]", "quantize.int4_qad.steps=4"] if sharding == "none" else []
    proc = _run(
        [
            *TWO_PROCESS_RUN,
            f"hydra.run.dir={run_dir}",
            f"distill.train.sharding={sharding}",
            f"teacher.bootstrap.train.sharding={sharding}",  # the teacher's own training (CE) sharded too
            *qad,
        ],
        env,
        launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    )
    assert proc.returncode == 0, proc.log[-4000:]
    assert json.loads((run_dir / "manifest.json").read_text())["processes"] == 2
    assert "rank 0 wrote" in proc.log and "rank 1 wrote" not in proc.log
    m, ref = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, one_process))
    assert m["student"]["num_params"] == ref["student"]["num_params"] and (run_dir / "onnx" / "int8").is_dir()
    two, one = (
        json.loads((d / "student" / "distill_info.json").read_text())["history"] for d in (run_dir, one_process)
    )
    assert [r["step"] for r in two] == [r["step"] for r in one] and len(two) == 40
    for a, b in zip(two, one, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        assert a["tokens"] == b["tokens"]  # every example of the global batch seen once, by one process
    from safetensors.numpy import load_file

    w2, w1 = (load_file(str(d / "student" / "model.safetensors")) for d in (run_dir, one_process))
    assert w2.keys() == w1.keys()
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], rtol=0, atol=1e-4, err_msg=k)
    if qad:
        info = json.loads((run_dir / "qad" / "int4_qad" / "student" / "qad_info.json").read_text())
        assert len(info["history"]) == 4 and "onnx_int4_qad" in m


def test_pruned_student_pipeline(smoke_run, tmp_path):
    """teacher -> prune (budget) -> recovery distillation with feature losses against the teacher channels
    the student kept (``distill.features.projection=channels``); the pruned model is kept as DIR/pruned."""
    _, env, _ = smoke_run
    run_dir = tmp_path / "pruned_run"
    args = ["+exp=smoke", f"hydra.run.dir={run_dir}", "student=pruned", "student.prune.fraction=0.5"]
    args += ["distill.features.layer_map=[[0,0],[1,1]]", "distill.features.projection=channels", "eval.num_test=8"]
    proc = _run([*args, "export.enabled=false"], env)
    assert proc.returncode == 0, proc.log[-3000:]
    report = json.loads((run_dir / "pruned" / "prune_report.json").read_text())
    # against the teacher's features at the channels pruning kept, the first step's feature loss (2 layers,
    # per token) is 0.17 here; through a fresh learned projection it is 1.9 (measured)
    history = json.loads((run_dir / "student" / "distill_info.json").read_text())["history"]
    assert history[0]["feat"] < 0.5, history[0]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert report["params"] == m["student"]["num_params"] <= 0.5 * m["teacher"]["num_params"]
    assert "width" in report["reasons"][0] and "prune plan" in proc.log
    cfg = json.loads((run_dir / "student" / "config.json").read_text())
    assert cfg["hidden_size"] == report["shape"]["hidden_size"] and cfg["head_dim"] == 16
    # int4 QAD keeping the feature terms at the kept channels (quantize.int4_qad.features): the same student,
    # each QAD step with a feature loss; exported afterwards, so the PyTorch evaluation is kept
    qad = ["quantize.variants=[int4_qad]", "gate.variants=[int4_qad]", "quantize.int4_qad.steps=4"]
    qad += ["quantize.int4_qad.block_size=16", "quantize.int4_qad.features=true"]
    proc = _run([*args, *qad], env)
    assert proc.returncode in (0, 3), proc.log[-3000:]  # 3: the gate may fail a 4-step grid; it ran
    st = {k: v["status"] for k, v in json.loads((run_dir / "metrics.json").read_text())["stages"].items()}
    assert st["distill"] == st["evaluate"] == "skipped" and st["qad:int4_qad"] == "ran", st
    history = json.loads((run_dir / "qad" / "int4_qad" / "student" / "qad_info.json").read_text())["history"]
    assert len(history) == 4 and all(h["feat"] > 0 for h in history), history


def test_prune_cli_refuses_impossible_targets(smoke_run, tmp_path):
    _, env, _ = smoke_run
    cache = Path(env["DISTILL_CACHE"]) / "teachers"
    teacher = next(cache.iterdir())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prune",
            str(teacher),
            str(tmp_path / "out"),
            "--num-attention-heads",
            "16",
            "--hidden-size",
            "60",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "larger than the teacher's 4" in proc.stderr and "not a multiple of align=8" in proc.stderr
    assert not (tmp_path / "out").exists()


def _family_pipeline(tokenizer, tmp_path, monkeypatch, cfg, overrides: list[str]) -> tuple[dict, dict]:
    """A teacher of ``cfg``'s family pruned to half its parameters, distilled, exported and quantized through
    ``run``; checks what every family must give (the pruned config in the family's own type, the ONNX fp32
    student reproducing the PyTorch one) and returns the metrics and the pruned config."""
    from distill.config import compose
    from distill.pipeline import run
    from families.hf import build_from_config, read_config, save_model_atomically

    teacher = save_model_atomically(build_from_config(cfg, seed=0), tokenizer, tmp_path / cfg.model_type)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    base = ["+exp=smoke", f"teacher.path={teacher}", "student=pruned", "student.prune.fraction=0.5"]
    m = run(compose([*base, "eval.num_test=12", "eval.max_new_tokens=12", *overrides]), tmp_path / "run")
    pruned = read_config(tmp_path / "run" / "pruned")
    assert pruned["model_type"] == cfg.model_type and pruned["hidden_size"] < cfg.hidden_size
    assert m["retention"]["param_ratio"] <= 0.5
    assert m["onnx_fp32"]["exact_match"] == m["student"]["exact_match"]
    assert abs(m["onnx_fp32"]["kl"] - m["student"]["kl"]) < 1e-4
    return m, pruned


def test_phi3_teacher_is_pruned_distilled_exported_and_gated(tokenizer, tmp_path, monkeypatch):
    """The family added through families/ alone, end to end: a Phi-3 teacher (fused qkv_proj and
    gate_up_proj) pruned to half its parameters, distilled with logit and feature (hidden + attention
    output) losses, exported and quantized; the ONNX student reproduces the PyTorch one."""
    from conftest import tiny_config

    cfg = tiny_config(tokenizer, model_type="phi3", heads=4, kv=2)
    cfg.head_dim, cfg.rms_norm_eps = 16, 1e-6
    overrides = ["distill.features.attention=true", "export.openvino=false", "quantize.variants=[int8]"]
    m, _ = _family_pipeline(tokenizer, tmp_path, monkeypatch, cfg, overrides)
    assert m["train"]["final_loss"] is not None and m["train"]["skipped_steps"] == 0
    assert m["onnx_int8"]["bytes"] < m["onnx_fp32"]["bytes"] and "gate" in m


@pytest.mark.slow
def test_gemma3_teacher_is_pruned_distilled_exported_quantized_and_checked_under_openvino(
    tokenizer, tmp_path, monkeypatch
):
    """Gemma 3 through the family layer end to end: a tiny ``gemma3_text`` teacher with Gemma's shapes
    (tied embedding scaled by sqrt(hidden), (1 + w) norms, q/k norms, a sliding-window layer with a window
    shorter than the answers and a global one, two rotary bases) pruned in width (depth: the planted tests
    in test_prune.py), distilled, exported (``auto`` -> dynamo: the fused kernels do not cover Gemma),
    quantized to int8 and int4 with the tied embedding stored once on the LM head's grid, and run under
    OpenVINO too."""
    from conftest import tiny_config

    cfg = tiny_config(tokenizer, model_type="gemma3_text", heads=4, kv=2, layers=4)
    cfg.head_dim, cfg.rms_norm_eps, cfg.sliding_window = 16, 1e-6, 8
    cfg.layer_types = ["sliding_attention", "full_attention"] * 2
    overrides = ["export.openvino=true", "quantize.variants=[int8,int4]", "quantize.int4.embedding=true"]
    overrides.append("gate.min_openvino_match=0.9")  # its check states the error of the OpenVINO examples
    m, pruned = _family_pipeline(tokenizer, tmp_path, monkeypatch, cfg, [*overrides, "gate.variants=[int4]"])
    assert len(pruned["layer_types"]) == pruned["num_hidden_layers"]
    meta = json.loads((tmp_path / "run" / "onnx" / "fp32" / "onnx_config.json").read_text())
    assert meta["graph"] == "traced"
    q = json.loads((tmp_path / "run" / "onnx" / "int4" / "quantization.json").read_text())
    assert q["settings"]["embedding_shared"]["elements_changed"] == 0  # the embedding reads the head's integers
    assert m["onnx_int4"]["bytes"] < m["onnx_int8"]["bytes"] < m["onnx_fp32"]["bytes"]
    assert m["onnx_int4"]["openvino_match"] >= 0.9, m["onnx_int4"]
    # the gate's number: each split's check at matched arithmetic where the runtimes' arithmetic differs
    checks = [m["onnx_int4"]["openvino"], m["onnx_int4"]["heldout"]["openvino"]]
    for o in checks:
        assert ("matched" in o) == (o["activations"]["onnxruntime"] != o["activations"]["openvino"]), o
    assert m["onnx_int4"]["openvino_match"] == min(o.get("matched", o)["generation_match"] for o in checks)
    assert m["onnx_int4"]["openvino_match_n"] == min(o["examples"] for o in checks)
    (ov,) = [c for c in m["gate"]["checks"] if c["metric"] == "openvino_match"]
    assert ov["n"] == m["onnx_int4"]["openvino_match_n"] and ov["error"] > 0
