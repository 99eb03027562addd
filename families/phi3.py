"""Phi-3 (and Phi-3.5 / Phi-4-mini): fused ``qkv_proj`` (rows: q heads, then k heads, then v heads) and
fused ``gate_up_proj`` (rows: gate channels, then up channels), RMSNorm, no biases.

Pruning works on canonical names: ``to_canonical`` splits the fused weights into q/k/v and gate/up,
``from_canonical`` fuses the kept rows back, so the pruned folder is an ordinary Phi-3 checkpoint.
"""

from __future__ import annotations

from families.base import Family, head_dim

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


def _shape_problems(cfg: dict, sizes: dict) -> list[str]:
    """Phi3Config checks longrope factors (Phi-3-*-128k) against hidden_size // num_attention_heads, not
    head_dim: a pruned shape must keep that ratio, or the folder no longer loads."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if (rope.get("rope_type") or rope.get("type")) not in ("longrope", "su", "yarn"):
        return []
    h, nh = sizes["hidden_size"], sizes["num_attention_heads"]
    want = cfg["hidden_size"] // cfg["num_attention_heads"]
    if h // nh != want:
        return [
            f"hidden_size={h} with num_attention_heads={nh}: this Phi-3 uses longrope, whose factors transformers "
            f"checks against hidden_size // num_attention_heads = {want}; choose sizes with hidden_size = "
            f"{want} x num_attention_heads (e.g. --hidden-size {want * nh}), or prune only the MLP and depth"
        ]
    return []


PHI3 = Family(
    "phi3",
    "Phi-3",
    to_canonical=_to_canonical,
    from_canonical=_from_canonical,
    shape_problems=_shape_problems,
)
