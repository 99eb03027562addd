"""Hugging Face model folders: the checks that must pass before any weights load, loading (optional
8-bit / nf4), building from a config, saving atomically, parameter counts."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from core.files import building
from families import FAMILIES, supported

log = logging.getLogger(__name__)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def read_config(folder: str | Path) -> dict:
    """config.json of an HF folder as a dict, without importing torch."""
    path = Path(folder) / "config.json"
    return json.loads(path.read_text())


def folder_problems(
    folder: str | Path, key: str, allow_pickle: bool = False, trust_remote_code: bool = False
) -> list[str]:
    """What is wrong with ``folder`` as an HF causal-LM folder (empty list when fine). No weights load:
    safetensors files are checked from their headers and sizes, the tokenizer against the embedding."""
    folder = Path(folder)
    if not folder.is_dir():
        return [
            f"{key}: {folder} is not a folder; give a local Hugging Face model folder (config.json + *.safetensors)"
        ]
    problems = []
    if not (folder / "config.json").is_file():
        return [f"{key}: {folder} has no config.json, so it is not a Hugging Face model folder"]
    try:
        cfg = read_config(folder)
    except json.JSONDecodeError as err:
        return [f"{key}: {folder}/config.json is not valid JSON ({err})"]
    mt = cfg.get("model_type")
    if cfg.get("auto_map") and not trust_remote_code:
        problems.append(
            f"{key}: {folder} needs its own Python code (auto_map in config.json), which runs on load; "
            "refused. Set teacher.trust_remote_code=true only if you trust that code"
        )
    if mt not in FAMILIES and not (cfg.get("auto_map") and trust_remote_code):
        problems.append(f"{key}: model_type {mt!r} in {folder}/config.json is not supported; supported: {supported()}")
    has_st = any((folder / f).is_file() for f in WEIGHT_FILES)
    has_pickle = any((folder / f).is_file() for f in PICKLE_FILES)
    if not has_st and has_pickle and not allow_pickle:
        problems.append(
            f"{key}: {folder} holds only pickle weights (pytorch_model.bin), which can run code when loaded; "
            "convert them to safetensors, or set allow_pickle=true if you trust the file"
        )
    elif not has_st and not has_pickle:
        problems.append(f"{key}: {folder} has no model.safetensors (or sharded index)")
    if has_st:
        problems += safetensors_problems(folder, key)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        problems.append(f"{key}: {folder} has no tokenizer (tokenizer.json); save the tokenizer beside the model")
    elif isinstance(cfg.get("vocab_size"), int):
        n = tokenizer_size(folder, trust_remote_code)
        if n is not None and n > cfg["vocab_size"]:
            problems.append(
                f"{key}: the tokenizer in {folder} has {n} tokens but config.json's vocab_size is {cfg['vocab_size']}: "
                "ids past the embedding would crash; the tokenizer does not belong to this model (or resize the "
                "embeddings and save again)"
            )
    return problems


def tokenizer_size(folder: Path, trust_remote_code: bool = False) -> int | None:
    """Number of tokens of the folder's tokenizer (added tokens included), without loading weights."""
    try:
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code))
    except Exception:  # an unreadable tokenizer is reported when the run loads it, with its own message
        return None


def safetensors_problems(folder: Path, key: str) -> list[str]:
    """Truncated or corrupt safetensors files, found from each file's header and size alone."""
    import struct

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            return [f"{key}: {index} is not a valid safetensors index ({err})"]
    else:
        files = ["model.safetensors"]
    problems = []
    for name in files:
        path = folder / name
        if not path.is_file():
            problems.append(f"{key}: {path} is listed in the index but missing; copy the complete model folder")
            continue
        size = path.stat().st_size
        try:
            with path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} does not fit in {size} bytes")
                header = json.loads(f.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError) as err:
            problems.append(
                f"{key}: {path} is not a readable safetensors file ({err}); it is corrupt or not safetensors: "
                "copy or save it again"
            )
            continue
        if 8 + n + end != size:
            problems.append(
                f"{key}: {path} is truncated or corrupt: its header describes {8 + n + end} bytes but the file has "
                f"{size}; copy or save it again"
            )
    return problems


