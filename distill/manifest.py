"""Stage manifests: what makes a nightly rerun skip finished work, redo what changed, and refuse a
run folder that is not its own.

Every stage writes one folder and, last, ``stage.json`` inside it: the stage's resolved config, the
hashes of its inputs (upstream outputs, data), library versions, and a hash of every file it wrote.
A stage is skipped when its ``stage.json`` has the same key (config + inputs + versions) and its files
still hash to what was recorded; otherwise it runs again and the log says which key changed. A folder
without ``stage.json`` was never finished (the manifest is written after the folder is complete), so a
kill at any point leaves nothing that looks done.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core.files import write_json
from core.hashing import MANIFEST, changed_keys, digest, file_hashes

log = logging.getLogger("distill")

STAGES = (
    "gguf",
    "teacher",
    "augment",
    "general",
    "signals",
    "prune",
    "distill",
    "qad",
    "evaluate",
    "export",
    "quantize",
    "gate",
)
RUN_MANIFEST = "manifest.json"
# Hydra writes these into the run folder before our code runs.
HYDRA_ENTRIES = (".hydra",)
VERSIONED = (
    "torch",
    "transformers",
    "accelerate",
    "peft",
    "tokenizers",
    "safetensors",
    "bitsandbytes",
    "onnx",
    "onnxruntime",
    "onnxscript",
)


class RunFolderError(RuntimeError):
    """The run folder (or a cache folder) cannot be used: another experiment's, unwritable, or too full."""


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in VERSIONED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def is_disk_full(err: BaseException) -> bool:
    text = str(err)
    return (
        getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
        or "No space left" in text
        or "StorageFull" in text
        or "code: 28" in text
    )


@dataclass
class Stage:
    """One stage's decision (``skipped``) and, once finished, its manifest."""

    name: str
    folder: Path
    key: str
    config: dict
    inputs: dict
    skipped: bool
    manifest: dict = field(default_factory=dict)
    started: float = 0.0

    @property
    def output_hash(self) -> str:
        return self.manifest["output_hash"]


