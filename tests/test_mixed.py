"""Sensitivity-aware mixed precision (``quantize.mixed``) on a tiny model with a planted sensitive weight.

Planted truth: every weight already lies on the int4 grid (quantizing it again changes nothing) except
one MLP weight moved off it; the sensitivity must be zero everywhere but there, the plan must spend its
budget on it, and the built file must hold exactly that weight at 8 bits and be much closer to fp32 than
all-int4."""

from __future__ import annotations

import json

import numpy as np
import torch
from conftest import tiny_config

from export.onnx import export_onnx
from families.hf import build_from_config, save_model_atomically
from quantize import compare_to_source, fake, mixed, quantize_int4


def test_the_planted_sensitive_weight_gets_eight_bits(tmp_path, tokenizer, car_settings):
    from tests.test_export import _prompts

    prompts, seqs = _prompts(tokenizer, car_settings, n=6)
    model = build_from_config(tiny_config(tokenizer, hidden=64, inter=128), 0).eval()
    planted = "model.layers.1.mlp.down_proj"
    fake.attach(model, 4, 32)
    fake.bake(model)  # every weight on the int4 grid: putting it there again costs nothing ...
    with torch.no_grad():  # ... except the planted one, moved off it
        w = dict(model.named_modules())[planted].weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.abs().mean())
    hf = save_model_atomically(model, tokenizer, tmp_path / "hf")
    fp32 = export_onnx(hf, tmp_path / "fp32", exporter="dynamo")  # per-module nodes (fused packs q, k, v)
    sens = mixed.sensitivity(model, seqs, [len(p) - 1 for p in prompts], bits=4, block=32)
    assert len(sens) == 2 * 7 + 1  # every Linear; the tied embedding measured with the LM head
    assert sens[planted] > 0 and all(v == 0 for n, v in sens.items() if n != planted), sens
    shapes = {n: tuple(m.weight.shape) for n, m in dict(model.named_modules()).items() if n in sens}
    all4 = mixed.plan(sens, shapes, None)
    assert all4["eight_bit"] == [] and all4["predicted_kl"] == sum(sens.values())
    extra = mixed.weight_bytes(*shapes[planted], 8, 32) - mixed.weight_bytes(*shapes[planted], 4, 32)
    p = mixed.plan(sens, shapes, all4["bytes"] + extra)
    assert p["eight_bit"] == [planted] and p["bytes"] == all4["bytes"] + extra
    nodes = mixed.onnx_nodes(model, fp32 / "model.onnx")
    assert len(nodes) == 15 and len(set(nodes.values())) == 15
    plan = {**p, "nodes": [nodes[planted]]}
    q4 = quantize_int4(fp32, tmp_path / "int4", block_size=32, accuracy_level=1)  # float activations: weights alone
    qm = quantize_int4(fp32, tmp_path / "mixed", block_size=32, accuracy_level=1, eight_bit=plan)
    info = json.loads((qm / "quantization.json").read_text())
    assert info["settings"]["mixed_precision"]["eight_bit"] == [planted]
    import onnx
    from onnx import helper

    graph = onnx.load(str(qm / "model.onnx"), load_external_data=False).graph
    bits = {
        n.name: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
        for n in graph.node
        if n.op_type == "MatMulNBits"
    }
    assert sorted(bits.values()) == [4] * 14 + [8] and info["quantized"]["weight_matmuls_left_float"] == []
    size4 = json.loads((q4 / "quantization.json").read_text())["bytes"]
    assert abs(info["bytes"] - size4 - extra) < 0.01 * extra  # the plan's byte count is the file's
    _, probe = _prompts(tokenizer, car_settings, n=6)
    kl4, klm = compare_to_source(fp32, q4, probe)["kl"], compare_to_source(fp32, qm, probe)["kl"]
    assert klm < 0.2 * kl4, (klm, kl4)
    np.testing.assert_array_less(0, kl4)


def test_the_pipeline_scheme_plans_the_fused_graphs_packed_qkv_as_one_weight(tmp_path, tokenizer, car_settings):
    """``int4_mixed`` (``quantize_int4_mixed``: sensitivity, plan, build) on the fused graph, whose q, k and v
    share one MatMul: a planted off-grid k_proj makes its packed node the one 8-bit choice, paid for with
    all three weights' extra bytes; a budget one byte short of that buys nothing."""
    import onnx
    from onnx import helper

    from quantize import quantize_int4_mixed
    from tests.test_export import _prompts

    prompts, seqs = _prompts(tokenizer, car_settings, n=4)
    model = build_from_config(tiny_config(tokenizer, hidden=64, inter=128), 0).eval()  # head_dim 16
    planted = "model.layers.1.self_attn.k_proj"
    fake.attach(model, 4, 32)
    fake.bake(model)
    with torch.no_grad():
        w = dict(model.named_modules())[planted].weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(0)) * w.abs().mean())
    hf = save_model_atomically(model, tokenizer, tmp_path / "hf")
    fp32 = export_onnx(hf, tmp_path / "fp32", exporter="fused")
    nodes = mixed.onnx_nodes(model, fp32 / "model.onnx")
    assert len(nodes) == 15 and len(set(nodes.values())) == 11  # q, k, v of each layer: one node
    qkv = nodes[planted]
    assert qkv == nodes["model.layers.1.self_attn.q_proj"] == nodes["model.layers.1.self_attn.v_proj"]
    group = [f"model.layers.1.self_attn.{x}_proj" for x in "qkv"]
    shapes = {n: tuple(dict(model.named_modules())[n].weight.shape) for n in nodes}
    extra = sum(mixed.weight_bytes(*shapes[n], 8, 32) - mixed.weight_bytes(*shapes[n], 4, 32) for n in group)
    low = sum(mixed.weight_bytes(*s, 4, 32) for s in shapes.values())
    high = sum(mixed.weight_bytes(*s, 8, 32) for s in shapes.values())
    starts = [len(p) - 1 for p in prompts]
    common = dict(student=hf, sequences=seqs, starts=starts, block_size=32, accuracy_level=1)
    qm = quantize_int4_mixed(fp32, tmp_path / "mixed", budget=(extra + 0.5) / (high - low), **common)
    mp = json.loads((qm / "quantization.json").read_text())["settings"]["mixed_precision"]
    assert mp["nodes"] == [qkv] and sorted(mp["eight_bit"]) == sorted(group)
    assert max(mp["sensitivity"], key=mp["sensitivity"].get) == planted and mp["sensitivity_sequences"] == 4
    graph = onnx.load(str(qm / "model.onnx"), load_external_data=False).graph
    eight = [
        n.name
        for n in graph.node
        if n.op_type == "MatMulNBits"
        and helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits")) == 8
    ]
    assert len(eight) == 1 and eight[0].startswith(qkv)
    short = quantize_int4_mixed(fp32, tmp_path / "short", budget=(extra - 1) / (high - low), **common)
    assert json.loads((short / "quantization.json").read_text())["settings"]["mixed_precision"]["nodes"] == []
