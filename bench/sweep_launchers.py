"""Wall time of one sweep under each launcher, and of concurrent jobs on a cold shared cache.

1. The same 4-job sweep (``+exp=smoke`` with longer distillation, int4 block size x distillation
   temperature) under Hydra's basic launcher (one job after another), ``hydra/launcher=parallel``
   (joblib, 2 jobs at once, 1 thread each on 2 cores) and ``submitit_local`` (every job at once), each on
   a warm cache (the teacher is built once before). Ratios against the basic launcher.
2. Three jobs started together on a cold cache (a teacher bootstrap of ``--teacher-steps``): how many
   bootstrapped the teacher (1 with the claims: the others waited), and the wall time against one job
   alone on a cold cache.

Run: python bench/sweep_launchers.py [--steps 300] [--out bench/results/sweep_launchers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], env: dict, log: Path) -> float:
    t0 = time.time()
    with log.open("w") as f:
        code = subprocess.call([sys.executable, "-m", "distill", *args], cwd=ROOT, env=env, stdout=f, stderr=f)
    if code != 0:
        raise SystemExit(f"exit {code}: see {log}")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="distillation steps per job")
    ap.add_argument("--teacher-steps", type=int, default=800, help="bootstrap steps in the cold-cache part")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep_launchers.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    common = ["+exp=smoke", "eval.num_test=16", f"distill.train.steps={a.steps}", "distill.train.checkpoint_every=0"]
    grid = ["quantize.int4.block_size=16,32", "distill.temperature=1.0,2.0"]
    out: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "steps": a.steps,
        "teacher_steps": a.teacher_steps,
    }

    env["DISTILL_CACHE"] = str(work / "warm")
    run([*common, f"hydra.run.dir={work / 'prime'}"], env, work / "prime.log")  # the teacher, built once
    times = {}
    for name, launcher in (
        ("basic", []),
        ("joblib_2", ["hydra/launcher=parallel"]),
        ("submitit_local", ["hydra/launcher=submitit_local"]),
    ):
        times[name] = run(
            ["-m", *common, *grid, *launcher, f"hydra.sweep.dir={work / name}"], env, work / f"{name}.log"
        )
        rows = json.loads((work / name / "summary.json").read_text())
        assert len({r["job"] for r in rows}) == 4 and all(r["gate"] in ("pass", "fail") for r in rows), rows
        print(f"{name}: {times[name]:.1f} s", flush=True)
    out["sweep_4_jobs_s"] = times
    out["sweep_ratio_vs_basic"] = {k: v / times["basic"] for k, v in times.items()}

    cold = [*common, f"teacher.bootstrap.train.steps={a.teacher_steps}"]  # a teacher build that matters
    env["DISTILL_CACHE"] = str(work / "cold1")
    alone = run([*cold, f"hydra.run.dir={work / 'alone'}"], env, work / "alone.log")
    env["DISTILL_CACHE"] = str(work / "cold3")
    t0 = time.time()
    procs = []
    for i in range(3):
        log = (work / f"c{i}.log").open("w")
        cmd = [sys.executable, "-m", "distill", *cold, f"hydra.run.dir={work / f'c{i}'}"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log))
    assert all(p.wait() == 0 for p in procs)
    together = time.time() - t0
    logs = [(work / f"c{i}.log").read_text() for i in range(3)]
    out["cold_cache"] = {
        "one_job_alone_s": alone,
        "three_jobs_together_s": together,
        "ratio": together / alone,
        "bootstraps": sum("bootstrapping one" in t for t in logs),
        "waited": sum("stage teacher: waiting for" in t for t in logs),
    }
    print(json.dumps(out, indent=2))
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
