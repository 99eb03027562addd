"""Divergences against reference formulas, and the chunked loss against the unchunked one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill import losses

torch.manual_seed(0)


def _logits(n=6, v=11, scale=3.0):
    return torch.randn(n, v) * scale, torch.randn(n, v) * scale


def test_forward_and_reverse_kl_match_torch_kl_div():
    s, t = _logits()
    ref_fwd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    ref_rev = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(losses.forward_kl(s, t), ref_fwd)
    torch.testing.assert_close(losses.reverse_kl(s, t), ref_rev)


def test_temperature_squared_factor():
    s, t = _logits()
    T = 2.5
    ref = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(losses.forward_kl(s, t, T), ref * T**2)


@pytest.mark.parametrize("name", list(losses.DIVERGENCES))
def test_zero_iff_equal_and_nonnegative(name):
    s, t = _logits()
    div = losses.divergence(name)
    assert torch.all(div(s, t) > 0)
    torch.testing.assert_close(div(t, t), torch.zeros(t.shape[0]), atol=1e-6, rtol=0)


def test_jsd_and_skew_against_explicit_mixtures():
    s, t = _logits()
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    beta = 0.3
    m = beta * pt + (1 - beta) * ps
    ref = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    torch.testing.assert_close(losses.generalized_jsd(s, t, beta=beta), ref)
    alpha = 0.2
    m = alpha * pt + (1 - alpha) * ps
    torch.testing.assert_close(losses.skew_kl(s, t, alpha=alpha), (pt * (pt / m).log()).sum(-1))
    torch.testing.assert_close(losses.skew_kl(s, t, alpha=0.0), losses.forward_kl(s, t))
    torch.testing.assert_close(losses.total_variation(s, t), 0.5 * (pt - ps).abs().sum(-1))
    assert torch.all(losses.total_variation(s, t) <= 1.0)


@pytest.mark.parametrize("name", list(losses.DIVERGENCES))
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_equals_unchunked_value_and_gradient(name, chunk):
    n, hs, ht, v_real, v_pad = 37, 16, 24, 50, 64
    g = torch.Generator().manual_seed(1)
    h_s = torch.randn(n, hs, generator=g, requires_grad=True)
    w_s = torch.randn(v_pad, hs, generator=g, requires_grad=True)  # padded rows beyond v_real
    h_t, w_t = torch.randn(n, ht, generator=g), torch.randn(v_real, ht, generator=g)
    tgt = torch.randint(0, v_real, (n,), generator=g)
    div = losses.divergence(name)

    # reference: full logits, the usual way
    ls = (h_s @ w_s.T)[:, :v_real]
    lt = (h_t @ w_t.T)[:, :v_real]
    ref = div(ls, lt, 2.0).sum() + 0.5 * F.cross_entropy(ls, tgt, reduction="sum")
    g_ref = torch.autograd.grad(ref, [h_s, w_s])

    got, kd, ce = losses.chunked_kd_loss(
        h_s,
        w_s,
        tgt,
        h_t,
        w_t,
        vocab_size=v_real,
        div=div,
        temperature=2.0,
        chunk_size=chunk,
        kd_weight=1.0,
        ce_weight=0.5,
    )
    g_got = torch.autograd.grad(got * 3.0, [h_s, w_s])  # an upstream factor scales the stored gradients
    g_ref = [g * 3.0 for g in g_ref]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kd + 0.5 * ce, ref, rtol=1e-5, atol=1e-4)
    assert not kd.requires_grad and not ce.requires_grad
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert torch.all(g_got[1][v_real:] == 0)  # padded vocabulary rows get no signal


def test_chunked_without_teacher_is_cross_entropy():
    h, w = torch.randn(9, 8), torch.randn(20, 8)
    tgt = torch.randint(0, 20, (9,))
    loss, kd, ce = losses.chunked_kd_loss(h, w, tgt, vocab_size=20, chunk_size=4, kd_weight=0.0, ce_weight=1.0)
    assert kd == 0
    torch.testing.assert_close(ce, F.cross_entropy(h @ w.T, tgt, reduction="sum"))
    torch.testing.assert_close(loss, ce)


def test_feature_loss():
    x = torch.randn(5, 8)
    torch.testing.assert_close(losses.feature_loss(x, 3 * x, "cosine"), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(losses.feature_loss(x, x + 1, "mse"), torch.ones(5))
    with pytest.raises(ValueError):
        losses.feature_loss(x, x, "l1")
