"""Task metrics. Pure Python: no torch, so the in-car runtime can use them.

Always: ``exact_match`` (a tool call compared as canonical JSON, free text after ``normalize``) and
``token_f1`` (token overlap of the normalized texts; CJK characters are tokens of their own). Only where
references are tool calls (one compact JSON object ``{"tool": name, "args": {...}}``), measured over those
examples: ``tool_accuracy``, ``arg_f1`` and ``valid_json``. ``TOOL_CALL_METRICS`` names them: a gate
threshold on one of them needs tool-call data.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

TOOL_CALL_METRICS = ("tool_accuracy", "arg_f1", "valid_json")
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+")


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


def normalize(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed, surrounding whitespace and end punctuation removed."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.strip(" .!?。！？")


def tokens(text: str) -> list[str]:
    """Word tokens of normalized ``text``: runs of letters and digits, and every CJK character alone."""
    return _TOKEN.findall(normalize(text))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the token multisets of prediction and reference (SQuAD-style; 1.0 when both are empty)."""
    p, r = Counter(tokens(prediction)), Counter(tokens(reference))
    if not p or not r:
        return float(p == r)
    tp = sum((p & r).values())
    if tp == 0:
        return 0.0
    precision, recall = tp / sum(p.values()), tp / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def score(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Task metrics (all in [0, 1]) of predicted answers: see the module docstring. The tool-call metrics
    are present only when at least one reference is a tool call."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = max(len(references), 1)
    em = f1_text = tool = f1 = valid = 0.0
    n_calls = 0
    for pred_text, ref_text in zip(predictions, references, strict=True):
        f1_text += token_f1(pred_text, ref_text)
        ref = parse_tool_call(ref_text)
        if ref is None:  # free-text reference
            em += normalize(pred_text) == normalize(ref_text)
            continue
        n_calls += 1
        pred = parse_tool_call(pred_text)
        valid += pred is not None
        if pred is not None:
            em += _canon(pred) == _canon(ref)
            tool += pred["tool"] == ref["tool"]
            f1 += arg_f1(pred, ref)
    out = {"exact_match": em / n, "token_f1": f1_text / n}
    if n_calls:
        out.update(tool_accuracy=tool / n_calls, arg_f1=f1 / n_calls, valid_json=valid / n_calls)
    return out


def is_exact(prediction: str, reference: str) -> bool:
    """Exact match as ``score`` counts it: a tool call compared as canonical JSON, free text normalized."""
    ref = parse_tool_call(reference)
    if ref is None:
        return normalize(prediction) == normalize(reference)
    pred = parse_tool_call(prediction)
    return pred is not None and _canon(pred) == _canon(ref)


SLICE_KEYS = ("part", "lang", "intent")  # what an example's tags slice the scores by (distill.data.tags_of)
SLICE_METRICS = ("exact_match", "tool_accuracy", "arg_f1")


def slice_scores(
    predictions: Sequence[str], references: Sequence[str], tags: Sequence[dict]
) -> dict[str, dict[str, dict]]:
    """``score`` per slice: ``{key: {value: {"n", "exact_match", ...}}}`` for each key of ``SLICE_KEYS``
    that the examples' ``tags`` carry (e.g. ``part`` -> ``values`` / ``phrasing`` / ``both``)."""
    out: dict[str, dict[str, dict]] = {}
    for key in SLICE_KEYS:
        groups: dict[str, list[int]] = {}
        for i, t in enumerate(tags):
            if key in t:
                groups.setdefault(t[key], []).append(i)
        if not groups:
            continue
        out[key] = {}
        for value, idx in sorted(groups.items()):
            sc = score([predictions[i] for i in idx], [references[i] for i in idx])
            out[key][value] = {"n": len(idx), **{m: sc[m] for m in SLICE_METRICS if m in sc}}
    return out


def slice_retention(student: dict, teacher: dict, key: str, metric: str = "exact_match") -> dict[str, float | None]:
    """Per value of slice ``key``: the student's ``metric`` / the teacher's on that slice (None when the
    teacher scores 0 there: nothing to retain)."""
    s, t = student.get("slices", {}).get(key, {}), teacher.get("slices", {}).get(key, {})
    return {v: (s[v][metric] / t[v][metric] if t[v].get(metric) else None) for v in t if v in s}


def has_tool_calls(references: Sequence[str]) -> bool:
    """Whether the tool-call metrics can be measured on these references."""
    return any(parse_tool_call(r) is not None for r in references)


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def sequence_match(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Share of examples whose two token sequences are identical."""
    return sum(list(x) == list(y) for x, y in zip(a, b, strict=True)) / max(len(a), 1)
