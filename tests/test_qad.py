"""Quantization-aware distillation's numerics (``quantize.fake``) against ONNX Runtime itself.

References: ORT's C++ block quantizer (the grid must be bit for bit the one it computes), and the int4
ONNX file built from a baked model (its logits must be the fake-quantized PyTorch model's)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import as_exported, matmulnbits_weights, tiny_config

from export.onnx import export_onnx
from export.runtime import OnnxCausalLM
from families.hf import build_from_config, save_model_atomically
from quantize import fake, quantize_int4


def _ort_grid(w: torch.Tensor, bits: int, block: int):
    """ORT's own quantizer on a (out, in) torch weight: q (out, blocks, block), scales (out, blocks)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    n, k = w.shape
    blocks = -(-k // block)
    kn = np.zeros((blocks * block, n), np.float32)
    kn[:k] = w.T.numpy()
    packed = np.zeros((n, blocks, block * bits // 8), np.uint8)
    scales = np.zeros((n, blocks), np.float32)
    zp = np.zeros((n, blocks), np.uint8)
    (quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits)(packed, kn, scales, zp, block, n, k, True)
    q = np.stack([packed & 0xF, packed >> 4], -1).reshape(n, blocks, block) if bits == 4 else packed
    return q, scales


@pytest.mark.parametrize("bits", [4, 8])
def test_grid_is_onnx_runtimes_quantizer(bits):
    torch.manual_seed(0)
    k = 72  # not a multiple of the block: the last block is zero-padded
    w = torch.randn(48, k) * 0.05
    w[0, :32] = 0  # an all-zero block
    w[1, 3], w[1, 5] = 0.5, -0.5  # largest magnitude on both signs: the maximum wins
    mid = 2 ** (bits - 1)
    w[2, :32] = 0
    w[2, 0], w[2, 1], w[2, 2], w[2, 3] = -mid, 2.5, -3.5, 0.5  # scale 1: rounding ties after adding the zero point
    q, scale = fake.block_grid(w, bits, 32)
    q_ort, scale_ort = _ort_grid(w, bits, 32)
    np.testing.assert_array_equal(scale.numpy(), scale_ort)
    np.testing.assert_array_equal(q.numpy().reshape(48, -1)[:, :k], q_ort.reshape(48, -1)[:, :k])
    assert (q[2, 0, :4] - mid).tolist() == [-mid, 3, -3, 1]  # roundf: half away from zero, after + zero point
    # round to even instead (torch.round) would differ on the ties: the planted cases above catch it
    assert not torch.equal(torch.round(w[2, :4] / scale[2, 0]), (q[2, 0, :4] - mid))


def _trained_off_grid(tokenizer, model_type, tie, seqs, hidden=48):
    """A tiny model, fake-quantized and trained a few steps, so its float weights are off the grid."""
    cfg = tiny_config(tokenizer, model_type=model_type, hidden=hidden, inter=96, heads=4, kv=2, tie=tie)
    model = build_from_config(cfg, 0)
    names = fake.attach(model, bits=4, block=32)
    assert len(names) == 2 * 7 + (2 if tie else 1)  # 7 Linears a layer, the LM head, a tied embedding
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for s in seqs:
            ids = torch.tensor([s])
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize(
    "model_type,tie,exporter", [("qwen2", True, "dynamo"), ("llama", False, "dynamo"), ("qwen2", True, "fused")]
)
def test_exported_int4_computes_what_the_fake_quantized_model_computed(
    tmp_path, tokenizer, car_settings, model_type, tie, exporter
):
    """QAD's promise: train with ``fake.attach``, ``bake``, export, quantize with ORT's int4 (rtn, symmetric,
    the same block): the file holds exactly the trained grid and its logits are the fake-quantized PyTorch
    model's to float tolerance (ORT computing in float, ``accuracy_level`` 1), while the trained float
    weights themselves are far off (the tolerance resolves the grid). The fused graph packs q, k and v into
    one MatMul: int4 blocks run along the input, so the packed weight is the three grids side by side."""
    from tests.test_export import _prompts

    _, seqs = _prompts(tokenizer, car_settings, n=4)
    # (the fused graph's GroupQueryAttention needs head_dim a multiple of 8)
    model = _trained_off_grid(tokenizer, model_type, tie, seqs, hidden=64 if exporter == "fused" else 48)
    with torch.no_grad():
        want = [model(input_ids=torch.tensor([s])).logits[0].numpy() for s in seqs]
        latent = {n: m.parametrizations.weight.original.clone() for n, m in fake.quantized_modules(model).items()}
    raw = build_from_config(model.config, 0)  # the same trained floats without the grid
    raw.load_state_dict(
        {k.replace("parametrizations.weight.original", "weight"): v for k, v in model.state_dict().items()}
    )
    assert fake.bake(model) == len(latent) - (1 if tie else 0)  # a tied weight is written once
    assert fake.on_grid(model, 4, 32) and not fake.on_grid(raw, 4, 32)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    for name, m in fake.quantized_modules(model).items():  # baked = the grid of the trained float weights
        q, s = fake.block_grid(latent[name], 4, 32)
        assert torch.equal(m.weight.detach(), fake.dequantize(q, s, 4, latent[name].shape[1])), name

    def int4(m, name, **kw):
        hf = save_model_atomically(m, tokenizer, tmp_path / name / "hf")
        fp32 = export_onnx(hf, tmp_path / name / "fp32", exporter=exporter)
        return quantize_int4(fp32, tmp_path / name / "int4", block_size=32, algorithm="rtn", **kw)

    baked = int4(model, "baked", accuracy_level=1)
    got = OnnxCausalLM(baked).sequence_logits(seqs, 1)
    err = max(float(np.abs(a - b).max()) for a, b in zip(got, want, strict=True))
    assert err < 1e-4, err
    stored = matmulnbits_weights(baked)
    grids = {n: fake.dequantize(*fake.block_grid(w, 4, 32), 4, w.shape[1]).numpy() for n, w in latent.items()}
    trained = as_exported(grids, baked)
    per_layer = 5 if exporter == "fused" else 7
    assert len(stored) == 2 * per_layer + 1 and all(any(np.array_equal(w, t) for t in trained) for w in stored)
    if tie:  # the tied embedding as GatherBlockQuantized on the LM head's own integers: stored once
        folder = int4(model, "emb", accuracy_level=1, embedding=True)
        emb = OnnxCausalLM(folder).sequence_logits(seqs, 1)
        assert max(float(np.abs(a - b).max()) for a, b in zip(emb, want, strict=True)) < 1e-4
        info = json.loads((folder / "quantization.json").read_text())
        shared = info["settings"]["embedding_shared"]
        h = model.config.hidden_size
        assert shared["elements_changed"] == 0 and shared["bytes_saved"] >= 600 * h // 2
        assert info["bytes"] < json.loads((baked / "quantization.json").read_text())["bytes"] - 600 * h * 4 // 2
    # int8 activations (accuracy_level 4, the fast CPU path): close, not equal
    fast = OnnxCausalLM(int4(model, "fast", accuracy_level=4)).sequence_logits(seqs, 1)
    fast_err = max(float(np.abs(a - b).max()) for a, b in zip(fast, want, strict=True))
    with torch.no_grad():  # how far the grid is from the trained floats: what the tolerance must resolve
        off = [raw(input_ids=torch.tensor([s])).logits[0].numpy() for s in seqs]
    off_err = max(float(np.abs(a - b).max()) for a, b in zip(off, want, strict=True))
    assert off_err > 100 * max(err, 1e-6) and fast_err < off_err, (err, fast_err, off_err)
