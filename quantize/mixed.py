"""Sensitivity-aware mixed precision for weight-only ``MatMulNBits``: which weights get 8 bits, which 4.

``sensitivity`` measures, on task sequences, how far the model's next-token distributions move when one
weight alone is put on ONNX Runtime's int4 grid (``quantize.fake``, bit for bit the grid the file will
hold): mean KL(float || one-weight-int4) over the answer positions. ``plan`` starts from every weight at
4 bits and gives 8 bits to the weights that buy the most KL per extra byte until a size budget is spent
(KL treated as additive over weights: a first-order assumption the measured frontier checks).
``quantize_mixed`` builds the file with ONNX Runtime's own quantizer, 8-bit nodes first, then the rest
at 4 bits, and records the plan in ``quantization.json``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch

from quantize import fake


def weight_bytes(n: int, k: int, bits: int, block: int) -> int:
    """Bytes ``MatMulNBits`` stores for an (n out, k in) weight: packed integers + one fp32 scale a block."""
    blocks = -(-k // block)
    return n * blocks * (block * bits // 8) + n * blocks * 4


@torch.no_grad()
def sensitivity(
    model, sequences: Sequence[Sequence[int]], starts: Sequence[int], bits: int = 4, block: int = 32
) -> dict[str, float]:
    """Module name -> mean KL(float || model with that module's weight alone on the ``bits`` grid) per
    position from ``starts[i]`` on in sequence i (the answer positions: what the task reads). A tied
    embedding and LM head count as one weight (one tensor, one grid)."""
    from torch.nn.utils import parametrize

    model.eval()
    rows = [torch.tensor([list(s)]) for s in sequences]

    def logprobs():
        return [
            torch.log_softmax(model(input_ids=x).logits[0, st:].double(), -1)
            for x, st in zip(rows, starts, strict=True)
        ]

    base = logprobs()
    tokens = sum(b.shape[0] for b in base)
    out = {}
    from tqdm.auto import tqdm

    mods = fake.quantized_modules(model)
    done = set()
    for name, m in tqdm(mods.items(), desc="int4 sensitivity", unit="weight"):
        if id(m.weight) in done:  # the tied embedding: measured with the LM head
            continue
        done.add(id(m.weight))
        tied = [x for x in mods.values() if x is not m and x.weight is m.weight]
        for x in (m, *tied):
            parametrize.register_parametrization(x, "weight", fake.BlockFakeQuant(bits, block))
        try:
            kl = sum(float((torch.exp(p) * (p - q)).sum()) for p, q in zip(base, logprobs(), strict=True))
        finally:
            for x in (m, *tied):
                parametrize.remove_parametrizations(x, "weight", leave_parametrized=False)
        out[name] = kl / max(tokens, 1)
    return out


def plan(
    sens: dict[str, float],
    shapes: dict[str, tuple[int, int]],
    budget_bytes: int | None,
    block: int = 32,
    nodes: dict[str, str] | None = None,
) -> dict:
    """8 bits for the weights with the most KL per extra byte, while the weights' bytes stay within
    ``budget_bytes`` (None: the all-4-bit size, i.e. no 8-bit weight). ``nodes`` (module -> graph node,
    ``onnx_nodes``): modules sharing a node (the fused graph's q, k, v) are one choice, their KL and bytes
    summed. Returns ``{"eight_bit": [modules], "nodes": [8-bit nodes] (with ``nodes``), "bytes": ...,
    "predicted_kl": ...}`` (predicted: the sum of the 4-bit weights' sensitivities)."""
    unit_of = {n: (nodes or {}).get(n, n) for n in sens}
    units: dict[str, list[str]] = {}
    for n in sens:
        units.setdefault(unit_of[n], []).append(n)
    low = {u: sum(weight_bytes(*shapes[n], 4, block) for n in ms) for u, ms in units.items()}
    high = {u: sum(weight_bytes(*shapes[n], 8, block) for n in ms) for u, ms in units.items()}
    kl = {u: sum(sens[n] for n in ms) for u, ms in units.items()}
    total = sum(low.values())
    chosen = []
    budget = total if budget_bytes is None else budget_bytes
    for u in sorted(units, key=lambda u: kl[u] / max(high[u] - low[u], 1), reverse=True):
        extra = high[u] - low[u]
        if kl[u] > 0 and total + extra <= budget:  # (8 bits where int4 moves nothing buys nothing)
            chosen.append(u)
            total += extra
    eight = [n for u in chosen for n in units[u]]
    out = {
        "eight_bit": eight,
        "bytes": total,
        "predicted_kl": sum(v for n, v in sens.items() if n not in eight),
    }
    if nodes is not None:
        out["nodes"] = sorted(set(chosen))
    return out


def budget_plan(
    sens: dict[str, float], shapes: dict[str, tuple[int, int]], nodes: dict[str, str], fraction: float, block: int = 32
) -> dict:
    """``plan`` for a budget given as a share of what 8 bits everywhere would add: 0 = all int4, 1 = every
    weight at 8 bits (sizes of the weight matrices; the embedding and scales aside)."""
    low = sum(weight_bytes(*shapes[n], 4, block) for n in sens)
    high = sum(weight_bytes(*shapes[n], 8, block) for n in sens)
    budget = int(low + fraction * (high - low))
    return {**plan(sens, shapes, budget, block, nodes=nodes), "budget_fraction": fraction, "budget_bytes": budget}


def onnx_nodes(model, onnx_file: str | Path) -> dict[str, str]:
    """Module name -> the MatMul node in the exported graph that holds its weight (matched by value: the
    export stores each Linear weight transposed, bit for bit)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_file)).graph
    inits = {i.name: i for i in graph.initializer}

    def key(a) -> str:
        return hashlib.sha1(a.tobytes()).hexdigest() + str(a.shape)

    by_value = {}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            by_value[key(numpy_helper.to_array(inits[node.input[1]]))] = node.name
    mods = fake.quantized_modules(model)
    linear = {n: m.weight.detach().float() for n, m in mods.items() if isinstance(m, torch.nn.Linear)}
    out = {}
    for name, w in linear.items():
        k = key(w.T.contiguous().numpy())
        if k in by_value:
            out[name] = by_value[k]
        elif name.endswith("self_attn.q_proj"):  # the fused graph: q, k, v packed in one MatMul
            p = name[: -len("q_proj")]
            parts = [linear.get(p + x) for x in ("q_proj", "k_proj", "v_proj")]
            if all(t is not None for t in parts):
                k = key(torch.cat(parts, 0).T.contiguous().numpy())
                if k in by_value:
                    out.update({p + x: by_value[k] for x in ("q_proj", "k_proj", "v_proj")})
    missing = [n for n in linear if n not in out]
    if missing:
        raise ValueError(
            f"{onnx_file}: no MatMul holds the weight of {', '.join(missing[:3])}"
            f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}: was it exported from this model?"
        )
    return out
