"""Importance estimators for structured pruning. Each returns an ``Importance``; higher = keep.

Activation-based scores follow Minitron (Muralidharan et al. 2024, arXiv:2407.14679, section 2.2):
computed from forward passes over a few calibration batches, no gradients:

- MLP channel j of layer l: mean |a_j| of the down-projection input ``act(gate(x)) * up(x)``.
- Attention head h of layer l: mean L2 norm of that head's output (the o_proj input slice).
- Hidden (embedding) channel c: mean |x_c| of the outputs of every RMSNorm (both norms of every layer
  and the final norm), i.e. how much each residual channel feeds the computation.
- Layer l (depth): "block influence", 1 - cos(input, output) of the block on the residual stream
  (ShortGPT, Men et al. 2024, arXiv:2403.03853): a block that barely changes the stream is redundant.

``magnitude_importance`` is the cheap alternative from weights alone (no data).
Shapes: ``mlp`` (L, I), ``heads`` (L, n_heads), ``hidden`` (H,), ``layers`` (L,).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import families
from families import decoder_layers, head_dim, layer_module


@dataclass
class Importance:
    mlp: torch.Tensor  # (L, I)
    heads: torch.Tensor  # (L, n_heads)
    hidden: torch.Tensor  # (H,)
    layers: torch.Tensor  # (L,)
    method: str


@torch.no_grad()
def activation_importance(model, batches: Iterable[dict]) -> Importance:
    """Minitron-style activation importance over calibration ``batches`` (dicts with input_ids, attention_mask)."""
    layers = decoder_layers(model)
    L, cfg = len(layers), model.config
    nh, hd = cfg.num_attention_heads, head_dim(cfg)
    mlp = torch.zeros(L, cfg.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(L, nh, dtype=torch.float64)
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    influence = torch.zeros(L, dtype=torch.float64)
    state = {"mask": None, "tokens": 0}
    handles = []

    def tokens(x):  # (B, T, D) -> (N, D) over real (non-padding) tokens
        m = state["mask"]
        return x.reshape(-1, x.shape[-1]) if m is None else x[m.bool()]

    def mlp_hook(i):
        def fn(_m, args):
            mlp[i] += tokens(args[0]).abs().double().sum(0)

        return fn

    def head_hook(i):
        def fn(_m, args):
            x = tokens(args[0]).double()
            heads[i] += x.view(x.shape[0], nh, hd).norm(dim=-1).sum(0)

        return fn

    def norm_hook(_m, _args, out):
        hidden.add_(tokens(out).abs().double().sum(0))

    def block_hook(i):
        def fn(_m, args, kwargs, out):
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos = F.cosine_similarity(tokens(x_in).double(), tokens(x_out).double(), dim=-1)
            influence[i] += (1 - cos).sum()

        return fn

    for i, layer in enumerate(layers):
        handles.append(layer_module(model, layer, "mlp_out").register_forward_pre_hook(mlp_hook(i)))
        handles.append(layer_module(model, layer, "attn_out").register_forward_pre_hook(head_hook(i)))
        for norm in families.layer_norms(model, layer):
            handles.append(norm.register_forward_hook(norm_hook))
        handles.append(layer.register_forward_hook(block_hook(i), with_kwargs=True))
    handles.append(families.final_norm(model).register_forward_hook(norm_hook))
    body, _ = families.backbone_and_head(model)
    was = model.training
    model.eval()
    try:
        for b in batches:
            state["mask"] = b.get("attention_mask")
            state["tokens"] += int(state["mask"].sum()) if state["mask"] is not None else b["input_ids"].numel()
            body(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    n = max(state["tokens"], 1)
    n_norms = len(families.family(model).norms) * L + 1
    return Importance(mlp / n, heads / n, hidden / (n * n_norms), influence / n, "activation")


@torch.no_grad()
def magnitude_importance(model) -> Importance:
    """Weight-magnitude importance, no data: L2 norms of the weights each unit reads and writes
    (read from the canonical state dict, so fused families score like the others)."""
    cfg = model.config.to_dict()
    fam = families.family(cfg)
    sd = fam.to_canonical({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    H, nh, hd = cfg["hidden_size"], cfg["num_attention_heads"], head_dim(cfg)
    mlp, heads, layer_score = [], [], []
    hidden = sd["model.embed_tokens.weight"].norm(dim=0).double()
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        down, up, gate = (sd[p + f"mlp.{n}_proj.weight"] for n in ("down", "up", "gate"))
        o = sd[p + "self_attn.o_proj.weight"]
        mlp.append((down.norm(dim=0) * (up.norm(dim=1) + gate.norm(dim=1))).double())
        heads.append(o.view(H, nh, hd).norm(dim=(0, 2)).double())
        layer_score.append(float(o.norm() + down.norm()))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        hidden += sum(fam.norm_gain(sd[p + name + ".weight"].double()).abs() for name in fam.norms)
    return Importance(
        torch.stack(mlp), torch.stack(heads), hidden, torch.tensor(layer_score, dtype=torch.float64), "magnitude"
    )
