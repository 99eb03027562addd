"""Cache entries that concurrent jobs can trust, on one machine or on a shared file system.

A cache entry is a folder (a converted or trained teacher, the teacher's answers, its top-k signals, ...)
built by one job and reused by every other. ``claimed(folder)`` is held while a job decides whether the
entry is finished and, if not, builds it: the others wait for it (one log line says for what and for
whom), then find it finished and reuse it.

The claim is filelock's ``SoftFileLease`` on ``.<name>.lock`` beside the entry: a marker file its holder
refreshes from a heartbeat thread. It needs no ``flock`` support from the file system (NFS and Lustre
mounts often lack it). A holder killed with ``kill -9`` is taken over at once on the same host (its
process is gone) and after ``DISTILL_CACHE_LEASE`` seconds (default 120) from another host, once its
marker has not been refreshed for that long. Every job on a cache must use the same lease (the library
refuses a mismatch). A builder writes into a hidden temporary sibling and renames it into place
(``core.files.building``), so a killed one leaves nothing that looks finished; the next holder removes
its leftovers. A holder that lost its claim (suspended past the lease while another took over) may not
publish: ``finish_folder`` raises ``ClaimLost`` instead of replacing the entry under its readers.
"""

from __future__ import annotations

import contextvars
import logging
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("distill")

LEASE_ENV = "DISTILL_CACHE_LEASE"
DEFAULT_LEASE_S = 120.0
WAIT_LOG_EVERY_S = 300.0  # while waiting, one "still waiting" line this often
# The claim the current thread holds, if any (read by core.files.finish_folder before it publishes).
CURRENT: contextvars.ContextVar = contextvars.ContextVar("distill_cache_claim", default=None)


class ClaimLost(RuntimeError):
    """This job's claim on a cache entry was taken over by another job: it must not publish the entry."""


def lease_seconds() -> float:
    raw = os.environ.get(LEASE_ENV)
    if raw is None:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise ValueError(f"{LEASE_ENV}={raw!r}: expected seconds, a positive number (default {DEFAULT_LEASE_S:g})")
    return value


def lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


class Claim:
    """A held claim on ``folder``: ``lost`` says whether another job has taken it over since."""

    def __init__(self, folder: Path, lock):
        self.folder, self.lock = folder, lock

    @property
    def lost(self) -> bool:
        if self.lock.compromise is not None:
            return True
        owner = self.lock.owner
        return owner is None or owner.token != self.lock.token

    def check(self) -> None:
        if self.lost:
            raise ClaimLost(
                f"{self.folder}: another job took over this cache entry while this one was building it (this "
                f"process stopped refreshing its claim for over {self.lock.lease_duration:g} s); its copy is "
                "discarded and the other job's is used"
            )


def _holder(lock) -> str:
    owner = lock.owner
    if owner is None:
        return "another job"
    where = "this host" if owner.hostname == socket.gethostname() else f"host {owner.hostname}"
    return f"process {owner.pid} on {where}"


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary siblings of ``folder`` that killed builders left (``.<name>.tmp-*``,
    ``.<name>.old-*``). Call only while holding the claim: no live builder writes them then."""
    gone = []
    for p in folder.parent.glob(f".{folder.name}.*-*"):
        if p.name.startswith((f".{folder.name}.tmp-", f".{folder.name}.old-")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


@contextmanager
def claimed(folder: str | Path, what: str) -> Iterator[Claim]:
    """Hold the claim on cache entry ``folder`` (waiting while another job holds it). Inside, check whether
    the entry is finished and build it if not; ``what`` names it in the log (e.g. ``stage teacher``)."""
    from filelock import SoftFileLease, Timeout

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = SoftFileLease(lock_path(folder), lease_duration=lease_seconds())
    try:
        lock.acquire(timeout=0)
    except Timeout:
        t0 = time.time()
        log.info("%s: waiting for %s, which is building %s", what, _holder(lock), folder)
        while True:
            try:
                lock.acquire(timeout=WAIT_LOG_EVERY_S)
                break
            except Timeout:
                log.info("%s: still waiting for %s (%.0f min so far)", what, _holder(lock), (time.time() - t0) / 60)
        log.info("%s: %s is free after %.0f s of waiting", what, folder.name, time.time() - t0)
    claim = Claim(folder, lock)
    token = CURRENT.set(claim)
    try:
        for p in remove_leftovers(folder):
            log.info("%s: removed %s, left by a builder that was killed", what, p)
        yield claim
    finally:
        CURRENT.reset(token)
        lock.release()


def check_current_claim() -> None:
    """Raise ``ClaimLost`` when this thread holds a cache claim that another job has taken over."""
    claim = CURRENT.get()
    if claim is not None:
        claim.check()
