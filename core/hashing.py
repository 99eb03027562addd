"""Hashes: of files, of model folders, and of JSON-able objects (stage keys, cache keys)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

MANIFEST = "stage.json"  # a stage folder's manifest: never part of the folder's own hash


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path, exclude: tuple[str, ...] = (MANIFEST, "metrics.json")) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex), except manifests and later metrics."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in exclude
    }


HASHED_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".jinja")


def folder_hash(folder: str | Path) -> str:
    """Content hash of a model folder's files that change what it computes or how it is prompted: weights,
    configs (generation_config.json included), tokenizer files and the chat template (chat_template.jinja)."""
    h = hashlib.sha256()
    folder = Path(folder)
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in HASHED_SUFFIXES and p.name != MANIFEST:
            h.update(p.name.encode())
            with p.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def digest(obj) -> str:
    """16 hex digits naming a JSON-able object (key order does not matter)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in (d or {}).items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
