"""Evaluation: generate -> task metrics, plus teacher-forced perplexity, KL and token agreement.

``evaluate_generations`` takes a *generate function* (prompt token ids -> answer token ids), so the
teacher, the student and any other runtime are scored by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from core.chat import IGNORE, collate, stop_ids
from distill import metrics

GenerateFn = Callable[[Sequence[Sequence[int]]], list[list[int]]]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def hf_generate_fn(model, tokenizer, max_new_tokens: int, batch_size: int) -> GenerateFn:
    """Greedy decoding with HF ``generate`` (KV cache), batched with left padding; stops on (and strips) the
    chat template's end-of-turn token and eos."""
    device = next(model.parameters()).device
    stops, pad = stop_ids(tokenizer), tokenizer.pad_token_id
    eos = stops[0] if len(stops) == 1 else stops

    @torch.no_grad()
    def generate(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        model.eval()
        out: list[list[int]] = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            ids, mask = left_pad(chunk, pad)
            gen = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            for row in gen[:, ids.shape[1] :].tolist():
                ans = []
                for t in row:
                    if t in stops:
                        break
                    ans.append(t)
                out.append(ans)
        return out

    return generate


def answer_budget(data: Sequence[dict]) -> int:
    """New tokens that cover the longest reference answer of ``data`` (its final turn) with its end-of-turn
    token: a longer generation cannot match any reference, so ``eval.max_new_tokens: null`` stops there."""
    return max((sum(1 for t in ex["labels"][ex["prompt_len"] :] if t != IGNORE) for ex in data), default=1)


def by_length(prompts: Sequence[Sequence[int]], generate: GenerateFn) -> list[list[int]]:
    """``generate`` over prompts sorted by length (batches of similar lengths: little padding), answers
    returned in the original order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = generate([prompts[i] for i in order])
    out: list[list[int]] = [[] for _ in prompts]
    for i, a in zip(order, answers, strict=True):
        out[i] = a
    return out


TOPK_ORDER = "by_length"  # the answer-token order of TopK signals (``teacher_forced``); in their cache keys


def topk_key(kl_topk: int) -> dict:
    """What cached TopK signals depend on besides model and data (their k, their answer-token order); empty when
    ``eval.kl_topk`` is off, so caches made before the knob stay valid."""
    return {"kl_topk": kl_topk, "order": TOPK_ORDER} if kl_topk else {}


def by_length_order(data: Sequence[dict]) -> list[dict]:
    """``data`` sorted by sequence length (stable): how ``teacher_forced`` batches it, so the answer tokens, and
    the TopK signals kept or consumed there, follow this order."""
    return sorted(data, key=lambda ex: len(ex["input_ids"]))


def evaluate_generations(data: Sequence[dict], generate: GenerateFn, tokenizer) -> tuple[dict, list[list[int]]]:
    """Task metrics of ``generate`` on encoded examples (each with ``input_ids``, ``prompt_len``, ``answer``,
    optionally ``tags``: then also per slice, under ``slices``); generation batches are formed by prompt length."""
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in data]
    answers = by_length(prompts, generate)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    refs = [ex["answer"] for ex in data]
    kw = scoring(data, tokenizer)
    scores = metrics.score(texts, refs, **kw)
    if any(ex.get("tags") for ex in data):  # per part / language / intent / turns (distill.data.tags_of)
        scores["slices"] = metrics.slice_scores(texts, refs, [ex.get("tags", {}) for ex in data], **kw)
    return scores, answers


def scoring(data: Sequence[dict], tokenizer=None) -> dict:
    """How answers to ``data`` are parsed and checked: the examples' call syntax (``distill.data.encode_records``
    stores it), their tools, and the tokenizer's transformers response template when it has one."""
    return {
        "fmt": next((ex["format"] for ex in data if ex.get("format")), "json"),
        "tools": [ex.get("tools") for ex in data],
        "response_template": getattr(tokenizer, "response_template", None),
    }


LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> (B, T, V)


