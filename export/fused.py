"""A fused decoder graph, written directly from the HF weights: ONNX Runtime's transformer kernels instead
of the hundreds of small ops a traced graph has per layer (``export.exporter: fused``).

Same inputs, outputs and cache layout as the traced graph (``export.onnx``), so the runner, the
quantizers, the gate and ``genai_config.json`` read it unchanged. Per decoder layer:

    SkipSimplifiedLayerNormalization   residual add + RMSNorm (the first layer: SimplifiedLayerNormalization)
    MatMul qkv (+ bias: Qwen2)         q, k and v in one MatMul (a plain weight, so the int4 / int8 quantizers
                                       reach it; int4 blocks run along the input, so packing changes no block)
    GroupQueryAttention                rotary, grouped KV heads without repeating them, cache in and out
    MatMul o, SkipSimplifiedLayerNormalization, MatMul gate, MatMul up, Sigmoid, Mul, Mul, MatMul down

Qwen3 (per-head q / k RMSNorm before rotary) keeps three MatMuls, two SimplifiedLayerNormalizations and two
RotaryEmbeddings per layer. About 11 nodes per layer against ~60 traced: a SmolLM2-135M decode step runs
324 nodes instead of 1,772, the same kernels as onnxruntime-genai's model builder writes (BENCHMARKS.md).

Padding. ``GroupQueryAttention`` reads ``seqlens_k`` as "keys 0..seqlens_k are valid" (right padding), so
every row gets the full length (``T - 1``) and the padded key columns are masked through ``attention_bias``
(the lowest float where ``attention_mask`` is 0): left-padded batches decode as the traced graph does.
Rotary inside the attention counts positions from the first column of the cache, so a left-padded row
is shifted by its padding, every key and query alike; rotary attention depends on position differences
only, so the result is the same (tested against PyTorch with left padding). ``position_ids`` stays an
input (unused except by Qwen3's separate rotary) so the contract does not change with the exporter.

Rotary tables. ``cos`` / ``sin`` are computed in the graph for rows ``0 .. T-1`` (the model's own
``inv_freq`` and ``attention_scaling``, so Llama-3 frequency scaling comes for free), not stored as
``max_position_embeddings`` rows: the file holds the weights and nothing else.

Limits (ONNX Runtime's ``GroupQueryAttention``): a step with several new tokens *and* a cache needs batch 1
(the runner prefills with an empty cache and decodes one token at a time, so it never asks); OpenVINO's
implementation of the op runs batch 1 only (the deployment batch, at which the pipeline's OpenVINO check
runs). The cache grows by concatenation under our runner; onnxruntime-genai runs it in one preallocated
buffer (``past_present_share_buffer``, written into ``genai_config.json``).
"""

from __future__ import annotations

import numpy as np

from core.onnx_files import past_names, present_names
from families import head_dim

MS = "com.microsoft"
FUSED_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # families whose layer is the one above
# ONNX Runtime's CPU GroupQueryAttention refuses other head sizes at run time ("head_size shall be a
# multiple of 16"), after the graph was written: checked from the config, before anything loads
GQA_HEAD_MULTIPLE = 16


class UnsupportedForFused(ValueError):
    """The model has something the fused graph does not implement (activation, sliding window, ...)."""


