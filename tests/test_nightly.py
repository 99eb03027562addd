"""Nightly jobs through the real CLI: reruns skip finished stages and redo only what changed, a run
killed with SIGKILL mid-training resumes to the uninterrupted result, sweeps share the teacher's cached
signals and end with a summary, and ``distill.compare`` flags regressions."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, python_env

pytestmark = pytest.mark.slow  # several pipeline runs, a kill -9 and a sweep: minutes

SMOKE = ["+exp=smoke", "eval.num_test=8"]


def _run(args, env, timeout=900):
    proc = subprocess.run(
        [sys.executable, "-m", "distill", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    proc.log = proc.stdout + proc.stderr
    return proc


def _statuses(run_dir: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in json.loads((run_dir / "metrics.json").read_text())["stages"].items()}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**python_env(), "DISTILL_CACHE": str(tmp_path_factory.mktemp("nightly") / "cache")}


@pytest.fixture(scope="module")
def first(env, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "a"
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}"], env)
    assert proc.returncode == 0, proc.log[-4000:]
    return run_dir


def test_rerun_skips_finished_stages_and_redoes_only_what_changed(first, env):
    run_dir = first
    before = json.loads((run_dir / "metrics.json").read_text())
    for name in ("student", "onnx/fp32", "onnx/int8", "onnx/int4", "eval/pytorch", "eval/onnx_int8", "gate"):
        m = json.loads((run_dir / name / "stage.json").read_text())
        assert {"key", "config", "inputs", "versions", "outputs", "output_hash"} <= set(m), name
        assert m["versions"]["torch"].startswith("2.13") and m["outputs"], name

    # the same command again: nothing runs, the teacher is not even loaded, the numbers are the same
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}"], env)
    assert proc.returncode == 0, proc.log[-3000:]
    assert set(_statuses(run_dir).values()) == {"skipped"}
    assert "stage load teacher" not in proc.log and "stages run: none" in proc.log
    after = json.loads((run_dir / "metrics.json").read_text())
    for key in ("student", "onnx_int8", "gate"):
        assert after[key] == before[key]

    # a new gate threshold redoes only the gate
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}", "gate.max_kl=4.5"], env)
    assert proc.returncode == 0, proc.log[-3000:]
    ran = {k for k, v in _statuses(run_dir).items() if v == "ran"}
    assert ran == {"gate"}, ran
    assert "stage gate: start (changed: config.thresholds.max_kl)" in proc.log

    # force= reruns the named stage although its manifest matches
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}", "gate.max_kl=4.5", "force=[quantize]"], env)
    assert proc.returncode == 0, proc.log[-3000:]
    st = _statuses(run_dir)
    assert st["quantize:int8"] == st["quantize:int4"] == "ran" and st["export"] == st["distill"] == "skipped"

    # an artifact changed on disk is noticed and rebuilt
    with (run_dir / "onnx" / "int4" / "model.onnx").open("ab") as f:
        f.write(b"garbage")
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}", "gate.max_kl=4.5"], env)
    assert proc.returncode == 0, proc.log[-3000:]
    assert _statuses(run_dir)["quantize:int4"] == "ran" and "outputs changed on disk" in proc.log

    # the folder belongs to experiment "smoke": another experiment is refused and nothing is touched
    stamp = (run_dir / "metrics.json").stat().st_mtime
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}", "name=other"], env)
    assert proc.returncode == 4
    assert f"{run_dir} belongs to experiment 'smoke'" in proc.log and "hydra.run.dir" in proc.log
    assert (run_dir / "metrics.json").stat().st_mtime == stamp


def test_new_data_redoes_distillation_onward(first, env, tmp_path):
    """With the teacher given as a folder, a new data version redoes distill and evaluate, not the teacher."""
    teacher = json.loads((first / "metrics.json").read_text())["teacher_dir"]
    args = [*SMOKE, f"teacher.path={teacher}", "export.enabled=false", f"hydra.run.dir={tmp_path / 'b'}"]
    proc = _run(args, env)
    assert proc.returncode == 0, proc.log[-3000:]
    proc = _run([*args, "data.seed=1"], env)
    assert proc.returncode == 0, proc.log[-3000:]
    st = _statuses(tmp_path / "b")
    assert st == {"teacher": "input", "distill": "ran", "evaluate": "ran"}, st
    assert "inputs.data_hash" in proc.log


def test_kill_9_mid_training_resumes_to_the_uninterrupted_result(first, env, tmp_path):
    args = [*SMOKE, "distill.train.steps=300", "distill.train.checkpoint_every=25", "export.enabled=false"]
    straight = tmp_path / "straight"
    proc = _run([*args, f"hydra.run.dir={straight}"], env)
    assert proc.returncode == 0, proc.log[-3000:]

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distill", *args, f"hydra.run.dir={killed}"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "checkpoints" / "latest.json"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 25:
            break
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL
    step = json.loads(latest.read_text())["step"]
    assert 25 <= step < 300  # killed mid-training
    # nothing looks finished: no student manifest, no metrics
    assert not (killed / "student" / "stage.json").exists() and not (killed / "metrics.json").exists()

    proc = _run([*args, f"hydra.run.dir={killed}"], env)  # the same command
    assert proc.returncode == 0, proc.log[-3000:]
    assert f"resumed from {killed / 'checkpoints'}" in proc.log
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert abs(a["train"]["final_loss"] - b["train"]["final_loss"]) < 1e-5
    for key in ("exact_match", "agreement", "kl", "perplexity", "generation_match"):
        assert abs(a["student"][key] - b["student"][key]) < 1e-5, key
    from safetensors.torch import load_file

    wa, wb = (
        load_file(str(straight / "student" / "model.safetensors")),
        load_file(str(killed / "student" / "model.safetensors")),
    )
    import torch

    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=1e-5)
    assert not (killed / "checkpoints").exists()  # resume state is removed once the student is final


def test_sweep_shares_teacher_signals_and_writes_a_summary(first, env, tmp_path):
    sweep = tmp_path / "sweep"
    proc = _run(
        [
            "-m",
            *SMOKE,
            f"hydra.sweep.dir={sweep}",
            "distill.signals=topk",
            "distill.features.weight=0.0",
            "distill.train.steps=20",
            "quantize.int4.block_size=16,32",
        ],
        env,
    )
    assert proc.returncode == 0, proc.log[-4000:]
    # the teacher was bootstrapped by the first test; its top-k signals are computed once for both jobs
    assert proc.log.count("stage signals: start") == 1 and proc.log.count("stage signals: skipped") == 1
    assert "bootstrapping one" not in proc.log
    assert proc.log.count("teacher test answers: reusing") >= 1
    rows = json.loads((sweep / "summary.json").read_text())
    assert len({r["job"] for r in rows}) == 2 and len(rows) == 6  # 2 jobs x (fp32, int8, int4)
    assert all(r["gate"] in ("pass", "fail") for r in rows) and any(r["pareto"] for r in rows)
    assert (sweep / "pareto.png").is_file() and "| job | variant |" in (sweep / "summary.md").read_text()
    for job in {r["folder"] for r in rows}:
        assert json.loads((Path(job) / "student" / "distill_info.json").read_text())["signals"] == "topk"


def test_compare_flags_regressions(first, tmp_path, capsys):
    from distill.compare import main

    assert main([str(first), str(first)]) == 0
    assert "no regression" in capsys.readouterr().out
    worse = tmp_path / "worse"
    shutil.copytree(first, worse)
    m = json.loads((worse / "metrics.json").read_text())
    m["onnx_int8"]["agreement"] -= 0.05  # planted regressions
    m["onnx_int8"]["bytes"] = int(m["onnx_int8"]["bytes"] * 1.5)
    m["onnx_int4"]["agreement"] += 0.005  # within tolerance
    (worse / "metrics.json").write_text(json.dumps(m))
    import yaml

    cfg = yaml.safe_load((worse / "config.yaml").read_text())
    old_kl, cfg["gate"]["max_kl"] = cfg["gate"]["max_kl"], 0.25
    (worse / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main([str(first), str(worse)]) == 1
    out = capsys.readouterr().out
    assert f"gate.max_kl: {old_kl:.4g} -> 0.25" in out and "1 keys differ" in out
    assert "onnx_int8.agreement" in out and "onnx_int8.bytes" in out and "onnx_int4.agreement" not in out
    assert main([str(first), str(worse), "--tolerance", "agreement=0.1", "--tolerance", "bytes=1.0"]) == 0
    capsys.readouterr()
    assert main([str(first), str(tmp_path / "missing")]) == 2
    assert "missing is not a folder" in capsys.readouterr().err
    (worse / "metrics.json").unlink()
    assert main([str(first), str(worse)]) == 2
    assert "has no metrics.json: the run did not finish" in capsys.readouterr().err


def test_extra_training_pools_are_cached_and_keyed(env, tmp_path):
    """Augmented requests and general text are stages of their own, cached per teacher: a rerun reuses
    them, a new share of a batch redoes distillation (and what follows) but neither pool, and the pruning
    calibration's general text is part of the prune stage's key."""
    run_dir = tmp_path / "mix"
    mix = [
        "distill.augment.examples=24",
        "distill.augment.share=0.25",
        "distill.general.examples=24",
        "distill.general.length=16",
        "student=pruned",
        "student.prune.calib_general=8",
    ]
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}", *mix], env)
    assert proc.returncode == 0, proc.log[-4000:]
    st = _statuses(run_dir)
    assert st["augment"] == st["general"] == st["prune"] == st["distill"] == "ran"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_data"]["general"] == {"sequences": 24, "length": 16, "share": 0.25}
    assert m["train_data"]["augment"]["candidates"] == 24
    distill_inputs = json.loads((run_dir / "student" / "stage.json").read_text())["inputs"]
    assert {"augment_hash", "general_hash"} <= set(distill_inputs)
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}", *mix], env)
    assert proc.returncode == 0 and set(_statuses(run_dir).values()) == {"skipped"}, proc.log[-3000:]
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}", *mix, "distill.general.share=0.5"], env)
    assert proc.returncode == 0, proc.log[-3000:]
    st = _statuses(run_dir)
    assert st["augment"] == st["general"] == st["prune"] == "skipped" and st["distill"] == "ran", st
    proc = _run(
        [*SMOKE, f"hydra.run.dir={run_dir}", *mix, "distill.general.share=0.5", "student.prune.calib_general=4"], env
    )
    assert proc.returncode == 0, proc.log[-3000:]
    assert _statuses(run_dir)["prune"] == "ran"
    # keep=implied: a new augment entry (no teacher answers), every candidate kept with its implied call
    implied = [*mix, "distill.general.share=0.5", "student.prune.calib_general=4", "distill.augment.keep=implied"]
    proc = _run([*SMOKE, f"hydra.run.dir={run_dir}", *implied], env)
    assert proc.returncode == 0, proc.log[-3000:]
    st = _statuses(run_dir)
    assert st["augment"] == st["distill"] == "ran" and st["general"] == st["prune"] == "skipped", st
    a = json.loads((run_dir / "metrics.json").read_text())["train_data"]["augment"]
    assert a["keep"] == "implied" and a["rejected"] == 0 and a["kept"] == 24 - a["too_long"] > 0, a
    assert "each with the call its new values imply" in (run_dir / "report.md").read_text()