def answer_logits(model, batch: dict, vocab: int, chunk_size: int):
    """The logits that predict ``batch``'s answer tokens, ``chunk_size`` tokens at a time. A PyTorch model runs its decoder once and its LM head per
    chunk; a ``LogitsFn`` (an ONNX runtime returns full logits) runs on as few rows at a time as keep about
    ``chunk_size`` tokens. Either way no more than one chunk of (tokens x vocab) logits is held. Yields
    logits[chunk, vocab] in answer-token order."""
    sel = batch["labels"][:, 1:] != IGNORE
    if isinstance(model, torch.nn.Module):
        from families import backbone_and_head

        body, head = backbone_and_head(model)
        device = head.weight.device
        h = body(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).last_hidden_state[:, :-1][sel.to(device)]
        for start in range(0, h.shape[0], chunk_size):
            yield head(h[start : start + chunk_size])[:, :vocab].float().cpu()
        return
    rows = max(1, chunk_size // batch["input_ids"].shape[1])
    for r in range(0, batch["input_ids"].shape[0], rows):
        part = slice(r, r + rows)
        logits = model(batch["input_ids"][part], batch["attention_mask"][part])[:, :-1, :vocab]
        yield logits.cpu()[sel[part]].float()


class _Rows:
    """Consecutive rows of a stream of chunks, ``take(n)`` at a time: two models chunked differently (an
    ONNX artifact by rows, a PyTorch teacher by tokens) are compared row for row, two chunks held at most."""

    def __init__(self, chunks):
        self.chunks, self.buf = chunks, None

    def take(self, n: int) -> torch.Tensor:
        parts, have = [], 0
        while have < n:
            if self.buf is None or self.buf.shape[0] == 0:
                self.buf = next(self.chunks)
            k = min(n - have, self.buf.shape[0])
            parts.append(self.buf[:k])
            self.buf, have = self.buf[k:], have + k
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class TopK(NamedTuple):
    """A model's top-k log-probabilities (T = 1) at every answer position of a split, in the order
    ``answer_logits`` yields them (example by example): ``indices`` (N, k), ``logp`` (N, k), ``tail`` (N,)
    the log of the remaining mass. Computed once per split for the teacher; every student and ONNX
    variant is then compared with it without another teacher pass (``eval.kl_topk``)."""

    indices: torch.Tensor
    logp: torch.Tensor
    tail: torch.Tensor

    @staticmethod
    def of(logits: torch.Tensor, k: int) -> TopK:
        logp = F.log_softmax(logits.float(), -1)
        top, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
        return TopK(idx.to(torch.int32), top, logp.scatter(-1, idx, float("-inf")).logsumexp(-1))

    @staticmethod
    def cat(parts: Sequence[TopK]) -> TopK:
        return TopK(*(torch.cat([getattr(p, f) for p in parts]) for f in TopK._fields))

    def tensors(self) -> dict[str, torch.Tensor]:
        return self._asdict()


class _TopKRows:
    """``take(n)`` for cached ``TopK`` signals, as ``_Rows`` does for logits."""

    def __init__(self, sig: TopK):
        self.sig, self.at = sig, 0

    def take(self, n: int) -> TopK:
        part = TopK(*(x[self.at : self.at + n] for x in self.sig))
        self.at += n
        return part


@torch.no_grad()
def teacher_forced(
    model,
    data: Sequence[dict],
    tokenizer,
    batch_size: int,
    teacher=None,
    chunk_size: int = 512,
    keep_topk: int = 0,
) -> dict:
    """Perplexity on the reference answers; with ``teacher``: mean KL(teacher || model) per answer token
    and greedy token agreement (share of answer positions where both models' argmax agree).

    ``model`` is a PyTorch model or a ``LogitsFn`` (so an ONNX runtime is scored by the same code).
    ``teacher`` is one too (exact KL: the teacher runs again), or the teacher's ``TopK`` signals on
    ``data`` (no teacher pass: KL over the teacher's top-k tokens and one bucket for the rest, a lower
    bound that differs from the exact KL by the teacher's tail mass times the KL inside it; agreement is
    exact). ``keep_topk`` > 0 also returns this model's own ``TopK`` signals as ``out["signals"]``.
    Logits are formed ``chunk_size`` answer tokens at a time (``answer_logits``): memory does not grow
    with the vocabulary times the batch."""
    from distill.losses import topk_divergence

    for m in (model, teacher):
        if isinstance(m, torch.nn.Module):
            m.eval()
    data = by_length_order(data)  # batches of similar lengths: ~0.65x the time of data order (less padding)
    vocab = len(tokenizer)
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    cached = _TopKRows(teacher) if isinstance(teacher, TopK) else None
    kept: list[TopK] = []
    for i in range(0, len(data), batch_size):
        b = collate(data[i : i + batch_size], tokenizer.pad_token_id)
        targets = _Rows(iter([b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE]]))
        live = _Rows(answer_logits(teacher, b, vocab, chunk_size)) if teacher is not None and cached is None else None
        for logits in answer_logits(model, b, vocab, chunk_size):
            n = logits.shape[0]
            nll += float(F.cross_entropy(logits, targets.take(n), reduction="sum"))
            count += n
            if keep_topk:
                kept.append(TopK.of(logits, keep_topk))
            if cached is not None:
                t = cached.take(n)
                kl += float(topk_divergence(logits, t.indices, t.logp, t.tail).sum())
                agree += int((t.indices[:, 0].long() == logits.argmax(-1)).sum())
            elif live is not None:
                tl = live.take(n)
                lt, ls = F.log_softmax(tl, -1), F.log_softmax(logits, -1)
                kl += float((lt.exp() * (lt - ls)).sum())
                agree += int((tl.argmax(-1) == logits.argmax(-1)).sum())
    if cached is not None and cached.at != cached.sig.tail.shape[0]:
        raise ValueError(
            f"teacher top-k signals cover {cached.sig.tail.shape[0]} answer tokens, the data {cached.at}: "
            "they were computed on other data"
        )
    out: dict = {"perplexity": metrics.perplexity(nll, count)}
    if teacher is not None:
        out["kl"] = kl / max(count, 1)
        out["agreement"] = agree / max(count, 1)
    if keep_topk:
        out["signals"] = TopK.cat(kept) if kept else None
    return out


