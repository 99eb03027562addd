"""A shared cache that concurrent jobs can trust (``core.cache``): one job builds each entry while the
others wait and reuse it, a builder killed with kill -9 is taken over and leaves nothing that looks
finished, a builder that lost its claim never replaces the entry under its readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, python_env

# One "job": hold the claim on ENTRY, build it unless finished (slowly, so others must wait), print what
# it read. The build goes through core.files.building exactly as the pipeline's cache stages do.
JOB = textwrap.dedent(
    """
    import json, logging, os, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    from core.cache import claimed
    from core.files import building
    entry, seconds, before_publish = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    with claimed(entry, "test entry"):
        if not (entry / "done.json").is_file():
            print("BUILDING", flush=True)
            with building(entry) as tmp:
                (tmp / "part").write_text("half")
                time.sleep(seconds)
                (tmp / "done.json").write_text(json.dumps({"builder": os.getpid()}))
                time.sleep(before_publish)
            print("BUILT", flush=True)
        print("READ", (entry / "done.json").read_text(), flush=True)
    """
)


def _job(entry: Path, seconds: float, env: dict, before_publish: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", JOB, str(entry), str(seconds), str(before_publish)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path_or_fn, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path_or_fn():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_concurrent_jobs_build_an_entry_once_and_read_the_same(tmp_path):
    entry = tmp_path / "cache" / "entry"
    jobs = [_job(entry, 1.5, python_env()) for _ in range(4)]
    outs = [j.communicate(timeout=120) for j in jobs]
    assert all(j.returncode == 0 for j in jobs), [o[1][-2000:] for o in outs]
    assert sum(o[0].count("BUILDING") for o in outs) == 1
    reads = {line for o in outs for line in o[0].splitlines() if line.startswith("READ")}
    assert len(reads) == 1  # every job read the one builder's entry
    assert sum("waiting for process" in o[1] for o in outs) >= 1  # the others said for whom they waited


def test_a_killed_builder_is_taken_over_and_its_leftovers_are_removed(tmp_path):
    entry = tmp_path / "cache" / "entry"
    killed = _job(entry, 60, python_env())
    _wait_for(lambda: any(entry.parent.glob(".entry.tmp-*/part")))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not entry.exists()  # a half build never looks finished
    assert (tmp_path / "cache" / ".entry.lock").is_file()  # the dead holder's marker is still there
    t0 = time.time()
    out, err = _job(entry, 0.1, python_env()).communicate(timeout=60)
    assert "BUILT" in out and time.time() - t0 < 30, err[-2000:]  # the same host: the dead pid is taken over at once
    assert "left by a builder that was killed" in err
    assert json.loads((entry / "done.json").read_text())["builder"] != killed.pid
    assert not list(entry.parent.glob(".entry.tmp-*"))


def test_a_stalled_holder_is_taken_over_after_the_lease_and_cannot_publish(tmp_path):
    """A holder that stops refreshing its claim (here SIGSTOP; on a shared file system also a dead host)
    is taken over once the lease runs out; when it wakes up, its copy is refused, not swapped in."""
    entry = tmp_path / "cache" / "entry"
    env = {**python_env(), "DISTILL_CACHE_LEASE": "2"}
    stalled = _job(entry, 0, env, before_publish=4)  # stalls with its copy complete, before the rename
    _wait_for(lambda: any(entry.parent.glob(".entry.tmp-*/done.json")))
    os.kill(stalled.pid, signal.SIGSTOP)
    try:
        t0 = time.time()
        out, err = _job(entry, 0.1, env).communicate(timeout=60)
        waited = time.time() - t0
    finally:
        os.kill(stalled.pid, signal.SIGCONT)
    assert "BUILT" in out and "waiting for process" in err, err[-2000:]
    assert waited >= 2  # not before the lease ran out: the stalled holder's process is alive
    winner = (entry / "done.json").read_text()
    s_out, s_err = stalled.communicate(timeout=60)
    assert stalled.returncode != 0 and "ClaimLost" in s_err and "BUILT" not in s_out, s_err[-2000:]
    assert (entry / "done.json").read_text() == winner  # the finished entry was not replaced


def test_lease_setting_is_checked(monkeypatch):
    from core.cache import DEFAULT_LEASE_S, lease_seconds

    monkeypatch.delenv("DISTILL_CACHE_LEASE", raising=False)
    assert lease_seconds() == DEFAULT_LEASE_S
    monkeypatch.setenv("DISTILL_CACHE_LEASE", "2.5")
    assert lease_seconds() == 2.5
    monkeypatch.setenv("DISTILL_CACHE_LEASE", "soon")
    with pytest.raises(ValueError, match="DISTILL_CACHE_LEASE='soon'"):
        lease_seconds()


@pytest.mark.slow
@pytest.mark.multiproc
def test_pipeline_jobs_share_one_teacher_build_after_a_killed_builder(tmp_path):
    """The real stages: a job killed with kill -9 while bootstrapping the teacher leaves no finished
    entry; then three jobs started together on that cache build it once (taking the dead claim over), the
    other two wait and reuse it, and all three use the same teacher and the same teacher answers."""
    env = {**python_env(), "DISTILL_CACHE": str(tmp_path / "cache")}
    args = ["+exp=smoke", "eval.num_test=8", "teacher.bootstrap.train.steps=200", "export.enabled=false"]

    def start(name):
        log = (tmp_path / f"{name}.log").open("w")
        cmd = [sys.executable, "-m", "distill", *args, f"hydra.run.dir={tmp_path / name}"]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    killed = start("killed")
    _wait_for(lambda: "bootstrapping one" in (tmp_path / "killed.log").read_text(), timeout=120)
    time.sleep(1.0)  # inside the teacher's training
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    teachers = tmp_path / "cache" / "teachers"
    assert not any((d / "stage.json").is_file() or (d / "config.json").is_file() for d in teachers.iterdir())

    jobs = {name: start(name) for name in ("a", "b", "c")}
    for name, job in jobs.items():
        assert job.wait(timeout=600) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in jobs}
    assert sum("bootstrapping one" in text for text in logs.values()) == 1
    assert sum("stage teacher: waiting for process" in text for text in logs.values()) == 2
    metrics = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in jobs]
    manifests = [json.loads((tmp_path / name / "manifest.json").read_text()) for name in jobs]
    assert len({m["teacher_hash"] for m in manifests}) == 1 and len({m["teacher_dir"] for m in manifests}) == 1
    assert len({json.dumps(m["teacher"], sort_keys=True) for m in metrics}) == 1
    assert [d.name for d in teachers.iterdir() if not d.name.startswith(".")] == [
        Path(manifests[0]["teacher_dir"]).name
    ]
