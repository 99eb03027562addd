"""Model families: everything that differs between decoder architectures, per ``model_type``, in one place.

A ``Family`` says where a model keeps its decoder layers, attention and MLP outputs and norms; how its
weights map to and from the canonical Llama names that pruning works on (Phi-3 fuses ``qkv_proj`` and
``gate_up_proj``; Llama, Qwen and Mistral need no mapping); what its norm computes; and the parameters
a layer holds beyond the canonical ones (biases, per-head norms). ``FAMILIES`` is the one list of
supported families: config checks, folder checks, pruning, the trainer's hooks and export read it.

Adding a family is one module here (see ``phi3.py``, built on ``base.Family``) and its line in ``FAMILIES``,
plus tests.
No torch at import.
"""

from __future__ import annotations

from families import gemma, llama, phi3
from families.base import Family, head_dim


def _families() -> dict[str, Family]:
    return {f.model_type: f for f in (*llama.FAMILIES, phi3.PHI3, *gemma.FAMILIES)}


class UnsupportedFamily(ValueError):
    """A model_type with no entry in FAMILIES."""


def family(cfg_or_type) -> Family:
    """The ``Family`` of a config dict, an HF config object, a model, or a ``model_type`` string."""
    if isinstance(cfg_or_type, str):
        mt = cfg_or_type
    elif isinstance(cfg_or_type, dict):
        mt = cfg_or_type.get("model_type")
    else:
        config = getattr(cfg_or_type, "config", cfg_or_type)
        mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        raise UnsupportedFamily(f"model_type {mt!r} is not supported; supported: {supported()}")
    return FAMILIES[mt]


def supported() -> str:
    return ", ".join(FAMILIES)


def count_params(cfg: dict, sizes: dict | None = None) -> int:
    """Parameters of the family's decoder with ``sizes`` (default: the config's own), counted analytically
    from the config alone (no torch)."""
    s = {**cfg, **(sizes or {})}
    h, i, nh, n = s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_hidden_layers"]
    kv = s.get("num_key_value_heads") or nh
    hd = head_dim(cfg)
    attn = h * nh * hd + 2 * h * kv * hd + nh * hd * h
    mlp = 3 * h * i
    layer = attn + mlp + 2 * h + family(cfg).extra_layer_params(cfg, h, nh, kv, hd, i)
    emb = cfg["vocab_size"] * h * (1 if cfg.get("tie_word_embeddings", False) else 2)
    return emb + n * layer + h


# ---- module access on a loaded model (torch objects, but no torch import here) ----


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def unwrap(model):
    """The HF causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model):
    inner = unwrap(model)
    return _get(inner, family(inner).layers)


def backbone_and_head(model):
    """The decoder stack (returns ``last_hidden_state``) and the LM head module."""
    inner = unwrap(model)
    return _get(inner, family(inner).backbone), inner.get_output_embeddings()


LAYER_PARTS = ("attention", "attn_out", "mlp_out")


def layer_module(model, layer, part: str):
    """One part of a decoder layer of ``model``: ``attention``, ``attn_out`` or ``mlp_out``."""
    if part not in LAYER_PARTS:
        raise ValueError(f"unknown layer part {part!r}; one of {', '.join(LAYER_PARTS)}")
    return _get(layer, getattr(family(unwrap(model)), part))


def layer_norms(model, layer) -> list:
    """The norms of one decoder layer that read the residual stream, in the family's order."""
    return [_get(layer, path) for path in family(unwrap(model)).norms]


def final_norm(model):
    inner = unwrap(model)
    return _get(inner, family(inner).final_norm)


FAMILIES: dict[str, Family] = _families()
