"""What a family is (``Family``) and the config arithmetic every family shares; the family modules build on
it and ``families`` lists them. No torch at import."""

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
    # rms: y = x / rms(x) * w; rms1p (Gemma): y = x / rms(x) * (1 + w). Pruning H -> H' residual channels
    # rescales the gain by sqrt(H / H') so a stream whose dropped channels were zero is normalised exactly
    # as before.
    norm: str = "rms"
    # The model multiplies the token embeddings by sqrt(hidden_size) (Gemma): pruning the width changes
    # that factor, so the kept embedding columns are rescaled to keep the residual stream as it was.
    embed_scale: bool = False
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
        """A norm weight whose gain is multiplied by ``scale`` (the residual width shrank by ``1 / scale**2``,
        kept channels only)."""
        if self.norm == "rms":
            return weight * scale
        if self.norm == "rms1p":  # gain 1 + w: (1 + w') = (1 + w) * scale, computed in float64 then cast back
            return ((1.0 + weight.double()) * scale - 1.0).to(weight.dtype)
        raise NotImplementedError(f"{self.label}: no residual-width rescale for norm kind {self.norm!r}")

    def norm_gain(self, weight):
        """The per-channel factor a norm weight applies (``w``, or ``1 + w`` for Gemma's norms)."""
        return 1.0 + weight if self.norm == "rms1p" else weight


def head_dim(cfg) -> int:
    """Per-head width from a config dict or an HF config object (explicit ``head_dim`` wins)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    return get("head_dim") or get("hidden_size") // get("num_attention_heads")
