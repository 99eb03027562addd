"""Task metrics. Pure Python: no torch, so the in-car runtime can use them.

Answers are compared as *turns*: the text a model wrote is parsed by ``core.toolcalls`` in the chat
template's call syntax (``fmt``: Hermes ``<tool_call>`` tags, Llama-3 JSON, Mistral, plain JSON; this
project's demo answers ``{"tool": ..., "args": {...}}`` are plain JSON) into content and tool calls, and
so is the reference (the answer as the template writes it).

Always: ``exact_match`` (calls equal as a multiset: names and arguments, order-free for parallel calls;
a text reference: the normalized text, and no call) and ``token_f1`` (token overlap of the normalized
texts; CJK characters are tokens of their own). Where references make calls, as BFCL's AST checker scores
them: ``tool_accuracy`` (the same function names), ``arg_f1`` (F1 over argument (key, value) pairs),
``valid_json`` (the answer's calls all parse), ``missed_call_rate`` (no call where one was due); where the
examples carry tools also ``schema_validity`` (every call names a tool and its arguments fit its JSON
schema: required keys, types, enums) and ``hallucinated_function_rate`` (share of calls to functions
not in the tools); where references also include text turns, ``extra_call_rate`` (a call, or a broken
attempt at one, where the reference answered in text). ``TOOL_CALL_METRICS`` names them: a gate threshold on one of them needs
tool-call data.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

from core.toolcalls import canon, parse, same_calls, schema_problems, tool_names

TOOL_CALL_METRICS = (
    "tool_accuracy",
    "arg_f1",
    "valid_json",
    "missed_call_rate",
    "schema_validity",
    "hallucinated_function_rate",
    "extra_call_rate",
)
_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+")


def parse_tool_call(text: str) -> dict | None:
    """The demo's compact tool call in ``text`` (valid JSON ``{"tool": str, "args": dict}``), or None."""
    text = text.strip()
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("tool"), str) or not isinstance(obj.get("args", {}), dict):
        return None
    return {"tool": obj["tool"], "args": obj.get("args", {})}


def _pairs(calls: Sequence[dict]) -> Counter:
    return Counter((k, canon(v)) for c in calls for k, v in c["arguments"].items())


def arg_f1(pred: Sequence[dict], ref: Sequence[dict]) -> float:
    """F1 over the (key, value) pairs of the calls' arguments; with no arguments on either side, 1.0 when
    the function names match."""
    p, r = _pairs(pred), _pairs(ref)
    if not p and not r:
        return float(bool(pred) and sorted(c["name"] for c in pred) == sorted(c["name"] for c in ref))
    tp = sum((p & r).values())
    if tp == 0:
        return 0.0
    precision, recall = tp / sum(p.values()), tp / sum(r.values())
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


def attempts_call(pred: dict) -> bool:
    """Whether a parsed turn calls a function or tries to (a malformed call): not a text answer."""
    return bool(pred["tool_calls"]) or pred["malformed"] > 0


def turn_exact(pred: dict, ref: dict) -> bool:
    """Exact match of two parsed turns: the same calls (order-free), or, for a text reference, no call and
    the same normalized text."""
    if ref["tool_calls"]:
        return not pred["malformed"] and same_calls(pred["tool_calls"], ref["tool_calls"])
    return not pred["tool_calls"] and not pred["malformed"] and normalize(pred["content"]) == normalize(ref["content"])


