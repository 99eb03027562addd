"""Gemma 2 and Gemma 3 (``gemma2``, ``gemma3_text``): Llama's projections with Gemma's own arithmetic.

- Four norms per layer read or write the residual stream: ``input_layernorm`` and ``pre_feedforward_layernorm``
  before attention and MLP, ``post_attention_layernorm`` and ``post_feedforward_layernorm`` on their outputs
  before the residual add. All are RMSNorm with gain ``1 + w`` (``norm="rms1p"``), computed in float32.
- Token embeddings are multiplied by sqrt(hidden_size) inside the model (``embed_scale``); the embedding is
  tied to the LM head by default (for Gemma 3 270M it holds most of the parameters).
- Gemma 3 adds per-head ``q_norm`` / ``k_norm`` over head_dim; both interleave sliding-window and global
  layers (``layer_types``, kept per kept layer on pruning) and scale attention by
  ``query_pre_attn_scalar ** -0.5``, which pruning heads does not change. Gemma 2 soft-caps attention and
  final logits.
"""

from __future__ import annotations

from families.base import Family

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _extra(cfg, h, nh, kv, hd, i) -> int:
    attn = nh * hd + 2 * kv * hd + h if cfg.get("attention_bias") else 0
    return attn + 2 * h  # the two norms beyond the canonical two


def _gemma3_extra(cfg, h, nh, kv, hd, i) -> int:
    return _extra(cfg, h, nh, kv, hd, i) + 2 * hd  # + q_norm, k_norm


GEMMA2 = Family("gemma2", "Gemma 2", norms=NORMS, norm="rms1p", embed_scale=True, extra_layer_params=_extra)
GEMMA3 = Family("gemma3_text", "Gemma 3", norms=NORMS, norm="rms1p", embed_scale=True, extra_layer_params=_gemma3_extra)
FAMILIES = (GEMMA2, GEMMA3)
