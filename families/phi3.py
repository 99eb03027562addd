"""Phi-3 (and Phi-3.5 / Phi-4-mini): fused ``qkv_proj`` (rows: q heads, then k heads, then v heads) and
fused ``gate_up_proj`` (rows: gate channels, then up channels), RMSNorm, no biases.

Pruning works on canonical names: ``to_canonical`` splits the fused weights into q/k/v and gate/up,
``from_canonical`` fuses the kept rows back, so the pruned folder is an ordinary Phi-3 checkpoint.
"""

from __future__ import annotations

from families import Family, head_dim

_A, _M = "self_attn.", "mlp."


def _layer_prefixes(sd: dict, marker: str) -> list[str]:
    return sorted({k[: k.index(marker)] for k in sd if marker in k})


def _to_canonical(sd: dict, cfg: dict) -> dict:
    nh, kv, hd = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"], head_dim(cfg)
    out = dict(sd)
    for p in _layer_prefixes(sd, _A + "qkv_proj.weight"):
        w = out.pop(p + _A + "qkv_proj.weight")
        q, k, v = w.split([nh * hd, kv * hd, kv * hd], dim=0)
        out[p + _A + "q_proj.weight"], out[p + _A + "k_proj.weight"], out[p + _A + "v_proj.weight"] = q, k, v
    for p in _layer_prefixes(sd, _M + "gate_up_proj.weight"):
        gate, up = out.pop(p + _M + "gate_up_proj.weight").chunk(2, dim=0)
        out[p + _M + "gate_proj.weight"], out[p + _M + "up_proj.weight"] = gate, up
    return out


def _from_canonical(sd: dict, cfg: dict) -> dict:
    import torch

    out = dict(sd)
    for p in _layer_prefixes(sd, _A + "q_proj.weight"):
        parts = [out.pop(p + _A + f"{n}_proj.weight") for n in ("q", "k", "v")]
        out[p + _A + "qkv_proj.weight"] = torch.cat(parts, dim=0)
    for p in _layer_prefixes(sd, _M + "gate_proj.weight"):
        parts = [out.pop(p + _M + f"{n}_proj.weight") for n in ("gate", "up")]
        out[p + _M + "gate_up_proj.weight"] = torch.cat(parts, dim=0)
    return out


PHI3 = Family(
    "phi3",
    "Phi-3",
    to_canonical=_to_canonical,
    from_canonical=_from_canonical,
    notes=("longrope rope_parameters are sized by hidden_size // num_attention_heads: prune heads, not head_dim",),
)