def score(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    fmt: str = "json",
    tools: Sequence[Sequence[dict] | None] | None = None,
    response_template: dict | None = None,
) -> dict[str, float]:
    """Task metrics (all in [0, 1]) of predicted answers against reference answers, both texts as the
    model writes them, parsed in call syntax ``fmt``; ``tools``: each example's tools (or None). See the
    module docstring for which metrics appear when."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    tools = list(tools) if tools is not None else [None] * len(references)
    n = max(len(references), 1)
    em = f1_text = 0.0
    calls = Counter()  # sums over reference turns that make calls
    texts = extra = 0
    n_pred_calls = hallucinated = 0
    with_tools = 0
    for pred_text, ref_text, tl in zip(predictions, references, tools, strict=True):
        pred = parse(pred_text, fmt, response_template=response_template, tools=tl)
        ref = parse(ref_text, fmt, response_template=response_template, tools=tl)
        f1_text += token_f1(pred_text, ref_text)
        em += turn_exact(pred, ref)
        if tl:
            names = tool_names(tl)
            n_pred_calls += len(pred["tool_calls"])
            hallucinated += sum(c["name"] not in names for c in pred["tool_calls"])
        if not ref["tool_calls"]:
            texts += 1
            extra += attempts_call(pred)  # a broken attempt at a call is one too
            continue
        calls["n"] += 1
        p = pred["tool_calls"]
        calls["valid"] += bool(p) and not pred["malformed"]
        calls["missed"] += not p
        calls["names"] += bool(p) and sorted(c["name"] for c in p) == sorted(c["name"] for c in ref["tool_calls"])
        calls["f1"] += arg_f1(p, ref["tool_calls"])
        if tl:
            with_tools += 1
            calls["schema"] += bool(p) and not pred["malformed"] and not any(schema_problems(c, tl) for c in p)
    out = {"exact_match": em / n, "token_f1": f1_text / n}
    if calls["n"]:
        k = calls["n"]
        out.update(
            tool_accuracy=calls["names"] / k,
            arg_f1=calls["f1"] / k,
            valid_json=calls["valid"] / k,
            missed_call_rate=calls["missed"] / k,
        )
        if with_tools:
            out.update(
                schema_validity=calls["schema"] / with_tools,
                hallucinated_function_rate=hallucinated / n_pred_calls if n_pred_calls else 0.0,
            )
        if texts:
            out["extra_call_rate"] = extra / texts
    return out


def is_exact(prediction: str, reference: str, fmt: str = "json") -> bool:
    """Exact match as ``score`` counts it."""
    return turn_exact(parse(prediction, fmt), parse(reference, fmt))


SLICE_KEYS = ("part", "lang", "intent", "turns")  # what an example's tags slice the scores by (distill.data.tags_of)
SLICE_METRICS = ("exact_match", "tool_accuracy", "arg_f1")


def slice_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    tags: Sequence[dict],
    *,
    fmt: str = "json",
    tools: Sequence[Sequence[dict] | None] | None = None,
    response_template: dict | None = None,
) -> dict[str, dict[str, dict]]:
    """``score`` per slice: ``{key: {value: {"n", "exact_match", ...}}}`` for each key of ``SLICE_KEYS``
    that the examples' ``tags`` carry (e.g. ``part`` -> ``values`` / ``phrasing`` / ``both``; ``turns`` ->
    ``single`` / ``multi``)."""
    tools = list(tools) if tools is not None else [None] * len(references)
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
            sc = score(
                [predictions[i] for i in idx],
                [references[i] for i in idx],
                fmt=fmt,
                tools=[tools[i] for i in idx],
                response_template=response_template,
            )
            out[key][value] = {"n": len(idx), **{m: sc[m] for m in SLICE_METRICS if m in sc}}
    return out


def slice_retention(student: dict, teacher: dict, key: str, metric: str = "exact_match") -> dict[str, float | None]:
    """Per value of slice ``key``: the student's ``metric`` / the teacher's on that slice (None when the
    teacher scores 0 there: nothing to retain)."""
    s, t = student.get("slices", {}).get(key, {}), teacher.get("slices", {}).get(key, {})
    return {v: (s[v][metric] / t[v][metric] if t[v].get(metric) else None) for v in t if v in s}


def has_tool_calls(records: Sequence[dict]) -> bool:
    """Whether the tool-call metrics can be measured on these records: some final answer makes a call
    (structured ``tool_calls``, or a JSON call written as text)."""
    for r in records:
        last = r["messages"][-1]
        if last.get("tool_calls") or parse(last.get("content") or "", "json")["tool_calls"]:
            return True
    return False


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def sequence_match(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Share of examples whose two token sequences are identical."""
    return sum(list(x) == list(y) for x, y in zip(a, b, strict=True)) / max(len(a), 1)
