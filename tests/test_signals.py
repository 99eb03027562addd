"""Cached top-k teacher signals against the live teacher: exact when k covers the vocabulary, a lower
bound with a known gap otherwise, and training on them equals training on the live teacher."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from core.chat import collate
from distill.config import compose
from distill.data import encode_records, load_records
from distill.losses import DIVERGENCES, forward_kl, topk_divergence
from distill.signals import TopKSignals, compute_topk, save_signals
from distill.train import make_accelerator, make_mode, teacher_signals, train
from families.hf import build_from_config, load_causal_lm


@pytest.fixture(scope="module")
def data(tokenizer):
    rc = compose(["+exp=smoke"])
    return encode_records(tokenizer, load_records(rc.data, "train")[:40], 128)


@pytest.fixture(scope="module")
def peaked_teacher(teacher_dir):
    """The tiny teacher with a sharpened head: a trained-like, peaked next-token distribution."""
    t = load_causal_lm(teacher_dir)
    with torch.no_grad():
        t.lm_head.weight.mul_(12.0)
    return t


def _live_logits(teacher, batch, vocab):
    sig = teacher_signals(teacher, batch, [], False)
    return F.linear(sig["hidden"], sig["head"][:vocab])


def test_cache_rows_line_up_with_the_live_teacher(peaked_teacher, tokenizer, data, tmp_path):
    """The cached signals of examples [3, 0, 7] (batch order) are the live teacher's top-k at the same
    positions: same token ids, same log-probabilities, and tail = log of the rest."""
    vocab, k, temp = len(tokenizer), 16, 2.0
    save_signals(
        compute_topk(peaked_teacher, data, tokenizer.pad_token_id, vocab, k, temp, chunk_size=7, batch_size=6),
        tmp_path,
        {},
    )
    cache = TopKSignals(tmp_path)
    assert len(cache) == len(data) and cache.k == k
    order = [3, 0, 7]
    idx, lp, tail = cache.batch(order)
    batch = collate([data[i] for i in order], tokenizer.pad_token_id)
    logp = F.log_softmax(_live_logits(peaked_teacher, batch, vocab) / temp, -1)
    assert idx.shape == (logp.shape[0], k)
    torch.testing.assert_close(lp, logp.gather(-1, idx.long()), atol=1e-5, rtol=0)
    torch.testing.assert_close(tail.exp(), 1 - lp.exp().sum(-1), atol=1e-5, rtol=0)
    assert torch.equal(idx.long(), logp.topk(k, -1).indices)


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_topk_covering_the_vocabulary_is_exact(name):
    torch.manual_seed(0)
    s, t = torch.randn(12, 50) * 3, torch.randn(12, 50) * 3
    from distill.losses import divergence

    div = divergence(name)
    lp = F.log_softmax(t / 2.0, -1)
    top, idx = lp.topk(50, -1)
    tail = lp.scatter(-1, idx, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(
        topk_divergence(s, idx, top, tail, div=div, temperature=2.0), div(s, t, 2.0), atol=1e-5, rtol=1e-5
    )


@torch.no_grad()
def test_forward_kl_gap_is_the_tail_term(peaked_teacher, tokenizer, data):
    """k < V: the top-k forward KL is a lower bound of the full KL and the gap is exactly
    p_tail * KL(teacher tail conditional || student tail conditional) (the documented approximation)."""
    vocab, temp = len(tokenizer), 1.0
    batch = collate(data[:8], tokenizer.pad_token_id)
    z_t = _live_logits(peaked_teacher, batch, vocab)
    torch.manual_seed(1)
    z_s = z_t + torch.randn_like(z_t) * 2.0  # a student that roughly follows the teacher
    full = forward_kl(z_s, z_t, temp)
    for k in (8, 32, 128):
        lp_t = F.log_softmax(z_t / temp, -1)
        top, idx = lp_t.topk(k, -1)
        tail = lp_t.scatter(-1, idx, float("-inf")).logsumexp(-1)
        approx = topk_divergence(z_s, idx, top, tail, div=forward_kl, temperature=temp)
        assert (approx <= full + 1e-5).all()
        mask = torch.ones_like(lp_t, dtype=torch.bool).scatter(-1, idx, False)
        lp_s = F.log_softmax(z_s / temp, -1)
        cond_t = lp_t.masked_fill(~mask, float("-inf")) - tail[:, None]
        cond_s = lp_s.masked_fill(~mask, float("-inf")) - lp_s.masked_fill(~mask, float("-inf")).logsumexp(-1, True)
        tail_kl = torch.where(mask, cond_t.exp() * (cond_t - cond_s), torch.zeros_like(cond_t)).sum(-1)
        torch.testing.assert_close(full - approx, tail.exp() * tail_kl, atol=1e-4, rtol=1e-4)
    # the peaked teacher keeps most of its mass in the top 32 of 600: the loss is within 5% of the full one
    lp_t = F.log_softmax(z_t, -1)
    top, idx = lp_t.topk(32, -1)
    tail = lp_t.scatter(-1, idx, float("-inf")).logsumexp(-1)
    approx = topk_divergence(z_s, idx, top, tail, div=forward_kl).sum().detach()
    assert float(approx) >= 0.95 * float(full.sum().detach())


@pytest.mark.parametrize("pack", [False, True])
def test_training_on_cached_signals_equals_the_live_teacher(pack, peaked_teacher, tokenizer, data, tmp_path):
    """Planted truth: with k = vocabulary the cached signals carry the full distribution, so three
    optimizer steps on them give the same student as three steps against the live teacher. With
    ``train.pack`` the examples change order inside a batch: their signals must follow them."""
    rc = compose(["+exp=smoke", "distill.features.weight=0.0", "distill.features.layer_map=[]"])
    tc = copy.deepcopy(rc.distill.train)
    tc.steps, tc.batch_size, tc.warmup_steps, tc.checkpoint_every, tc.eval_every = 3, 8, 0, 0, 0
    vocab = len(tokenizer)
    save_signals(
        compute_topk(
            peaked_teacher, data, tokenizer.pad_token_id, vocab, vocab, rc.distill.temperature, rc.distill.chunk_size
        ),
        tmp_path,
        {},
    )
    acc = make_accelerator("no")

    def student():
        return build_from_config(tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64), seed=3)

    live, cached = student(), student()
    r1 = train(live, tokenizer, data, tc, accelerator=acc, mode=make_mode(rc.distill, teacher=peaked_teacher))
    tc2 = copy.deepcopy(tc)
    tc2.pack = pack
    r2 = train(cached, tokenizer, data, tc2, accelerator=acc, mode=make_mode(rc.distill, signals=TopKSignals(tmp_path)))
    for a, b in zip(r1.history, r2.history, strict=True):
        assert abs(a["kd"] - b["kd"]) < 1e-4 * max(1.0, abs(a["kd"])) and a["kd"] > 0
    for p, q in zip(live.parameters(), cached.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
