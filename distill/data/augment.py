"""New requests from training requests: the open values a tool call copies from the request (names, places,
artists, message texts) replaced by random ones. Pure Python; the teacher labels them in ``distill.augment``.

A value is *open* when it is a string argument of the reference tool call that occurs verbatim in the last
user message and does not look like an enumerated code (``driver``, ``on``, ``gas_station``: lower-case
letters, digits and underscores): the model has to copy it, and a student that only saw the training data's names copies only
those. Random values (syllable words, random CJK characters, sometimes in the other script) teach copying
itself. ``avoid`` keeps every word and character of the held-out values out of them (``units``), so the
heldout split stays unseen: for the built-in data ``car_assistant.heldout_vocabulary()``, for a user's data
the values of the held-out file (``heldout_units``).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable

from distill.data.car_assistant import units
from distill.metrics import parse_tool_call

_ONSET = "b c d f g h j k l m n p r s t v w z br ch cr dr fl gr kr pl st tr sh th".split()
_VOWEL = "a e i o u ai ea io ou".split()
_CODA = ["", "", "", "n", "r", "s", "l", "m", "t", "x"]
_CJK = (0x4E00, 0x9FA5)  # CJK Unified Ideographs, the common block
_CODE = re.compile(r"[a-z0-9_]+")  # an enumerated value (a code the model chooses), not one it copies
# distill.augment.keep: which augmented requests the student trains on, and towards what (distill.augment)
KEEP = ("consistent", "implied")


def _call_args(record: dict) -> list[dict] | None:
    """The argument objects of the final answer's calls: its structured ``tool_calls`` (function-calling
    lines), or the demo's JSON call written as text; None when the answer makes no call."""
    last = record["messages"][-1]
    if last.get("tool_calls"):
        return [c["function"]["arguments"] for c in last["tool_calls"]]
    call = parse_tool_call(last.get("content") or "")
    return [call["args"]] if call else None


def open_values(record: dict) -> list[tuple[str, str]]:
    """(argument, value) of the reference tool call's string arguments that occur verbatim in the last user
    message, longest first; [] when the answer is not a tool call."""
    msgs = record["messages"]
    calls = _call_args(record)
    if not calls:
        return []
    user = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
    found = [
        (k, v)
        for args in calls
        for k, v in args.items()
        if isinstance(v, str) and v.strip() and v in user and not _CODE.fullmatch(v)
    ]
    return sorted(dict.fromkeys(found), key=lambda kv: -len(kv[1]))  # each pair once, in the calls' order


def _is_cjk(text: str) -> bool:
    return any(_CJK[0] <= ord(c) <= _CJK[1] for c in text)


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_ONSET) + rng.choice(_VOWEL) for _ in range(rng.randint(1, 3))) + rng.choice(_CODA)


def random_value(rng: random.Random, like: str, avoid: frozenset[str], cross_script: float) -> str:
    """A random stand-in for ``like``: as many capitalised syllable words (or random CJK characters) as it
    has, a lower-case phrase for a long text; in the other script with probability ``cross_script``; none of
    its words or characters in ``avoid``."""
    cjk = _is_cjk(like) != (rng.random() < cross_script)
    n_words = len(like.split()) if not _is_cjk(like) else max(1, len(like) // 2)
    long_text = n_words >= 4 or (_is_cjk(like) and len(like) >= 6)
    for _ in range(1000):
        if cjk:
            n = rng.randint(4, 10) if long_text else min(4, len(like)) if _is_cjk(like) else rng.randint(2, 3)
            value = "".join(chr(rng.randint(*_CJK)) for _ in range(n))
        elif long_text:
            value = " ".join(_word(rng) for _ in range(rng.randint(3, 7)))
        else:
            value = " ".join(_word(rng).capitalize() for _ in range(max(1, min(n_words, 3))))
        if not units(value) & avoid:
            return value
    raise RuntimeError("could not draw a random value outside the held-out vocabulary")


def substitute(
    record: dict, rng: random.Random, avoid: frozenset[str], cross_script: float
) -> tuple[dict, dict[str, str]] | None:
    """``record`` with every open value replaced by a random one in the request and in the tool call:
    (new record whose answer is the expected tool call, {argument: new value}); None when the record has no
    open value or its values overlap (one inside another: no unambiguous rewrite)."""
    found = open_values(record)
    if not found:
        return None
    values = [v for _, v in found]
    if any(a != b and a in b for a in values for b in values):
        return None
    msgs = [dict(m) for m in record["messages"]]
    user = max(i for i, m in enumerate(msgs) if m["role"] == "user")  # the request the answer is to
    last = msgs[-1]
    structured = bool(last.get("tool_calls"))
    if structured:
        calls = [
            {**c, "function": {**c["function"], "arguments": dict(c["function"]["arguments"])}}
            for c in last["tool_calls"]
        ]
        args = [c["function"]["arguments"] for c in calls]
    else:
        call = parse_tool_call(last["content"])
        args = [call["args"]]
    new: dict[str, str] = {}
    for key, old in found:
        value = new.get(key) or random_value(rng, old, avoid, cross_script)
        new[key] = value
        msgs[user]["content"] = msgs[user]["content"].replace(old, value)
        for a in args:
            if a.get(key) == old:
                a[key] = value
    if structured:
        msgs[-1] = {**last, "tool_calls": calls}
    else:
        msgs[-1] = {**last, "content": json.dumps(call, ensure_ascii=False, separators=(",", ":"))}
    keep = {k: record[k] for k in ("intent", "tools") if k in record}
    return {"messages": msgs, **keep}, new


def heldout_units(records: Iterable[dict]) -> frozenset[str]:
    """The words and characters (``units``) of every open value of a user's held-out records: what random
    values avoid so that augmentation cannot produce a held-out value."""
    out: set[str] = set()
    for r in records:
        for _, v in open_values(r):
            out |= units(v)
    return frozenset(out)


def randomize(records: list[dict], share: float, seed: int, avoid: frozenset[str], cross_script: float) -> list[dict]:
    """``records`` with a seeded ``share`` of them (among those with open values) given random open values,
    the answer rewritten to match (``substitute``): data that teaches a model trained from scratch to copy
    any value, as pretraining teaches a pretrained one."""
    rng = random.Random(seed)
    out = []
    for r in records:
        got = substitute(r, rng, avoid, cross_script) if rng.random() < share else None
        out.append(got[0] if got else r)
    return out