def evaluate_model(
    model,
    tokenizer,
    data: Sequence[dict],
    *,
    max_new_tokens: int | None,
    batch_size: int,
    teacher=None,
    teacher_answers: list[list[int]] | None = None,
    chunk_size: int = 512,
    keep_topk: int = 0,
) -> tuple[dict, list[list[int]]]:
    """All metrics of one PyTorch model on one split; returns (metrics, greedy answers).
    ``max_new_tokens=None``: the longest reference answer of ``data`` (``answer_budget``). ``teacher`` and
    ``keep_topk``: as for ``teacher_forced`` (the model's own ``TopK`` signals in ``metrics["signals"]``)."""
    gen = hf_generate_fn(model, tokenizer, max_new_tokens or answer_budget(data), batch_size)
    return _evaluate(gen, model, tokenizer, data, batch_size, teacher, teacher_answers, chunk_size, keep_topk)


def _evaluate(gen: GenerateFn, logits_of, tokenizer, data, batch_size, teacher, teacher_answers, chunk_size, keep=0):
    scores, answers = evaluate_generations(data, gen, tokenizer)
    scores.update(teacher_forced(logits_of, data, tokenizer, batch_size, teacher, chunk_size, keep))
    if teacher_answers is not None:
        scores["generation_match"] = metrics.sequence_match(answers, teacher_answers)
    return scores, answers


OWN_EVAL = "eval_test.json"  # a trained teacher's test evaluation, saved in its folder (``split_key`` names it)
OWN_TOPK = "eval_test_topk.safetensors"  # its TopK signals on those examples (with eval.kl_topk)


def eval_settings(ec) -> dict:
    """The ``EvalConfig`` fields that change generated answers and teacher-forced numbers."""
    return dict(max_new_tokens=ec.max_new_tokens, batch_size=ec.batch_size, chunk_size=ec.chunk_size)


def split_key(data: Sequence[dict], ec) -> dict:
    """What one model's evaluation on ``data`` depends on besides the model: the exact token ids and the
    eval settings. A teacher's own test evaluation is reused only where this matches."""
    from core.hashing import digest

    return {
        "examples": digest([ex["input_ids"] for ex in data]),
        "eval": eval_settings(ec),
        **topk_key(ec.kl_topk),
    }


def onnx_logits_fn(runner) -> LogitsFn:
    """Teacher-forced logits of an ``export.runtime.OnnxCausalLM`` as a torch tensor."""
    return lambda ids, mask: torch.from_numpy(runner.forward(ids.numpy(), mask.numpy())[0])


