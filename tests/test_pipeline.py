"""End to end: the smoke experiment through the real CLI, its artifacts, and reload without this project."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import BLOCK_PROJECT_IMPORTS, ROOT, python_env

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
            assert key in m[who] and key in {**m[who]["hard"], "num_params": 0}, (who, key)
    assert {"agreement", "kl", "generation_match"} <= set(m["student"])
    assert 0 <= m["student"]["agreement"] <= 1 and m["student"]["kl"] >= 0
    assert m["student"]["num_params"] < m["teacher"]["num_params"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["data_hash"] == m["data_hash"] and manifest["versions"]["torch"].startswith("2.13")
    assert "stage distill: done" in proc.log and "tok_s=" in proc.log  # progress with tokens/s
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]  # no temp leftovers


def test_student_reloads_without_this_project(smoke_run):
    run_dir, env, _ = smoke_run
    code = BLOCK_PROJECT_IMPORTS + textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(run_dir / "student")!r})
        model = AutoModelForCausalLM.from_pretrained({str(run_dir / "student")!r})
        ids = tok.apply_chat_template([{{"role": "user", "content": "Call Alice Smith"}}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        assert out.shape[1] > ids["input_ids"].shape[1]
        assert "distill" not in sys.modules
        print("OK", type(model).__name__)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd="/",
        env={**env, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "OK Qwen2ForCausalLM" in proc.stdout, proc.log[-3000:]


def test_second_run_reuses_the_cached_teacher(smoke_run, tmp_path):
    _, env, _ = smoke_run
    proc = _run(["+exp=smoke", f"hydra.run.dir={tmp_path / 'again'}", "distill.train.steps=2", "eval.num_test=4"], env)
    assert proc.returncode == 0, proc.log[-3000:]
    assert "reusing cached bootstrap" in proc.log and "bootstrapping one" not in proc.log


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


@pytest.mark.multiproc
def test_pipeline_under_two_processes(tmp_path):
    env = {**python_env(), "DISTILL_CACHE": str(tmp_path / "cache")}
    run_dir = tmp_path / "ddp"
    proc = _run(
        ["+exp=smoke", f"hydra.run.dir={run_dir}", "eval.num_test=8"],
        env,
        launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    )
    assert proc.returncode == 0, proc.log[-4000:]
    assert json.loads((run_dir / "manifest.json").read_text())["processes"] == 2
    assert "rank 0 wrote" in proc.log and "rank 1 wrote" not in proc.log


def test_pruned_student_pipeline(smoke_run, tmp_path):
    """teacher -> prune (budget) -> recovery distillation; the pruned model is kept as DIR/pruned."""
    _, env, _ = smoke_run
    run_dir = tmp_path / "pruned_run"
    proc = _run(
        [
            "+exp=smoke",
            f"hydra.run.dir={run_dir}",
            "student=pruned",
            "student.prune.fraction=0.5",
            "distill.features.layer_map=[[0,0],[1,1]]",
            "eval.num_test=8",
        ],
        env,
    )
    assert proc.returncode == 0, proc.log[-3000:]
    report = json.loads((run_dir / "pruned" / "prune_report.json").read_text())
    m = json.loads((run_dir / "metrics.json").read_text())
    assert report["params"] == m["student"]["num_params"] <= 0.5 * m["teacher"]["num_params"]
    assert "width" in report["reasons"][0] and "prune plan" in proc.log
    cfg = json.loads((run_dir / "student" / "config.json").read_text())
    assert cfg["hidden_size"] == report["shape"]["hidden_size"] and cfg["head_dim"] == 16


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
