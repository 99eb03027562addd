"""Augmentation with new inputs: training requests with their open values replaced by random ones
(``distill.data.augment``). Which of them the student trains on, and towards what answer, is
``distill.augment.keep`` (``KEEP``):

- ``consistent``: each is answered by the teacher and kept only where the teacher is consistent, its answer
  being the tool call the substitution implies (same tool, the new values copied, every other argument
  unchanged); the target is the teacher's own text (sequence-level KD). For a teacher that copies new values
  (a pretrained one).
- ``implied``: every one is kept with the call the substitution implies as its target: the student learns
  to copy from those answers and the teacher's logits along them (the KD term) still carry its routing. For a
  teacher that routes requests with new values but cannot copy them (the demo's toy teacher, trained from
  scratch); no teacher generation.

The student then distils on them beside the task data, at ``distill.augment.share`` of every batch.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence

import torch

from core.chat import IGNORE, encode
from distill.data.augment import open_values, substitute
from distill.evaluate import by_length, hf_generate_fn
from distill.metrics import is_exact

log = logging.getLogger("distill")


def candidates(
    records: Sequence[dict], n: int, seed: int, avoid: frozenset[str], cross_script: float
) -> list[tuple[dict, dict]]:
    """``n`` substituted records (record, {argument: new value}) drawn from ``records`` in a seeded order,
    each source used again only after all have been used once."""
    rng = random.Random(seed)
    pool = [r for r in records if open_values(r)]
    if not pool or n <= 0:
        return []
    order = list(range(len(pool)))
    rng.shuffle(order)
    out: list[tuple[dict, dict]] = []
    tries = 0
    while len(out) < n and tries < 4 * n + len(pool):
        got = substitute(pool[order[tries % len(pool)]], rng, avoid, cross_script)
        tries += 1
        if got is not None:
            out.append(got)
    return out


@torch.no_grad()
def label(
    teacher,
    tokenizer,
    cands: Sequence[tuple[dict, dict]],
    *,
    max_length: int,
    batch_size: int,
    fmt: str | None = None,
) -> tuple[list[dict], dict]:
    """The teacher's greedy answer to each candidate; (kept records, whose answer is the teacher's own text,
    and statistics with a few kept and rejected examples). A candidate is kept only when the teacher's
    answer equals the expected tool call (``distill.metrics.is_exact``; function-calling lines: the
    teacher's calls, parsed in ``fmt``, default the template's syntax, equal the structured calls, which
    stay the target)."""
    from tqdm.auto import tqdm

    from core.chat import call_format
    from core.toolcalls import canonical_call, parse, same_calls

    fmt = fmt or call_format(tokenizer)
    encoded, fits = [], []
    for rec, _ in cands:
        ex = encode(tokenizer, rec["messages"], tools=rec.get("tools"))
        if len(ex["input_ids"]) <= max_length:
            encoded.append(ex)
            fits.append(rec)
    stats: dict = {"candidates": len(cands), "too_long": len(cands) - len(fits), "kept": 0, "rejected": 0}
    if not fits:
        return [], stats
    budget = max(sum(1 for t in ex["labels"] if t != IGNORE) for ex in encoded) + 8
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in encoded]
    gen = hf_generate_fn(teacher, tokenizer, budget, batch_size)
    bar = tqdm(total=len(prompts), desc="augment: teacher answers", unit="request")

    def generate(ps):
        out = []
        for i in range(0, len(ps), batch_size):
            out += gen(ps[i : i + batch_size])
            bar.update(len(ps[i : i + batch_size]))
        return out

    answers = by_length(prompts, generate)
    bar.close()
    kept, shown_kept, shown_rejected = [], [], []
    for rec, ans in zip(fits, answers, strict=True):
        text = tokenizer.decode(ans, skip_special_tokens=True)
        last = rec["messages"][-1]
        if last.get("tool_calls"):  # structured calls: the teacher's text parsed back
            calls = [canonical_call(c) for c in last["tool_calls"]]
            got = parse(text, fmt)
            expected = json.dumps(calls, ensure_ascii=False)
            right = not got["malformed"] and same_calls(got["tool_calls"], calls)
            answer = last
        else:
            expected = last["content"]
            right = is_exact(text, expected)
            answer = {"role": "assistant", "content": text}
        row = {"request": rec["messages"][-2]["content"], "expected": expected, "teacher": text}
        if right:
            kept.append({**rec, "messages": [*rec["messages"][:-1], answer]})
            if len(shown_kept) < 5:
                shown_kept.append(row)
        elif len(shown_rejected) < 10:
            shown_rejected.append(row)
    stats.update(
        kept=len(kept), rejected=len(fits) - len(kept), kept_examples=shown_kept, rejected_examples=shown_rejected
    )
    log.info(
        "augment: the teacher answered %d new requests consistently and %d not (rejected); %d too long",
        stats["kept"],
        stats["rejected"],
        stats["too_long"],
    )
    return kept, stats


def implied(cands: Sequence[tuple[dict, dict]], tokenizer, *, max_length: int) -> tuple[list[dict], dict]:
    """``distill.augment.keep=implied``: every candidate that fits ``max_length``, its target the call the
    substitution implies; (records, statistics in ``label``'s shape, nothing rejected)."""
    kept = [
        rec
        for rec, _ in cands
        if len(encode(tokenizer, rec["messages"], tools=rec.get("tools"))["input_ids"]) <= max_length
    ]
    stats = {
        "candidates": len(cands),
        "too_long": len(cands) - len(kept),
        "kept": len(kept),
        "rejected": 0,
        "kept_examples": [
            {
                "request": r["messages"][-2]["content"],
                "expected": r["messages"][-1]["content"] or r["messages"][-1].get("tool_calls"),
            }
            for r in kept[:5]
        ],
        "rejected_examples": [],
    }
    log.info("augment: %d new requests kept with their implied answers; %d too long", len(kept), stats["too_long"])
    return kept, stats
