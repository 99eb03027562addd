"""Calibration batches for activation importance: padded (prompt + answer) sequences of task data."""

from __future__ import annotations

from core.chat import collate, encode


def calibration_batches(
    tokenizer,
    records: list[dict],
    n_examples: int,
    *,
    max_length: int,
    batch_size: int = 16,  # not a knob: padding is masked out, so it changes no statistic
) -> list[dict]:
    """Padded batches of the first ``n_examples`` records (prompt + answer), for activation statistics."""
    enc = [encode(tokenizer, r["messages"], tools=r.get("tools")) for r in records[:n_examples]]
    enc = [e for e in enc if len(e["input_ids"]) <= max_length]
    out = []
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i : i + batch_size], tokenizer.pad_token_id)
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return out


def sequence_batches(pad_id: int, sequences: list[list[int]], batch_size: int = 16) -> list[dict]:
    """Padded batches of token sequences (e.g. general text, ``distill.general``) for the same statistics."""
    out = []
    for i in range(0, len(sequences), batch_size):
        b = collate([{"input_ids": s, "labels": s} for s in sequences[i : i + batch_size]], pad_id)
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return out
