"""GGUF teachers: checked from the file's header before any weights load, then dequantized once into a
standard Hugging Face folder (safetensors, config, tokenizer with its chat template, generation config)
with transformers' own GGUF support (the ``gguf`` package).

The folder is written under a temporary name, reloaded and compared with the GGUF-loaded model's logits
on a probe prompt, and only then renamed into place: a conversion that does not reproduce the file never
looks finished.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

from core.files import building
from families import FAMILIES, supported

log = logging.getLogger(__name__)
MAGIC = b"GGUF"
SUFFIX = ".gguf"
INFO_FILE = "gguf.json"
# The converted folder must reproduce the GGUF-loaded logits to this (float32 both ways: not a knob).
MAX_LOGIT_DIFF = 1e-4


def is_gguf(path: str | Path | None) -> bool:
    return path is not None and str(path).lower().endswith(SUFFIX)


@functools.lru_cache(maxsize=8)
def _metadata(path: str, size: int, mtime: float) -> dict:
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return load_gguf_checkpoint(path, return_tensors=False)


def gguf_config(path: str | Path) -> dict:
    """The HF config (as a dict) that transformers derives from the file's metadata; no tensors are read."""
    p = Path(path)
    st = p.stat()
    return dict(_metadata(str(p.resolve()), st.st_size, st.st_mtime)["config"])


def gguf_problems(path: str | Path, key: str) -> list[str]:
    """What is wrong with ``path`` as a GGUF causal LM we can use (empty when fine); header and metadata only."""
    p = Path(path)
    if not p.is_file():
        return [f"{key}: {p} does not exist; give a .gguf file or a local Hugging Face model folder"]
    with p.open("rb") as f:
        head = f.read(4)
    if head != MAGIC:
        return [
            f"{key}: {p} is not a GGUF file (it starts with {head!r}, not {MAGIC!r}); give a real .gguf model "
            "or a Hugging Face folder"
        ]
    try:
        import gguf  # noqa: F401
    except ImportError:
        return [f"{key}: reading {p} needs the gguf package: pip install gguf"]
    try:
        cfg = gguf_config(p)
    except Exception as err:  # transformers raises ValueError / KeyError / struct errors on bad files
        return [f"{key}: {p} is not a GGUF model transformers can load ({type(err).__name__}: {err})"]
    mt = cfg.get("model_type")
    if mt not in FAMILIES:
        return [f"{key}: {p} holds a {mt!r} model; supported families: {supported()}"]
    missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if not cfg.get(k)]
    if missing:
        return [f"{key}: {p} has no {', '.join(missing)} in its metadata; it is not a complete model (vocab-only?)"]
    return []


def file_sha256(path: str | Path) -> str:
    from core.hashing import sha256_file

    return sha256_file(Path(path))


def convert_gguf(path: str | Path, dest: str | Path, probe: str = "Turn on the seat heating.") -> Path:
    """Dequantize the GGUF model at ``path`` into the HF folder ``dest`` (float32 safetensors), checked
    against the GGUF-loaded logits. Returns ``dest``; writes ``gguf.json`` (source, hash, check) beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, dest = Path(path), Path(dest)
    t0 = time.time()
    folder, name = str(path.parent), path.name
    log.info("teacher: dequantizing %s into %s (once)", path, dest)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = tokenizer(probe, return_tensors="pt").input_ids
    with torch.no_grad():
        want = loaded(ids).logits
    # The GGUF-loaded model carries transformers' GGUF quantizer, which refuses to save; its weights are
    # already dequantized, so they move into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    del loaded
    with building(dest) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        del model
        again = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32).eval()
        with torch.no_grad():
            diff = (again(ids).logits - want).abs().max().item()
        if diff > MAX_LOGIT_DIFF:
            raise RuntimeError(
                f"teacher.path: the folder converted from {path} does not reproduce its logits (max |diff| {diff:.2e} "
                f"> {MAX_LOGIT_DIFF}); the conversion is not kept"
            )
        info = {
            "source": str(path.resolve()),
            "sha256": file_sha256(path),
            "bytes": path.stat().st_size,
            "model_type": again.config.model_type,
            "probe_tokens": ids.shape[1],
            "max_logit_diff": diff,
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    log.info("teacher: %s converted in %.0f s (logits reproduced, max |diff| %.1e)", path.name, time.time() - t0, diff)
    return dest