class Stages:
    """Decides, per stage, whether its finished output can be reused, and records what ran.

    ``force``: stage names (see ``STAGES``) or ``all`` to rerun even when their manifests match.
    """

    def __init__(self, force=(), is_main: bool = True):
        self.force = set(force)
        self.is_main = is_main
        self.versions = versions()
        self.record: dict[str, dict] = {}

    def begin(self, name: str, folder: Path, config: dict, inputs: dict) -> Stage:
        folder = Path(folder)
        key = digest({"stage": name, "config": config, "inputs": inputs, "versions": self.versions})
        st = Stage(name, folder, key, config, inputs, skipped=False, started=time.time())
        why, old = self._why_rerun(st)
        if why is None:
            st.skipped = True
            st.manifest = old
            log.info("stage %s: skipped, %s is finished with the same config, inputs and versions", name, folder)
            self.record[name] = {
                "status": "skipped",
                "key": key,
                "output_hash": st.output_hash,
                "folder": str(folder),
                "ran_seconds": st.manifest.get("seconds"),  # what reusing it saved
                "ran_at": st.manifest.get("finished"),
            }
        else:
            log.info("stage %s: start (%s)", name, why)
        return st

    def _why_rerun(self, st: Stage) -> tuple[str | None, dict]:
        """Why ``st`` must run (None: it need not), and the manifest of its finished output."""
        base = st.name.split(":")[0]
        if "all" in self.force or base in self.force or st.name in self.force:
            return "forced", {}
        path = st.folder / MANIFEST
        if not path.is_file():
            return "no finished output yet", {}
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return f"{path} is unreadable", {}
        if old.get("key") != st.key:
            diff = (
                [f"config.{k}" for k in changed_keys(old.get("config", {}), st.config)]
                + [f"inputs.{k}" for k in changed_keys(old.get("inputs", {}), st.inputs)]
                + [f"versions.{k}" for k in changed_keys(old.get("versions", {}), self.versions)]
            )
            return "changed: " + (", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "") if diff else "key"), old
        try:
            now = file_hashes(st.folder)
        except OSError as err:
            return f"outputs unreadable ({err})", old
        bad = [f for f, h in old.get("outputs", {}).items() if now.get(f) != h]
        if bad:
            return f"outputs changed on disk since they were written ({', '.join(bad[:3])})", old
        return None, old

    def finish(self, st: Stage, extra: dict | None = None) -> Stage:
        """Hash the finished folder and write its manifest last (atomically). Call on the main process."""
        outputs = file_hashes(st.folder)
        st.manifest = {
            "stage": st.name,
            "key": st.key,
            "config": st.config,
            "inputs": st.inputs,
            "versions": self.versions,
            "outputs": outputs,
            "output_hash": digest(outputs),
            "command": sys.argv,
            "started": st.started,
            "finished": time.time(),
            "seconds": time.time() - st.started,
            **(extra or {}),
        }
        if self.is_main:
            write_json(st.folder / MANIFEST, st.manifest)
        log.info("stage %s: done in %.1f s", st.name, st.manifest["seconds"])
        self.record[st.name] = {
            "status": "ran",
            "key": st.key,
            "output_hash": st.manifest["output_hash"],
            "folder": str(st.folder),
            "seconds": st.manifest["seconds"],
        }
        return st

    def adopt(self, st: Stage) -> Stage:
        """On a process that did not write the stage: read the manifest the main process wrote."""
        if not st.manifest:
            st.manifest = json.loads((st.folder / MANIFEST).read_text())
        self.record.setdefault(
            st.name,
            {"status": "ran", "key": st.key, "output_hash": st.manifest["output_hash"], "folder": str(st.folder)},
        )
        return st


@contextmanager
def guard(name: str, folder: Path):
    """Inside a stage: a disk-full or permission error becomes one clear ``RunFolderError``."""
    try:
        yield
    except RunFolderError:
        raise
    except BaseException as err:
        clear = _stage_error(name, folder, err)
        if clear is None:
            raise
        raise clear from err


def _stage_error(name: str, folder: Path, err: BaseException) -> RunFolderError | None:
    """A clear error for a disk-full or permission failure inside a stage (None for other errors)."""
    folder = Path(folder)
    if is_disk_full(err):
        free = _free_mb(folder)
        return RunFolderError(
            f"stage {name}: the disk is full while writing {folder} ({free} MB free). Free space (or point "
            "hydra.run.dir / DISTILL_CACHE at a larger disk) and run the same command again: finished stages "
            "are kept and skipped, and nothing of this stage was left looking finished."
        )
    if isinstance(err, PermissionError):
        return RunFolderError(
            f"stage {name}: permission denied writing {getattr(err, 'filename', None) or folder}; make the folder "
            "writable or choose another one (hydra.run.dir for the run folder, DISTILL_CACHE or teacher.cache_dir "
            "for the shared cache), then run the same command again (finished stages are kept)."
        )
    return None


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (what ``shutil.disk_usage`` can measure)."""
    return next(p for p in [Path(path), *Path(path).parents] if p.exists())


def _free_mb(path: Path) -> str:
    return f"{shutil.disk_usage(_existing(path)).free / 1e6:.0f}"


def claim_run_dir(run_dir: Path, name: str, is_main: bool = True) -> None:
    """Check that ``run_dir`` can hold this experiment's run, before any weights load.

    Refuses a folder that belongs to another experiment (its ``manifest.json`` names another ``name``),
    one holding files this tool did not write, and one that cannot be written. Removes temporary
    folders left by a killed run.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunFolderError(
            f"hydra.run.dir: cannot write to {run_dir} ({err.strerror or err}); choose a writable folder "
            "with hydra.run.dir=DIR"
        ) from err
    if not is_main:  # the main process checks and claims; the others would race with its writes
        return
    previous = {}
    mf = run_dir / RUN_MANIFEST
    if mf.is_file():
        try:
            previous = json.loads(mf.read_text())
        except json.JSONDecodeError:
            previous = {}
        other = previous.get("name")
        if other != name:
            raise RunFolderError(
                f"hydra.run.dir: {run_dir} belongs to experiment {other!r} (see {mf}), not {name!r}. "
                "Choose another folder with hydra.run.dir=DIR, or delete it if that run is no longer needed."
            )
    else:
        foreign = [
            p.name
            for p in run_dir.iterdir()
            if p.name not in HYDRA_ENTRIES and not p.name.endswith(".log") and not p.name.startswith(".write-probe-")
        ]
        if foreign:
            raise RunFolderError(
                f"hydra.run.dir: {run_dir} already holds files that are not a run of this tool "
                f"({', '.join(sorted(foreign)[:5])}); choose an empty or new folder with hydra.run.dir=DIR"
            )
    for stale in [*run_dir.glob(".*.tmp-*"), *run_dir.glob("*/.*.tmp-*")]:
        log.info("removing %s, left by an interrupted run", stale)
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    write_json(
        mf,
        {
            **previous,
            "name": name,
            "status": "running",
            "command": sys.argv,
            "started": time.time(),
        },
    )


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Refuse to start when ``folder``'s disk has less than ``need_bytes`` free."""
    p = _existing(folder)
    free = shutil.disk_usage(p).free
    if free < need_bytes:
        raise RunFolderError(
            f"{what}: {p} has {free / 1e6:.0f} MB free but this run needs about {need_bytes / 1e6:.0f} MB "
            "(student, checkpoints with optimizer state, ONNX variants). Free space or choose another "
            "folder (hydra.run.dir=DIR, DISTILL_CACHE=DIR)."
        )
