"""Atomic folders and files: a crash never leaves an artifact that looks finished."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def temp_folder(dest: Path) -> Path:
    """A new hidden sibling of ``dest`` to build into (same filesystem, so the final rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))


def finish_folder(tmp: Path, dest: Path) -> Path:
    """Rename a completed temporary folder onto ``dest``, replacing an older one. Under a cache claim on
    ``dest`` that another job has taken over (``core.cache``), raise ``ClaimLost`` instead: the other job
    publishes the entry, and this one never replaces it under its readers."""
    from core.cache import CURRENT

    claim = CURRENT.get()
    if claim is not None and Path(claim.folder) == Path(dest):
        claim.check()
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
    return dest


@contextmanager
def building(dest: str | Path):
    """Build a folder under a temporary sibling name; on success it is renamed onto ``dest`` (replacing an
    older one), on any error it is removed: ``dest`` never looks finished while it is not."""
    dest = Path(dest)
    tmp = temp_folder(dest)
    try:
        yield tmp
        finish_folder(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, obj) -> None:
    """Write JSON under a temporary name, then rename: readers never see half a file."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=float))


def write_text(path: str | Path, text: str) -> None:
    """Write text under a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