def vocab_problems(
    teacher_dir: str | Path, student_dir: str | Path, key: str, trust_remote_code: bool = False
) -> list[str]:
    """Teacher and student must share a tokenizer; their embedding tables may differ only by padding rows."""
    from transformers import AutoTokenizer

    t_tok = AutoTokenizer.from_pretrained(str(teacher_dir), trust_remote_code=trust_remote_code)
    s_tok = AutoTokenizer.from_pretrained(str(student_dir), trust_remote_code=trust_remote_code)
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    if tv != sv:
        diff = len(set(tv.items()) ^ set(sv.items()))
        return [
            f"{key}: the student's tokenizer ({student_dir}) differs from the teacher's ({teacher_dir}) in {diff} "
            f"token->id entries ({len(sv)} vs {len(tv)} tokens); logit distillation needs one shared tokenizer"
        ]
    problems = []
    n = len(t_tok)
    for name, folder in (("teacher", teacher_dir), ("student", student_dir)):
        rows = read_config(folder).get("vocab_size", 0)
        if rows < n:
            problems.append(f"{key}: the {name}'s embedding has {rows} rows but its tokenizer has {n} tokens")
    return problems


def config_param_count(config) -> int:
    """Parameters of a model built from ``config`` (on the meta device: no memory, exact for any dtype)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return param_count(AutoModelForCausalLM.from_config(config))


def param_count(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def load_causal_lm(
    folder: str | Path, quantization: str = "none", dtype: str = "float32", trust_remote_code: bool = False
):
    """Load an HF causal LM from a local folder; ``quantization`` in none | 8bit | nf4 (bitsandbytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": getattr(torch, dtype), "trust_remote_code": trust_remote_code}
    if quantization != "none":
        from core.offline import import_bitsandbytes

        if not import_bitsandbytes():  # pragma: no cover - depends on the install
            raise RuntimeError("teacher.quantization needs bitsandbytes: pip install bitsandbytes")
        from transformers import BitsAndBytesConfig

        if quantization == "8bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        elif quantization == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
            )
        else:
            raise ValueError(f"unknown quantization {quantization!r}")
    return AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)


def student_config(teacher_config: dict, overrides: dict):
    """An HF config for a student of the teacher's family: the teacher's config with ``overrides``.

    Keeps vocabulary, special token ids and rope settings; drops fields that no longer fit
    (``head_dim`` is recomputed unless given).
    """
    from transformers import AutoConfig

    base = {
        k: v
        for k, v in teacher_config.items()
        if not k.startswith("_") and k not in ("architectures", "transformers_version")
    }
    if "hidden_size" in overrides or "num_attention_heads" in overrides:
        base.pop("head_dim", None)
    base.update({k: v for k, v in overrides.items() if v is not None})
    n = base.get("num_hidden_layers")
    if isinstance(base.get("layer_types"), list) and len(base["layer_types"]) != n:
        base["layer_types"] = (base["layer_types"] * n)[:n] if len(set(base["layer_types"])) == 1 else None
        if base["layer_types"] is None:
            base.pop("layer_types")
    if isinstance(base.get("max_window_layers"), int):
        base["max_window_layers"] = min(base["max_window_layers"], n)
    model_type = base.pop("model_type")
    return AutoConfig.for_model(model_type, **base)


def build_from_config(config, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_model_atomically(
    model,
    tokenizer,
    dest: str | Path,
    extra: dict[str, object] | None = None,
    state_dict: dict | None = None,
    tensors: dict[str, dict] | None = None,
) -> Path:
    """save_pretrained (safetensors) + tokenizer into a temporary sibling, then rename onto ``dest``.

    A crash never leaves a ``dest`` that looks finished. ``extra`` files (name -> JSON-able) and
    ``tensors`` files (name -> {key: tensor}, safetensors) are written beside the weights.
    """
    from safetensors.torch import save_file

    dest = Path(dest)
    with building(dest) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False))
        for name, ts in (tensors or {}).items():
            save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp / name))
    log.info("rank %s wrote %s", os.environ.get("RANK", "0"), dest)
    return dest
