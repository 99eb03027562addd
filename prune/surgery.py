"""Apply a target shape to a model of any family in ``families``: pick what to keep from an
``Importance``, slice the state dict (in canonical Llama names: the family maps its own weights to
them and back), and load it into a fresh model built from the new config.

Building from the config (instead of patching modules in place) guarantees the result is exactly what
``AutoModelForCausalLM.from_pretrained`` rebuilds from the saved folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from families import family, head_dim
from prune.importance import Importance
from prune.plan import Shape


@dataclass
class Keep:
    """Indices kept, all sorted ascending; per-layer lists are indexed by *kept* layer."""

    layers: list[int]
    hidden: list[int]
    mlp: list[list[int]]
    q_heads: list[list[int]]  # teacher query-head indices, grouped by kept KV head, in order
    kv_heads: list[list[int]]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    # stable: ties keep the lower index, so planted-inert (all-zero) units are dropped deterministically
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def select(imp: Importance, cfg: dict, shape: Shape) -> Keep:
    """What to keep for ``shape``: the highest-scoring layers, channels and heads.

    Attention is pruned with grouped-query attention intact: KV groups are ranked by the summed
    scores of their query heads and the best ``num_key_value_heads`` are kept; inside each kept group
    the best ``num_attention_heads / num_key_value_heads`` query heads are kept.
    """
    n_layers = cfg["num_hidden_layers"]
    nh, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    g = nh // kv
    layers = _top(imp.layers, shape.num_hidden_layers) if shape.num_hidden_layers < n_layers else list(range(n_layers))
    hidden = _top(imp.hidden, shape.hidden_size)
    per = shape.num_attention_heads // shape.num_key_value_heads
    mlp, q_heads, kv_heads = [], [], []
    for layer in layers:
        mlp.append(_top(imp.mlp[layer], shape.intermediate_size))
        hs = imp.heads[layer]
        group_scores = torch.stack([hs[k * g : (k + 1) * g].sum() for k in range(kv)])
        groups = _top(group_scores, shape.num_key_value_heads)
        kv_heads.append(groups)
        q_heads.append([k * g + j for k in groups for j in _top(hs[k * g : (k + 1) * g], per)])
    return Keep(layers, hidden, mlp, q_heads, kv_heads)


def _rows(w: torch.Tensor, heads: list[int], hd: int) -> torch.Tensor:
    idx = torch.tensor([h * hd + d for h in heads for d in range(hd)], dtype=torch.long)
    return w.index_select(0, idx)


def prune_state_dict(sd: dict[str, torch.Tensor], cfg: dict, keep: Keep) -> dict[str, torch.Tensor]:
    """Slice a decoder state dict (the family's own names) to ``keep``. Norm weights are rescaled
    (``Family.rescale_norm``: by sqrt(H / H') for RMSNorm) so that a residual stream whose pruned
    channels are zero is normalised exactly as before."""
    fam = family(cfg)
    sd = fam.to_canonical(sd, cfg)
    hd = head_dim(cfg)
    H = cfg["hidden_size"]
    h_idx = torch.tensor(keep.hidden, dtype=torch.long)
    norm_scale = math.sqrt(H / len(keep.hidden))
    out: dict[str, torch.Tensor] = {}

    def cols(w):  # reads the residual stream
        return w.index_select(1, h_idx)

    tied = cfg.get("tie_word_embeddings", False)
    emb = cols(sd["model.embed_tokens.weight"])
    final_scale = norm_scale
    if fam.embed_scale:
        # the model multiplies embeddings by sqrt(hidden_size): sqrt(H') now, so the kept columns grow by
        # sqrt(H / H') to give the residual stream it had. A tied head reads that grown matrix too: the final
        # norm's gain, which would grow by the same sqrt(H / H'), stays as it was instead.
        emb = (emb.double() * norm_scale).to(emb.dtype)
        if tied:
            final_scale = 1.0
    out["model.embed_tokens.weight"] = emb
    out["model.norm.weight"] = fam.rescale_norm(sd["model.norm.weight"].index_select(0, h_idx), final_scale)
    if "lm_head.weight" in sd and not tied:
        out["lm_head.weight"] = cols(sd["lm_head.weight"])
    for new, old in enumerate(keep.layers):
        p, q = f"model.layers.{old}.", f"model.layers.{new}."
        qh, kvh, m_idx = keep.q_heads[new], keep.kv_heads[new], torch.tensor(keep.mlp[new], dtype=torch.long)
        a = "self_attn."
        out[q + a + "q_proj.weight"] = cols(_rows(sd[p + a + "q_proj.weight"], qh, hd))
        out[q + a + "k_proj.weight"] = cols(_rows(sd[p + a + "k_proj.weight"], kvh, hd))
        out[q + a + "v_proj.weight"] = cols(_rows(sd[p + a + "v_proj.weight"], kvh, hd))
        o = sd[p + a + "o_proj.weight"]
        o_idx = torch.tensor([h * hd + d for h in qh for d in range(hd)], dtype=torch.long)
        out[q + a + "o_proj.weight"] = o.index_select(1, o_idx).index_select(0, h_idx)
        for name, heads in (("q_proj", qh), ("k_proj", kvh), ("v_proj", kvh)):
            if p + a + name + ".bias" in sd:
                out[q + a + name + ".bias"] = _rows(sd[p + a + name + ".bias"], heads, hd)
        if p + a + "o_proj.bias" in sd:
            out[q + a + "o_proj.bias"] = sd[p + a + "o_proj.bias"].index_select(0, h_idx)
        for name in ("q_norm.weight", "k_norm.weight"):  # Qwen3, Gemma 3: per-head norms over head_dim, unchanged
            if p + a + name in sd:
                out[q + a + name] = sd[p + a + name].clone()
        mp = "mlp."
        out[q + mp + "gate_proj.weight"] = cols(sd[p + mp + "gate_proj.weight"].index_select(0, m_idx))
        out[q + mp + "up_proj.weight"] = cols(sd[p + mp + "up_proj.weight"].index_select(0, m_idx))
        out[q + mp + "down_proj.weight"] = sd[p + mp + "down_proj.weight"].index_select(1, m_idx).index_select(0, h_idx)
        for name, idx in (("gate_proj.bias", m_idx), ("up_proj.bias", m_idx), ("down_proj.bias", h_idx)):
            if p + mp + name in sd:
                out[q + mp + name] = sd[p + mp + name].index_select(0, idx)
        for name in fam.norms:  # every norm over the residual width (Gemma: four)
            out[q + name + ".weight"] = fam.rescale_norm(sd[p + name + ".weight"].index_select(0, h_idx), norm_scale)
    return {k: v.contiguous() for k, v in fam.from_canonical(out, cfg).items()}


def pruned_config(cfg: dict, keep: Keep) -> dict:
    """The teacher's config with the new sizes in its own field names (head_dim made explicit)."""
    new = dict(cfg)
    new.update(
        hidden_size=len(keep.hidden),
        intermediate_size=len(keep.mlp[0]),
        num_attention_heads=len(keep.q_heads[0]),
        num_key_value_heads=len(keep.kv_heads[0]),
        num_hidden_layers=len(keep.layers),
        head_dim=head_dim(cfg),
    )
    if isinstance(cfg.get("layer_types"), list):
        new["layer_types"] = [cfg["layer_types"][i] for i in keep.layers]
    if isinstance(cfg.get("max_window_layers"), int):
        new["max_window_layers"] = min(cfg["max_window_layers"], len(keep.layers))
    return new


def apply(model, imp: Importance, shape: Shape):
    """A new model of ``shape`` holding the kept weights of ``model`` (which is left untouched)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = model.config.to_dict()
    keep = select(imp, cfg, shape)
    sd = prune_state_dict({k: v.detach() for k, v in model.state_dict().items()}, cfg, keep)
    new_cfg = pruned_config(cfg, keep)
    model_type = new_cfg.pop("model_type")
    for k in ("architectures", "transformers_version", "_name_or_path"):
        new_cfg.pop(k, None)
    config = AutoConfig.for_model(model_type, **new_cfg)
    config.architectures = model.config.architectures
    pruned = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    if config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = pruned.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    pruned.generation_config = model.generation_config
    return pruned, keep