def evaluate_onnx(
    runner,
    tokenizer,
    data: Sequence[dict],
    *,
    max_new_tokens: int | None,
    batch_size: int,
    teacher=None,
    teacher_answers: list[list[int]] | None = None,
    chunk_size: int = 512,
) -> tuple[dict, list[list[int]]]:
    """All metrics of one ONNX artifact (through ``export.runtime``) on one split, as for a PyTorch model."""
    n = max_new_tokens or answer_budget(data)
    gen = lambda prompts: runner.generate(prompts, n, batch_size=batch_size)  # noqa: E731
    return _evaluate(gen, onnx_logits_fn(runner), tokenizer, data, batch_size, teacher, teacher_answers, chunk_size)


# ONNX ops that compute one quantization scale over every row of a call: a row's numbers depend on the others.
ROW_MIXING_OPS = ("DynamicQuantizeLinear", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM")


def batch_invariance(
    runner, data: Sequence[dict], max_new_tokens: int, deploy_batch: int, batch_size: int, chunk_size: int
) -> dict:
    """Whether scoring ``runner`` (an ``export.runtime.OnnxCausalLM``) at ``batch_size`` gives what it gives at
    ``deploy_batch``: its graph has no op that mixes rows (``ROW_MIXING_OPS``), and on ``data`` the greedy
    answers and the teacher-forced argmax at every position are identical at both batches (teacher-forced
    rows grouped as ``teacher_forced`` groups them, ``chunk_size`` tokens at a time)."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(runner.folder / "model.onnx"), load_external_data=False).graph.node}
    out: dict = {"examples": len(data), "ops_mixing_rows": sorted(ops & set(ROW_MIXING_OPS))}
    if out["ops_mixing_rows"] or not data:
        return {**out, "invariant": False}
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in data]
    small = by_length(prompts, lambda p: runner.generate(p, max_new_tokens, batch_size=deploy_batch))
    large = by_length(prompts, lambda p: runner.generate(p, max_new_tokens, batch_size=batch_size))
    seqs = [ex["input_ids"] for ex in data]
    rows = max(1, min(batch_size, chunk_size // max(len(x) for x in seqs)))
    same_argmax = all(
        bool((x.argmax(-1) == y.argmax(-1)).all())
        for x, y in zip(runner.sequence_logits(seqs, deploy_batch), runner.sequence_logits(seqs, rows), strict=True)
    )
    out["identical_answers"] = sum(a == b for a, b in zip(small, large, strict=True)) / len(data)
    out["identical_argmax"] = same_argmax
    out["invariant"] = out["identical_answers"] == 1.0 and same_argmax
    return out


def latency(
    generate_n: Callable[[Sequence[int], int], object], prompts: Sequence[Sequence[int]], n_tokens: int
) -> dict:
    """Batch-1 latency: ``prefill_ms`` = time to the first token, ``ms_per_token`` = (time for ``n_tokens``
    minus time for 1) / (``n_tokens`` - 1). ``generate_n(prompt, n)`` must produce exactly ``n`` tokens.
    The same method for every runtime, so the numbers compare; each is the median over ``prompts``
    after one warm-up call."""
    import statistics
    import time

    generate_n(prompts[0], 2)  # warm-up: allocations, kernel selection
    firsts, per_token = [], []
    for p in prompts:
        t = time.perf_counter()
        generate_n(p, 1)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        generate_n(p, n_tokens)
        tn = time.perf_counter() - t
        firsts.append(t1)
        per_token.append(max(tn - t1, 0.0) / max(n_tokens - 1, 1))
    return {"prefill_ms": 1000 * statistics.median(firsts), "ms_per_token": 1000 * statistics.median(per_token)}


def hf_generate_n(model, pad_id: int):
    """``generate_n`` for ``latency``: HF ``generate`` with KV cache, greedy, exactly ``n`` new tokens."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def run(prompt: Sequence[int], n: int):
        ids = torch.tensor([list(prompt)], device=device)
        return model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=pad_id,
        )

    return run


def onnx_generate_n(runner):
    """``generate_n`` for ``latency``: the ONNX runner, greedy, exactly ``n`` new tokens."""
    return lambda prompt, n: runner.generate([prompt], n, min_new_tokens=n)
