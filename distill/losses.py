"""Distillation losses as small pure functions, plus the chunked wrapper that never materialises
full-vocabulary logits of teacher and student for the whole batch.

Every divergence takes ``student_logits`` and ``teacher_logits`` of shape ``(N, V)`` (N tokens,
V vocabulary) and returns a per-token loss of shape ``(N,)``. With a temperature ``T`` both
distributions are softened as ``softmax(z / T)`` and the loss is multiplied by ``T**2`` so that its
gradient keeps the same scale as the cross-entropy term when T changes (Hinton et al. 2015,
arXiv:1503.02531, section 2).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Divergence = Callable[..., torch.Tensor]


def _logp(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def forward_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_teacher || p_student), shape (N,). Mode-covering; the classic KD loss (Hinton 2015)."""
    ls, lt = _logp(student_logits, temperature), _logp(teacher_logits, temperature)
    return (lt.exp() * (lt - ls)).sum(-1) * temperature**2


def reverse_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(p_student || p_teacher), shape (N,). Mode-seeking (MiniLLM, Gu et al. 2023, arXiv:2306.08543)."""
    ls, lt = _logp(student_logits, temperature), _logp(teacher_logits, temperature)
    return (ls.exp() * (ls - lt)).sum(-1) * temperature**2


def generalized_jsd(student_logits, teacher_logits, temperature: float = 1.0, beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, arXiv:2306.13649), shape (N,).

    ``M = beta * p_teacher + (1 - beta) * p_student``;
    ``JSD_beta = beta * KL(p_teacher || M) + (1 - beta) * KL(p_student || M)``.
    Tends to beta-scaled forward KL as beta -> 0 and reverse KL as beta -> 1 (after rescaling).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    ls, lt = _logp(student_logits, temperature), _logp(teacher_logits, temperature)
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), dim=0)
    kl_t = (lt.exp() * (lt - lm)).sum(-1)
    kl_s = (ls.exp() * (ls - lm)).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s) * temperature**2


def skew_kl(student_logits, teacher_logits, temperature: float = 1.0, alpha: float = 0.1) -> torch.Tensor:
    """Skew forward KL of DistiLLM (Ko et al. 2024, arXiv:2402.03898), shape (N,).

    ``KL(p_teacher || alpha * p_teacher + (1 - alpha) * p_student)``: bounded and smoother than
    forward KL when the student puts near-zero mass where the teacher does not. alpha=0 is forward KL.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    ls, lt = _logp(student_logits, temperature), _logp(teacher_logits, temperature)
    if alpha == 0.0:
        lm = ls
    else:
        lm = torch.logsumexp(torch.stack([lt + math.log(alpha), ls + math.log(1 - alpha)]), dim=0)
    return (lt.exp() * (lt - lm)).sum(-1) * temperature**2


def total_variation(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """Total variation distance ``0.5 * sum |p_teacher - p_student|``, shape (N,) (Wen et al. 2023, f-divergence KD)."""
    ps, pt = _logp(student_logits, temperature).exp(), _logp(teacher_logits, temperature).exp()
    return 0.5 * (pt - ps).abs().sum(-1) * temperature**2


# The one list of divergences: ``distill.divergence`` in the config is checked against it.
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "tv": total_variation,
}


def divergence(name: str, **params) -> Divergence:
    """The divergence called ``name`` with those of ``params`` it takes bound (``beta`` for jsd, ``alpha``
    for skew_kl; parameters it does not take are ignored)."""
    import functools
    import inspect

    fn = DIVERGENCES[name]
    accepted = inspect.signature(fn).parameters
    bound = {k: v for k, v in params.items() if k in accepted and k not in ("student_logits", "teacher_logits")}
    return functools.partial(fn, **bound) if bound else fn