def check_fusable(config) -> None:
    """Raise ``UnsupportedForFused`` naming what a config (HF object or dict) needs that the fused graph
    lacks. Reads the config only: called before any weights load."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    mt = get("model_type")
    if mt not in FUSED_TYPES:
        raise UnsupportedForFused(
            f"export.exporter=fused supports model_type {', '.join(FUSED_TYPES)}, not {mt!r}: "
            "set export.exporter=dynamo"
        )
    act = get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedForFused(f"export.exporter=fused implements SiLU MLPs; this model's is {act!r}")
    partial = get("partial_rotary_factor", 1.0)
    if partial is not None and partial < 1.0:
        raise UnsupportedForFused(
            f"partial_rotary_factor {partial}: export.exporter=fused rotates whole heads; set export.exporter=dynamo"
        )
    hd = head_dim(config) if get("head_dim") or get("num_attention_heads") else GQA_HEAD_MULTIPLE
    if hd % GQA_HEAD_MULTIPLE:
        raise UnsupportedForFused(
            f"head_dim {hd} is not a multiple of {GQA_HEAD_MULTIPLE}, which ONNX Runtime's CPU GroupQueryAttention "
            "requires: set export.exporter=dynamo"
        )
    window = get("sliding_window")
    if window and get("use_sliding_window", mt == "mistral") and window < get("max_position_embeddings", 0):
        raise UnsupportedForFused(
            f"sliding_window {window} < max_position_embeddings: export.exporter=fused has no sliding window; "
            "set export.exporter=dynamo"
        )


class _Graph:
    def __init__(self):
        self.nodes, self.inits, self.count = [], [], {}

    def name(self, base: str) -> str:
        k = self.count.get(base, 0)
        self.count[base] = k + 1
        return base if k == 0 else f"{base}_{k}"

    def const(self, name: str, array) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(
        self, op_type: str, inputs, n_out: int = 1, name: str | None = None, domain: str = "", outputs=None, **attrs
    ):
        from onnx import helper

        node_name = self.name(name or op_type)
        outs = outputs or [f"{node_name}/out{i}" if n_out > 1 else f"{node_name}/out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, domain=domain, **attrs))
        return outs if len(outs) > 1 else outs[0]


def build_fused(model, opset: int = 18, pack: bool = True):
    """The fused ``onnx.ModelProto`` (float32) of an HF Llama / Mistral / Qwen2 / Qwen3 causal LM."""
    import torch

    config = model.config
    check_fusable(config)
    sd = {k: v.detach().to(torch.float32).numpy() for k, v in model.state_dict().items()}
    g = _Graph()
    shared = _shared_inputs(g, model)
    table = sd["model.embed_tokens.weight"]
    x = g.op("Gather", [g.const("model.embed_tokens.weight", table), "input_ids"], name="embed/Gather", axis=0)
    residual = None
    for i in range(config.num_hidden_layers):
        x, residual = _layer(g, sd, model, i, x, residual, shared, pack)
    h = g.op(
        "SkipSimplifiedLayerNormalization",
        [x, residual, g.const("model.norm.weight", sd["model.norm.weight"])],
        4,
        "final_norm",
        MS,
        epsilon=float(config.rms_norm_eps),
    )[0]
    head = sd["lm_head.weight"] if "lm_head.weight" in sd else table
    g.op("MatMul", [h, g.const("lm_head.weight.T", head.T)], name="lm_head/MatMul", outputs=["logits"])
    return _model(g, config, opset)


def _linear(g: _Graph, sd: dict, x, prefix: str, label: str):
    out = g.op("MatMul", [x, g.const(f"{prefix}.weight.T", sd[prefix + ".weight"].T)], name=f"{label}/MatMul")
    if prefix + ".bias" in sd:
        out = g.op("Add", [out, g.const(f"{prefix}.bias", sd[prefix + ".bias"])], name=f"{label}/Add")
    return out


def _shared_inputs(g: _Graph, model) -> dict:
    """What every layer reads: the padding bias (B,1,S,T), the lengths GroupQueryAttention takes, and the
    rotary tables for rows 0 .. T-1."""
    import torch
    from onnx import TensorProto

    f32 = np.float32
    mask_f = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT, name="mask/Cast")
    pad = g.op("Sub", [g.const("one", np.array(1, f32)), mask_f], name="mask/Sub")  # 1 on padding
    bias = g.op("Mul", [pad, g.const("lowest", np.array(np.finfo(f32).min, f32))], name="mask/Mul")
    bias = g.op(
        "Unsqueeze", [bias, g.const("axes_1_2", np.array([1, 2], np.int64))], name="mask/Unsqueeze"
    )  # (B,1,1,T), then (B,1,S,T) below
    seq = g.op("Shape", ["input_ids"], name="seq/Shape", start=1, end=2)  # (1,)
    ones = g.const("ones_1", np.array([1], np.int64))
    bias = g.op(
        "Expand", [bias, g.op("Concat", [ones, ones, seq, ones], name="mask/Concat", axis=0)], name="mask/Expand"
    )
    tshape = g.op("Shape", ["attention_mask"], name="mask/Shape")
    total64 = g.op("Gather", [tshape, g.const("i1", np.array(1, np.int64))], name="mask/Gather", axis=0)
    total = g.op("Cast", [total64], to=TensorProto.INT32, name="total/Cast")  # scalar
    bsz = g.op("Gather", [tshape, g.const("i0", np.array([0], np.int64))], name="batch/Gather", axis=0)  # (1,)
    tminus1 = g.op("Sub", [total, g.const("one_i32", np.array(1, np.int32))], name="seqlens/Sub")
    seqlens = g.op("Expand", [tminus1, bsz], name="seqlens/Expand")  # (B,) all T-1: padding is in the bias

    rot = model.model.rotary_emb
    inv_freq = rot.inv_freq.detach().to(torch.float32).numpy().reshape(1, -1)
    scaling = float(getattr(rot, "attention_scaling", 1.0))
    # rows 0 .. T-1 (T = attention_mask's length, past + new): every position of this call is below T
    rows = g.op("Range", [g.const("zero64", np.array(0, np.int64)), total64, g.const("one64", np.array(1, np.int64))])
    rows = g.op(
        "Unsqueeze",
        [g.op("Cast", [rows], to=TensorProto.FLOAT, name="rope/Cast"), g.const("axis1", np.array([1], np.int64))],
    )
    angles = g.op("Mul", [rows, g.const("inv_freq", inv_freq)], name="rope/Mul")  # (T, head_dim / 2)
    cos, sin = g.op("Cos", [angles], name="rope/Cos"), g.op("Sin", [angles], name="rope/Sin")
    if scaling != 1.0:
        s = g.const("rope_scaling", np.array(scaling, f32))
        cos, sin = g.op("Mul", [cos, s], name="rope/cos_scale"), g.op("Mul", [sin, s], name="rope/sin_scale")
    return {"bias": bias, "total": total, "seqlens": seqlens, "cos": cos, "sin": sin}


def _layer(g: _Graph, sd: dict, model, i: int, x, residual, shared: dict, pack: bool):
    """Decoder layer ``i``: returns (its output, the residual stream) for the next layer's fused norm."""
    config = model.config
    nh, kv, hd, eps = (
        config.num_attention_heads,
        config.num_key_value_heads,
        head_dim(config),
        float(config.rms_norm_eps),
    )
    cos, sin = shared["cos"], shared["sin"]
    p = f"model.layers.{i}"
    norm_w = g.const(f"{p}.input_layernorm.weight", sd[f"{p}.input_layernorm.weight"])
    if residual is None:
        h = g.op("SimplifiedLayerNormalization", [x, norm_w], name=f"{p}/input_norm", axis=-1, epsilon=eps)
        residual = x
    else:
        h, _, _, residual = g.op(
            "SkipSimplifiedLayerNormalization", [x, residual, norm_w], 4, f"{p}/input_norm", MS, epsilon=eps
        )
    qkv_names = [f"{p}.self_attn.{c}_proj" for c in "qkv"]
    if pack and f"{p}.self_attn.q_norm.weight" not in sd:
        # One MatMul for q, k, v; GroupQueryAttention applies rotary itself, at positions counted from
        # the first column of the cache (a left-padded row is shifted by its padding, every key and
        # query alike, and rotary attention depends on position differences only)
        wqkv = np.concatenate([sd[c + ".weight"] for c in qkv_names], 0)
        qkv = g.op("MatMul", [h, g.const(f"{p}.self_attn.qkv_proj.weight.T", wqkv.T)], name=f"{p}/attn/qkv_proj/MatMul")
        if qkv_names[0] + ".bias" in sd:
            b = np.concatenate([sd[c + ".bias"] for c in qkv_names], 0)
            qkv = g.op("Add", [qkv, g.const(f"{p}.self_attn.qkv_proj.bias", b)], name=f"{p}/attn/qkv_proj/Add")
        attn_in, rotary, rot_in = [qkv, "", ""], {"do_rotary": 1}, [cos, sin]
    else:
        q = _linear(g, sd, h, qkv_names[0], f"{p}/attn/q_proj")
        k = _linear(g, sd, h, qkv_names[1], f"{p}/attn/k_proj")
        v = _linear(g, sd, h, qkv_names[2], f"{p}/attn/v_proj")
        for which, heads in (("q", nh), ("k", kv)):
            key = f"{p}.self_attn.{which}_norm.weight"
            if key in sd:  # Qwen3: RMSNorm over each head's channels, before rotary
                t = q if which == "q" else k
                t = g.op("Reshape", [t, g.const(f"{p}/{which}_heads", np.array([0, 0, heads, hd], np.int64))])
                t = g.op("SimplifiedLayerNormalization", [t, g.const(key, sd[key])], axis=-1, epsilon=eps)
                t = g.op("Reshape", [t, g.const(f"{p}/{which}_flat", np.array([0, 0, heads * hd], np.int64))])
                q, k = (t, k) if which == "q" else (q, t)
        q = g.op("RotaryEmbedding", [q, "position_ids", cos, sin], name=f"{p}/attn/q_rotary", domain=MS, num_heads=nh)
        k = g.op("RotaryEmbedding", [k, "position_ids", cos, sin], name=f"{p}/attn/k_rotary", domain=MS, num_heads=kv)
        attn_in, rotary, rot_in = [q, k, v], {}, ["", ""]
    past_k, past_v = past_names(i + 1)[-2:]
    present_k, present_v = present_names(i + 1)[-2:]
    attn = g.op(
        "GroupQueryAttention",
        [*attn_in, past_k, past_v, shared["seqlens"], shared["total"], *rot_in, "", shared["bias"]],
        name=f"{p}/attn/GroupQueryAttention",
        domain=MS,
        outputs=[f"{p}/attn/out", present_k, present_v],
        num_heads=nh,
        kv_num_heads=kv,
        scale=float(getattr(model.model.layers[i].self_attn, "scaling", hd**-0.5)),
        **rotary,
    )[0]
    o = _linear(g, sd, attn, f"{p}.self_attn.o_proj", f"{p}/attn/o_proj")
    h, _, _, residual = g.op(
        "SkipSimplifiedLayerNormalization",
        [o, residual, g.const(f"{p}.post_attention_layernorm.weight", sd[f"{p}.post_attention_layernorm.weight"])],
        4,
        f"{p}/post_attention_norm",
        MS,
        epsilon=eps,
    )
    gate = _linear(g, sd, h, f"{p}.mlp.gate_proj", f"{p}/mlp/gate_proj")
    up = _linear(g, sd, h, f"{p}.mlp.up_proj", f"{p}/mlp/up_proj")
    act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}/mlp/Sigmoid")], name=f"{p}/mlp/silu")
    return _linear(
        g, sd, g.op("Mul", [act, up], name=f"{p}/mlp/Mul"), f"{p}.mlp.down_proj", f"{p}/mlp/down_proj"
    ), residual


def _model(g: _Graph, config, opset: int):
    """The graph's inputs and outputs (the contract of ``core.onnx_files``) around its nodes."""
    from onnx import TensorProto, helper

    n, kv, hd = config.num_hidden_layers, config.num_key_value_heads, head_dim(config)
    past_shape = ["batch", kv, "past_sequence", hd]
    present_shape = ["batch", kv, "total_sequence", hd]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
        *[helper.make_tensor_value_info(nm, TensorProto.FLOAT, past_shape) for nm in past_names(n)],
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", config.vocab_size]),
        *[helper.make_tensor_value_info(nm, TensorProto.FLOAT, present_shape) for nm in present_names(n)],
    ]
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, initializer=g.inits)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)], producer_name="car-distill"
    )
    proto.ir_version = 10
    return proto
