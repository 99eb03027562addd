"""Wall time of one sweep under each launcher, and of concurrent jobs on a cold shared cache.

1. The same 4-job sweep (``+exp=smoke`` with longer distillation, int4 block size x distillation
   temperature) under Hydra's basic launcher (one job after another), ``hydra/launcher=parallel``
   (joblib, 2 jobs at once, 1 thread each on 2 cores) and ``submitit_local`` (every job at once), each on
   a warm cache (the teacher is built once before). Ratios against the basic launcher.
2. Three jobs started together on one cold cache (a teacher bootstrap of ``--teacher-steps``): how many
   bootstrapped the teacher (1 with the claims: the others waited), and the wall time against three jobs
   each building its own teacher (the work each did before the claims) and one job alone.

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


LAUNCHERS = {
    "basic": [],
    "joblib_2": ["hydra/launcher=parallel"],
    "submitit_local": ["hydra/launcher=submitit_local"],
    "submitit_local_1cpu": ["hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1"],
}


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
    ap.add_argument("--launchers", default="", help="comma-separated subset of " + ",".join(LAUNCHERS))
    ap.add_argument("--parts", default="sweep,cold", help="sweep, cold or both")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep_launchers.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    common = ["+exp=smoke", "eval.num_test=16", f"distill.train.steps={a.steps}", "distill.train.checkpoint_every=0"]
    out: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "steps": a.steps,
        "teacher_steps": a.teacher_steps,
    }

    if "sweep" in a.parts:
        sweep_part(a, work, env, common, out)
    if "cold" in a.parts:
        cold_part(a, work, env, common, out)
    print(json.dumps(out, indent=2))
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)


def sweep_part(a, work: Path, env: dict, common: list[str], out: dict) -> None:
    grid = ["quantize.int4.block_size=16,32", "distill.temperature=1.0,2.0"]
    env["DISTILL_CACHE"] = str(work / "warm")
    run([*common, f"hydra.run.dir={work / 'prime'}"], env, work / "prime.log")  # the teacher, built once
    times = {}
    for name, launcher in LAUNCHERS.items():
        if a.launchers and name not in a.launchers.split(","):
            continue
        times[name] = run(
            ["-m", *common, *grid, *launcher, f"hydra.sweep.dir={work / name}"], env, work / f"{name}.log"
        )
        rows = json.loads((work / name / "summary.json").read_text())
        assert len({r["job"] for r in rows}) == 4 and all(r["gate"] in ("pass", "fail") for r in rows), rows
        print(f"{name}: {times[name]:.1f} s", flush=True)
    out["sweep_4_jobs_s"] = times
    if "basic" in times:
        out["sweep_ratio_vs_basic"] = {k: v / times["basic"] for k, v in times.items()}


def cold_part(a, work: Path, env: dict, common: list[str], out: dict) -> None:
    cold = [*common, f"teacher.bootstrap.train.steps={a.teacher_steps}"]  # a teacher build that matters
    env["DISTILL_CACHE"] = str(work / "cold1")
    alone = run([*cold, f"hydra.run.dir={work / 'alone'}"], env, work / "alone.log")

    def together(tag: str, shared: bool) -> tuple[float, list[str]]:
        t0 = time.time()
        procs = []
        for i in range(3):
            log = (work / f"{tag}{i}.log").open("w")
            cache = work / (f"{tag}-cache" if shared else f"{tag}-cache{i}")
            cmd = [sys.executable, "-m", "distill", *cold, f"hydra.run.dir={work / f'{tag}{i}'}"]
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env={**env, "DISTILL_CACHE": str(cache)}, stdout=log, stderr=log)
            )
        assert all(p.wait() == 0 for p in procs)
        return time.time() - t0, [(work / f"{tag}{i}.log").read_text() for i in range(3)]

    # the work each job did before the claims: its own teacher (here: its own cache, so no races either)
    own_s, _ = together("own", shared=False)
    shared_s, logs = together("shared", shared=True)
    out["cold_cache"] = {
        "one_job_alone_s": alone,
        "three_jobs_each_own_teacher_s": own_s,
        "three_jobs_one_shared_cache_s": shared_s,
        "shared_vs_own": shared_s / own_s,
        "bootstraps": sum("bootstrapping one" in t for t in logs),
        "waited": sum("stage teacher: waiting for" in t for t in logs),
    }


if __name__ == "__main__":
    main()
