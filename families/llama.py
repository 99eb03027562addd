"""Llama, Mistral, Qwen2 and Qwen3: separate q/k/v/o and gate/up/down projections, RMSNorm.

They differ only in extra parameters: Qwen2 always has q/k/v biases; Llama, Mistral and Qwen3 have
q/k/v/o biases when ``attention_bias``; Qwen3 adds per-head ``q_norm`` / ``k_norm`` over head_dim;
``mlp_bias`` adds MLP biases.
"""

from __future__ import annotations

from families.base import Family


def _mlp_bias(cfg: dict, h: int, i: int) -> int:
    return 2 * i + h if cfg.get("mlp_bias") else 0


def _llama_extra(cfg, h, nh, kv, hd, i) -> int:
    attn = nh * hd + 2 * kv * hd + h if cfg.get("attention_bias") else 0
    return attn + _mlp_bias(cfg, h, i)


def _qwen2_extra(cfg, h, nh, kv, hd, i) -> int:
    return nh * hd + 2 * kv * hd + _mlp_bias(cfg, h, i)  # q/k/v biases, no o_proj bias


def _qwen3_extra(cfg, h, nh, kv, hd, i) -> int:
    return _llama_extra(cfg, h, nh, kv, hd, i) + 2 * hd  # + q_norm, k_norm


LLAMA = Family("llama", "Llama", hidden_multiple_of_heads=True, extra_layer_params=_llama_extra)
MISTRAL = Family("mistral", "Mistral", extra_layer_params=_llama_extra)
QWEN2 = Family("qwen2", "Qwen2", extra_layer_params=_qwen2_extra)
QWEN3 = Family("qwen3", "Qwen3", extra_layer_params=_qwen3_extra)
FAMILIES = (LLAMA, QWEN2, QWEN3, MISTRAL)