class _FusedChunkedKD(torch.autograd.Function):
    """Forward computes the loss *and* its gradients chunk by chunk; backward only scales them.

    The same idea as fused linear cross-entropy kernels (Liger-Kernel): the (chunk, V) logits live only
    inside one loop iteration, each chunk costs one forward and one backward matmul pair (no
    recomputation), and every iteration allocates same-sized buffers, which the allocator reuses.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, targets, h_t, w_t, vocab, div, temperature, chunk_size, kd_weight, ce_weight, topk):
        need_h, need_w = h_s.requires_grad, w_s.requires_grad
        hs_all = h_s.detach()
        w = w_s.detach()[:vocab].requires_grad_(need_w)
        wt = None if w_t is None else w_t.detach()[:vocab]
        grad_h = torch.zeros_like(hs_all) if need_h else None
        grad_w = torch.zeros_like(w_s) if need_w else None
        kd_total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        ce_total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        for start in range(0, hs_all.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            h = hs_all[sl].requires_grad_(need_h)
            with torch.enable_grad():
                logits = F.linear(h, w)
                ce = F.cross_entropy(logits.float(), targets[sl], reduction="sum")
                kd = torch.zeros((), device=h.device)
                if h_t is not None:
                    with torch.no_grad():
                        logits_t = F.linear(h_t[sl], wt)
                    kd = div(logits, logits_t, temperature).sum()
                elif topk is not None:
                    kd = topk_divergence(logits, *(x[sl] for x in topk), div=div, temperature=temperature).sum()
                total = kd_weight * kd + ce_weight * ce
            inputs = [x for x, need in ((h, need_h), (w, need_w)) if need]
            if inputs:
                grads = torch.autograd.grad(total, inputs)
                if need_h:
                    grad_h[sl] = grads[0]
                if need_w:
                    grad_w[:vocab] += grads[-1]
            kd_total += kd.detach().float()
            ce_total += ce.detach().float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(kd_total, ce_total)
        return kd_weight * kd_total + ce_weight * ce_total, kd_total, ce_total

    @staticmethod
    def backward(ctx, g_loss, _g_kd, _g_ce):
        grad_h, grad_w = ctx.saved_tensors
        return (
            None if grad_h is None else grad_h * g_loss,
            None if grad_w is None else grad_w * g_loss,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    student_head: torch.Tensor,
    targets: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: torch.Tensor | None = None,
    *,
    vocab_size: int,
    div: Divergence = forward_kl,
    temperature: float = 1.0,
    chunk_size: int,
    kd_weight: float,
    ce_weight: float,
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kd_weight * KD + ce_weight * CE`` summed over N response tokens, ``chunk_size`` tokens at a time.

    Shapes: ``student_hidden`` (N, Hs), ``student_head`` (Vs, Hs), ``targets`` (N,),
    ``teacher_hidden`` (N, Ht), ``teacher_head`` (Vt, Ht). Only the first ``vocab_size`` logits
    are compared, which aligns padded embedding rows of otherwise identical vocabularies (padded rows
    get zero gradient).

    Full-vocabulary logits of teacher and student are never held for more than one chunk: peak memory
    is O(chunk_size x V) instead of O(N x V). Returns ``(loss, kd_sum, ce_sum)``: ``loss`` carries the
    gradient; the two sums are detached, for logging. Divide by the token count for means.

    ``teacher_topk`` = ``(indices (N, k), log-probs (N, k), tail log-mass (N,))`` replaces the live teacher
    with cached top-k signals (``topk_divergence``).
    """
    return _FusedChunkedKD.apply(
        student_hidden,
        student_head,
        targets,
        teacher_hidden,
        teacher_head,
        vocab_size,
        div,
        temperature,
        chunk_size,
        kd_weight,
        ce_weight,
        teacher_topk,
    )


TAIL_FLOOR = -80.0  # log-mass below this is treated as exp(-80) ~ 2e-35: keeps an empty tail finite


def topk_buckets(
    student_logits: torch.Tensor, idx: torch.Tensor, t_logp: torch.Tensor, t_tail: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher distributions over k + 1 buckets: the teacher's top-k tokens and the rest.

    ``t_logp`` are the teacher's top-k log-probabilities at ``temperature`` (over the full vocabulary) and
    ``t_tail`` the log of its remaining mass; the student's buckets are taken from its full softmax at the
    same temperature. Returns log-probabilities of shape (N, k + 1) for both.
    """
    ls = _logp(student_logits, temperature)
    idx = idx.long()
    s_k = ls.gather(-1, idx)
    s_tail = ls.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    s = torch.cat([s_k, s_tail.clamp(min=TAIL_FLOOR)], -1)
    t = torch.cat([t_logp.float(), t_tail.float().unsqueeze(-1).clamp(min=TAIL_FLOOR)], -1)
    return s, t


def topk_divergence(student_logits, idx, t_logp, t_tail, *, div: Divergence = forward_kl, temperature: float = 1.0):
    """``div`` between the k + 1 bucket distributions of ``topk_buckets``, times ``T**2``; shape (N,).

    The approximation (DistillKit-style cached top-k logits): merging the teacher's tail tokens into one
    bucket can only lose information, so for every f-divergence (forward / reverse KL, JSD, TV) the result is
    a lower bound of the full-vocabulary divergence (data-processing inequality). For forward KL the gap
    is exactly ``p_tail * KL(p_teacher(.|tail) || p_student(.|tail))``: zero when k covers the
    vocabulary, small when the teacher's tail mass is small. ``tests/test_signals.py`` checks both.
    """
    s, t = topk_buckets(student_logits, idx, t_logp, t_tail, temperature)
    return div(s, t, 1.0) * temperature**2


def feature_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Per-token feature matching loss, shape (N,), for features of shape (N, H) (already projected).

    ``cosine``: 1 - cos(s, t) (scale free; what Minitron-style depth/width KD uses for hidden states);
    ``mse``: mean squared error over the hidden dimension.
    """
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(student_feat.float(), teacher_feat.float(), dim=-1)
    if kind == "mse":
        return (student_feat.float() - teacher_feat.float()).pow(2).mean(-1)
    raise ValueError(f"unknown feature loss {kind!r}; use 'cosine' or 'mse'")
