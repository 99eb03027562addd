"""On a CUDA device: the same distillation in bf16 autocast follows the fp32 CPU run, and a teacher loaded
in 4-bit (bitsandbytes nf4) gives logits close to its full-precision self. Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_config

from distill.config import compose
from distill.data import encode_records, load_records
from distill.train import make_accelerator, make_mode, train
from families.hf import build_from_config, load_causal_lm

pytestmark = pytest.mark.gpu


def _setup(tokenizer, teacher_dir):
    rc = compose(["+exp=smoke", "distill.train.steps=20", "distill.train.checkpoint_every=0"])
    data = encode_records(tokenizer, load_records(rc.data, "train"), 128)
    student = build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=3)
    return rc, data, student, load_causal_lm(teacher_dir)


def test_bf16_distillation_on_cuda_follows_fp32_on_cpu(tokenizer, teacher_dir):
    rc, data, student, teacher = _setup(tokenizer, teacher_dir)
    tc = rc.distill.train
    cpu = train(
        copy.deepcopy(student),
        tokenizer,
        data,
        tc,
        accelerator=make_accelerator("no"),
        mode=make_mode(rc.distill, teacher=copy.deepcopy(teacher)),
    )
    gpu_acc = make_accelerator("auto")  # bf16 where supported
    assert gpu_acc.device.type == "cuda" and gpu_acc.mixed_precision == "bf16"
    gpu = train(student, tokenizer, data, tc, accelerator=gpu_acc, mode=make_mode(rc.distill, teacher=teacher))
    a, b = [r["loss"] for r in cpu.history], [r["loss"] for r in gpu.history]
    assert len(a) == len(b) == tc.steps
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 0.05 * abs(x) + 1e-3, (a, b)


def test_nf4_teacher_on_cuda_stays_close_to_full_precision(tokenizer, teacher_dir):
    pytest.importorskip("bitsandbytes")
    full = load_causal_lm(teacher_dir).cuda()
    nf4 = load_causal_lm(teacher_dir, "nf4")
    ids = torch.tensor([tokenizer("Set the driver temperature to 22 degrees")["input_ids"]], device="cuda")
    with torch.no_grad():
        p = torch.log_softmax(full(ids).logits.float(), -1)
        q = torch.log_softmax(nf4(ids).logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean()
    assert float(kl) < 0.05
