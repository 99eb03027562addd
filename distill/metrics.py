"""Task metrics for tool-call answers. Pure Python: no torch, so the in-car runtime can use them.

An answer is one tool call in compact JSON: ``{"tool": name, "args": {...}}``. When a reference is
not a tool call (a user's free-text JSONL data), exact match falls back to the stripped text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence


def parse_tool_call(text: str) -> dict | None:
    """The tool call in ``text``, or None when it is not valid JSON of the form {"tool": str, "args": dict}."""
    text = text.strip()
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("tool"), str) or not isinstance(obj.get("args", {}), dict):
        return None
    return {"tool": obj["tool"], "args": obj.get("args", {})}


def _canon(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def arg_f1(pred: dict | None, ref: dict) -> float:
    """F1 over (key, value) pairs of the arguments; 1.0 when both have no arguments and the tool matches."""
    if pred is None:
        return 0.0
    p = {(k, _canon(v)) for k, v in pred["args"].items()}
    r = {(k, _canon(v)) for k, v in ref["args"].items()}
    if not p and not r:
        return 1.0 if pred["tool"] == ref["tool"] else 0.0
    tp = len(p & r)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(p), tp / len(r)
    return 2 * precision * recall / (precision + recall)


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """exact_match, tool_accuracy, arg_f1 and valid_json (all in [0, 1]) of predicted answers."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = max(len(references), 1)
    em = tool = f1 = valid = 0.0
    for pred_text, ref_text in zip(predictions, references, strict=True):
        ref = parse_tool_call(ref_text)
        pred = parse_tool_call(pred_text)
        valid += pred is not None
        if ref is None:  # free-text reference
            em += pred_text.strip() == ref_text.strip()
            continue
        if pred is not None:
            em += _canon(pred) == _canon(ref)
            tool += pred["tool"] == ref["tool"]
            f1 += arg_f1(pred, ref)
    return {"exact_match": em / n, "tool_accuracy": tool / n, "arg_f1": f1 / n, "valid_json": valid / n}


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def sequence_match(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Share of examples whose two token sequences are identical."""
    return sum(list(x) == list(y) for x, y in zip(a, b, strict=True)) / max(len(a), 1)
