"""A user's JSONL data: one example per line, either chat ``messages`` (system / user / assistant,
the last one the assistant's answer) or a ``prompt`` / ``completion`` pair. Optional string fields
``part``, ``lang`` and ``intent`` name the slices the report scores the example under (e.g. the part of
a held-out file: ``"part": "names"``)."""

from __future__ import annotations

import json
from pathlib import Path

ROLES = ("system", "user", "assistant")
TAGS = ("part", "lang", "intent")  # optional per-line string fields kept with the example (report slices)


class DataError(ValueError):
    """A data file that cannot be used, naming the file, the line and the fix."""


def read_jsonl(path: str | Path, key: str = "data") -> list[dict]:
    """Records as ``{"messages": [...]}``; raises DataError naming file and line for any bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: {path} does not exist")
    records, problems = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{n}: not valid JSON ({err.msg})")
                continue
            rec, why = _to_messages(obj)
            if not why:
                bad = [t for t in TAGS if t in obj and not isinstance(obj[t], str)]
                why = f"{bad[0]!r} must be a string (a report slice name)" if bad else None
                rec = rec and {**rec, **{t: obj[t] for t in TAGS if t in obj}}
            if why:
                problems.append(f"{path}:{n}: {why}")
            else:
                records.append(rec)
            if len(problems) >= 10:
                break
    if problems:
        raise DataError(
            f"{key}: bad lines in {path}:\n"
            + "\n".join(f"  - {p}" for p in problems)
            + '\nEach line must be {"messages": [{"role": "user", "content": ...}, {"role": "assistant", '
            '"content": ...}]} or {"prompt": ..., "completion": ...}.'
        )
    if not records:
        raise DataError(f"{key}: {path} holds no examples")
    return records


def _to_messages(obj) -> tuple[dict | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            return None, "'messages' must be a list of at least two messages"
        for m in msgs:
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                return None, f"each message needs a role in {ROLES} and a string content, got {m!r:.80}"
        if msgs[-1]["role"] != "assistant":
            return None, "the last message must be the assistant's answer"
        return {"messages": msgs}, None
    if "prompt" in obj and "completion" in obj:
        if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
            return None, "'prompt' and 'completion' must be strings"
        return {
            "messages": [
                {"role": "user", "content": obj["prompt"]},
                {"role": "assistant", "content": obj["completion"]},
            ]
        }, None
    return None, f"needs 'messages' or 'prompt'+'completion', found keys {sorted(obj)}"
