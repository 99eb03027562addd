"""Model families: everything that differs between decoder architectures, per ``model_type``, in one place.

A ``Family`` says where a model keeps its decoder layers, attention and MLP outputs and norms; how its
weights map to and from the canonical Llama names that pruning works on (Phi-3 fuses ``qkv_proj`` and
``gate_up_proj``; Llama, Qwen and Mistral need no mapping); what its norm computes; and the parameters
a layer holds beyond the canonical ones (biases, per-head norms). ``FAMILIES`` is the one list of
supported families: config checks, folder checks, pruning, the trainer's hooks and export read it.

Adding a family is one module here (see ``phi3.py``) and its line in ``FAMILIES``, plus tests.
No torch at import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _same(sd: dict, cfg: dict) -> dict:
    return sd


@dataclass(frozen=True)
class Family:
    model_type: str
    label: str  # for messages: "Llama", "Qwen2", ...
    # Module paths, relative to the causal LM (``layers``, ``backbone``, ``final_norm``) or to one decoder
    # layer (the rest). ``attn_out``'s input is the concatenated head outputs, ``mlp_out``'s the MLP
    # channels: activation importance hooks both.
    backbone: str = "model"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    attention: str = "self_attn"
    attn_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"
    norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    # rms: y = x / rms(x) * w. Pruning H -> H' residual channels rescales w by sqrt(H / H') so a stream
    # whose dropped channels were zero is normalised exactly as before.
    norm: str = "rms"
    # The family's config refuses hidden_size % num_attention_heads != 0 (LlamaConfig does).
    hidden_multiple_of_heads: bool = False
    # Parameters of one layer beyond the canonical weight matrices and the two norms:
    # (config, hidden, query heads, kv heads, head_dim, intermediate) -> count.
    extra_layer_params: Callable[[dict, int, int, int, int, int], int] = lambda cfg, h, nh, kv, hd, i: 0
    # State dict (full model) <-> canonical Llama names: model.embed_tokens, model.norm, lm_head, and per
    # layer self_attn.{q,k,v,o}_proj (+ biases, q_norm / k_norm), mlp.{gate,up,down}_proj, input_layernorm,
    # post_attention_layernorm. Pruning slices those and nothing else.
    to_canonical: Callable[[dict, dict], dict] = _same
    from_canonical: Callable[[dict, dict], dict] = _same
    # Problems with a pruned shape that this family's config would refuse on reload: (config, sizes) -> problems.
    shape_problems: Callable[[dict, dict], list[str]] = lambda cfg, sizes: []

    def rescale_norm(self, weight, scale: float):
        """A norm weight after the residual width shrank by ``1 / scale**2`` (kept channels only)."""
        if self.norm == "rms":
            return weight * scale
        raise NotImplementedError(f"{self.label}: no residual-width rescale for norm kind {self.norm!r}")


def _families() -> dict[str, Family]:
    from families import llama, phi3

    return {f.model_type: f for f in (*llama.FAMILIES, phi3.PHI3)}


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


def head_dim(cfg) -> int:
    """Per-head width from a config dict or an HF config object (explicit ``head_dim`` wins)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    return get("head_dim") or get("hidden_size") // get("num_attention_heads")


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


FAMILIES: dict[str, Family] = _families()  # last: the family modules import the helpers above
