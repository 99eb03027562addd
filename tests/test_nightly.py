"""Nightly jobs through the real CLI: reruns skip finished stages and redo only what changed, a run
killed with SIGKILL mid-training resumes to the uninterrupted result, sweeps share the teacher's cached
signals and end with a summary, and ``distill.compare`` flags regressions."""

from __future__ import annotations

import json
import math
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
    # export turned on afterwards: the PyTorch evaluation is kept, only the latency baseline is measured
    proc = _run([*args, "data.seed=1", "export.enabled=true", "quantize.variants=[int8]", "gate.variants=[int8]"], env)
    assert proc.returncode == 0, proc.log[-3000:]
    st = _statuses(tmp_path / "b")
    assert st["evaluate"] == "skipped" and st["evaluate:latency"] == st["export"] == "ran", st
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["student"]["ms_per_token"] > 0 and m["teacher"]["bytes"] > m["student"]["bytes"] > 0


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


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _job_logs(sweep: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*_log.*")))


def test_submitit_sweep_survives_a_killed_job_and_the_rerun_finishes_only_it(first, env, tmp_path):
    """Jobs as separate processes (``submitit_local`` runs the same jobs as ``submitit_slurm``, locally):
    the teacher's top-k signals are computed once for both; one job is killed with kill -9 in the middle
    of distillation; the summary still holds both jobs (the killed one as unfinished); the same command
    again finishes the killed job from its stages and checkpoint, and skips every stage of the other."""
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        *SMOKE,
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
        "distill.signals=topk",
        "distill.features.weight=0.0",
        "distill.train.steps=60",
        "quantize.int4.block_size=16,32",
    ]
    cmd = [sys.executable, "-m", "distill", *args]
    sweeper = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = None
    t0 = time.time()
    while victim is None and time.time() - t0 < 300 and sweeper.poll() is None:
        for latest in sweep.glob("*/checkpoints/latest.json"):  # a job's first distillation checkpoint
            logs = {p: p.read_text(errors="replace") for p in sweep.glob(".submitit/*/*_0_log.out")}
            owner = [p for p, text in logs.items() if str(latest.parent) in text]
            if len(owner) == 1:
                # submitit's local job id is the pid of the job's process; kill it with its children, as
                # Slurm's scancel or a time limit kills every process of a job
                victim = int(owner[0].parent.name)
                for pid in [victim, *_descendants(victim)]:
                    os.kill(pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    out, _ = sweeper.communicate(timeout=600)
    assert victim is not None, out[-4000:]
    rows = json.loads((sweep / "summary.json").read_text())
    assert len({r["job"] for r in rows}) == 2, rows
    unfinished = [r for r in rows if r["gate"] == "unfinished"]
    assert len(unfinished) == 1 and len(rows) == 4, rows  # the killed job, and 3 artifacts of the other
    killed_dir = Path(unfinished[0]["folder"])
    assert not (killed_dir / "metrics.json").exists() and not (killed_dir / "student" / "stage.json").exists()

    proc = _run(args, env)
    assert proc.returncode == 0, (proc.log + _job_logs(sweep))[-4000:]
    rows = json.loads((sweep / "summary.json").read_text())
    assert len(rows) == 6 and all(r["gate"] in ("pass", "fail") for r in rows) and any(r["pareto"] for r in rows)
    assert (sweep / "pareto.png").is_file() and "| job | variant |" in (sweep / "summary.md").read_text()
    for job in {r["folder"] for r in rows}:
        st = _statuses(Path(job))
        if Path(job) == killed_dir:
            assert st["distill"] == "ran" and st["teacher"] == st["signals"] == "skipped", st
        else:
            assert set(st.values()) == {"skipped"}, st  # finished the first time: nothing reruns
        assert json.loads((Path(job) / "student" / "distill_info.json").read_text())["signals"] == "topk"
    logs = _job_logs(sweep)
    assert logs.count("distill: resumed from") == 1  # the killed job, from its checkpoint
    # the teacher was bootstrapped by the first test; its top-k signals were computed once for all jobs
    assert logs.count("stage signals: start") == 1 and "bootstrapping one" not in logs


@pytest.mark.multiproc
def test_submitit_job_of_two_tasks_trains_as_two_ranks(first, env, tmp_path):
    """``hydra.launcher.tasks_per_node=2``: one job, two tasks, one process group (gloo here, NCCL on GPUs):
    the way to give one sweep job several GPUs on Slurm; ``cpus_per_task`` sets each task's threads."""
    sweep = tmp_path / "ranks"
    args = [
        "-m",
        *SMOKE,
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.cpus_per_task=2",  # the environment says 1 thread (OMP_NUM_THREADS): the launcher's wins
        f"hydra.sweep.dir={sweep}",
    ]
    proc = _run([*args, "distill.train.steps=20"], {**env, "ACCELERATE_USE_CPU": "true"})
    logs = _job_logs(sweep)
    assert proc.returncode == 0, (proc.log + logs)[-4000:]
    (job,) = {r["folder"] for r in json.loads((sweep / "summary.json").read_text())}
    manifest = json.loads((Path(job) / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["threads"] == 2 and env.get("OMP_NUM_THREADS", "1") == "1"
    assert "submitit task 0 of 2: rank 0" in logs and "submitit task 1 of 2: rank 1" in logs


def test_nightly_check_against_the_last_good_sweep(first, tmp_path, capsys):
    """``python -m distill.sweep TONIGHT --last-good``: the first night is good; a later night with planted
    regressions (an artifact's exact match and size, a job that failed) exits 1 naming them, in summary.md
    and nightly.json, and is not a good baseline for the night after."""
    from distill.sweep import main

    night = {}
    for name in ("2026-12-01", "2026-12-02", "2026-12-03"):
        night[name] = tmp_path / "nightly" / name
        for job in ("a", "b"):
            shutil.copytree(first, night[name] / job, ignore=shutil.ignore_patterns("student", "pruned", "onnx"))
            (night[name] / job / ".hydra").mkdir(exist_ok=True)
            (night[name] / job / ".hydra" / "overrides.yaml").write_text(f"- +exp=smoke\n- seed_label={job}\n")
    assert main([str(night["2026-12-01"]), "--last-good"]) == 0
    assert "none (first good sweep)" in capsys.readouterr().out
    assert json.loads((night["2026-12-01"] / "nightly.json").read_text())["good"] is True

    worse = night["2026-12-02"]
    m = json.loads((worse / "a" / "metrics.json").read_text())
    m["onnx_int8"]["exact_match"] = m["onnx_int8"]["exact_match"] - 0.2  # planted: 0.2 below the tolerance 0.01
    m["onnx_int4"]["bytes"] = int(m["onnx_int4"]["bytes"] * 1.5)  # planted: 50% larger (tolerance 5%)
    m["onnx_fp32"]["bytes"] = int(m["onnx_fp32"]["bytes"] * 1.01)  # within tolerance
    (worse / "a" / "metrics.json").write_text(json.dumps(m))
    (worse / "b" / "failed.json").write_text(json.dumps({"exit_code": 1, "error": "RuntimeError: planted"}))
    assert main([str(worse), "--last-good"]) == 1
    out = capsys.readouterr().out
    assert "REGRESSED (" in out and str(night["2026-12-01"]) in out
    assert "seed_label=a [int8] exact_match" in out and "seed_label=a [int4] bytes" in out
    assert "[fp32] bytes" not in out.split("REGRESSED")[1].split("|")[0]
    assert "seed_label=b [int8]: finished in the baseline, job failed tonight" in out
    verdict = json.loads((worse / "nightly.json").read_text())
    assert verdict["good"] is False and verdict["unfinished"] == ["seed_label=b"]
    assert (worse / "nightly.png").is_file() and "REGRESSED" in (worse / "summary.md").read_text()

    # the night after is compared with the last GOOD night (12-01), not with the failed 12-02
    assert main([str(night["2026-12-03"]), "--last-good"]) == 0
    assert f"Against the baseline: {night['2026-12-01']}" in capsys.readouterr().out
    assert main([str(night["2026-12-03"]), "--baseline", str(tmp_path / "nope")]) == 2
    assert main([str(night["2026-12-03"]), "--tolerance", "exactmatch=0.1", "--last-good"]) == 2


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


def test_recipes_compared_over_seeds(first, tmp_path, capsys):
    """``python -m distill.seeds``: two recipes, two seeds each (copies of a real run, the seed and the recipe
    key changed in their configs, planted scores); the seeds group into recipes, Welch's test over them gives
    the closed-form p, the recipe's change is named, a run that differs beyond its seed is warned about, runs
    on other data are refused; a sweep of the same four jobs gets the same table in its summary."""
    import yaml

    from distill.seeds import main
    from distill.sweep import main as sweep_main

    planted = {"a0": 0.40, "a1": 0.44, "b0": 0.50, "b1": 0.54}  # heldout exact match; test = that + 0.4
    sweep = tmp_path / "sweep"
    for job, held in planted.items():
        folder = sweep / job
        shutil.copytree(first, folder, ignore=shutil.ignore_patterns("student", "pruned", "onnx", "checkpoints"))
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        cfg["distill"]["train"]["seed"] = int(job[1])
        cfg["distill"]["features"]["weight"] = 0.5 if job[0] == "b" else 0.0
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
        m = json.loads((folder / "metrics.json").read_text())
        m["student"]["exact_match"], m["student"]["heldout"]["exact_match"] = held + 0.4, held
        for st in m["stages"].values():  # planted: only distillation took time, 10 / 20 minutes by seed
            st["seconds"] = st["ran_seconds"] = 0.0
        m["stages"]["distill"]["seconds"] = 600.0 * (1 + int(job[1]))
        (folder / "metrics.json").write_text(json.dumps(m))
        overrides = [f"distill.train.seed={job[1]}", f"distill.features.weight={cfg['distill']['features']['weight']}"]
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["+exp=smoke", *overrides]))
    runs = {k: str(sweep / k) for k in planted}
    assert main([f"logits={runs['a0']},{runs['a1']}", f"features={runs['b0']},{runs['b1']}"]) == 0
    out = capsys.readouterr().out
    t = 0.10 / math.sqrt(0.0008)  # two seeds each, equal spread: df = 2, p = 1 - t / sqrt(2 + t^2) = 0.0715
    row = next(line for line in out.splitlines() if line.startswith("| heldout.exact_match | features |"))
    assert "| 2 | 0.520 |" in row and "| +10.0 |" in row and f"| {1 - t / math.sqrt(2 + t * t):.3g} |" in row
    assert "within the seeds' spread" in row
    assert "(seed train=1); 15.0 minutes making the student on the mean" in out
    assert "features changes against logits: distill.features.weight: 0.0 -> 0.5" in out and "WARNING" not in out
    from distill.compare import main as compare_main

    compare_main([runs["a0"], runs["a1"]])  # two seeds of one recipe: compare says its differences are seed noise
    assert "only seeds differ" in capsys.readouterr().out
    compare_main([runs["a0"], runs["b0"]])
    assert "only seeds differ" not in capsys.readouterr().out

    cfg = yaml.safe_load((sweep / "a1" / "config.yaml").read_text())
    cfg["distill"]["train"]["lr"] = 1.0  # beyond the seed: the recipe's runs disagree
    (sweep / "a1" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main([f"logits={runs['a0']},{runs['a1']}", f"features={runs['b0']}"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the runs of logits differ beyond the seeds in distill.train.lr" in out
    assert "one seed: cannot tell" in out

    other = tmp_path / "other"
    shutil.copytree(sweep / "b1", other)
    m = json.loads((other / "metrics.json").read_text())
    m["data_hash"] = "0" * 16
    (other / "metrics.json").write_text(json.dumps(m))
    assert main([f"logits={runs['a0']}", f"features={runs['b0']},{other}"]) == 2
    assert f"{other} was scored with other data" in capsys.readouterr().err
    assert main([f"logits={runs['a0']}", "--artifact", "onnx_nope"]) == 2
    assert "has no 'onnx_nope'" in capsys.readouterr().err
    assert main([f"logits={runs['a0']},{runs['a0']}"]) == 2  # one draw given twice is not two seeds
    assert "have the same seeds (0): one draw counted twice" in capsys.readouterr().err

    assert sweep_main([str(sweep)]) == 0  # the sweep's jobs group by their overrides less the seed
    summary = (sweep / "summary.md").read_text()
    assert "## Recipes over seeds" in summary and (sweep / "seeds.png").is_file()
    recipes = json.loads((sweep / "seeds.json").read_text())["runs"]
    assert sorted(len(v) for v in recipes.values()) == [2, 2]
    assert {r["folder"] for v in recipes.values() for r in v} == set(planted)


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
    assert m["train_data"]["general"] == {
        "sequences": 24,
        "length": 16,
        "share": 0.25,
        "read": 24,
    }  # 4 a batch, 40 steps
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
