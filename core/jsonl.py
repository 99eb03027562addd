"""A user's JSONL data: one example per line, either chat ``messages`` or a ``prompt`` / ``completion``
pair. Optional string fields ``part``, ``lang`` and ``intent`` name the slices the report scores the
example under (e.g. the part of a held-out file: ``"part": "names"``).

Chat lines follow TRL's conversational format, function calling included: roles system / user /
assistant / tool; an assistant turn may carry ``tool_calls`` (``{"type": "function", "function": {"name",
"arguments"}}``, arguments an object or a JSON string; several per turn) and then no text; ``tool`` turns
hold the results; ``tools`` (JSON-schema functions) per line or once for the file (``tools_file``). The
last message is the assistant's. Records come back with calls in canonical form (arguments as objects)."""

from __future__ import annotations

import json
from pathlib import Path

from core.toolcalls import ToolCallError, canonical_call, openai_tool

ROLES = ("system", "user", "assistant", "tool")
TAGS = ("part", "lang", "intent")  # optional per-line string fields kept with the example (report slices)


class DataError(ValueError):
    """A data file that cannot be used, naming the file, the line and the fix."""


def read_tools(path: str | Path, key: str = "data.tools_file") -> list[dict]:
    """The tools of a ``tools_file``: a JSON list of function schemas (OpenAI ``{"type": "function",
    "function": {...}}`` or flat ``{"name", "description", "parameters"}``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: {path} does not exist")
    try:
        tools = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{key}: {path} is not valid JSON ({err.msg}, line {err.lineno})") from None
    try:
        return _tools(tools)
    except ToolCallError as err:
        raise DataError(f"{key}: {path}: {err}") from None


def _tools(tools) -> list[dict]:
    if not isinstance(tools, list) or not tools:
        raise ToolCallError("'tools' must be a non-empty list of function schemas")
    out = [openai_tool(t) for t in tools]
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise ToolCallError(f"two tools share a name: {sorted(n for n in set(names) if names.count(n) > 1)}")
    return out


def read_jsonl(path: str | Path, key: str = "data", tools: list[dict] | None = None) -> list[dict]:
    """Records as ``{"messages": [...]}`` (plus ``tools`` where the line or ``tools``, the file's tools,
    gives them); raises DataError naming file and line for any bad line."""
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
            rec, why = _to_messages(obj, tools)
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
            '"content": ...}]} or {"prompt": ..., "completion": ...}; assistant turns may carry "tool_calls" '
            '([{"type": "function", "function": {"name": ..., "arguments": {...}}}]) answered by "tool" turns, '
            'with the functions in "tools" (per line) or data.tools_file.'
        )
    if not records:
        raise DataError(f"{key}: {path} holds no examples")
    return records


def _to_messages(obj, file_tools: list[dict] | None = None) -> tuple[dict | None, str | None]:
    if not isinstance(obj, dict):
        return None, f"expected a JSON object, got {type(obj).__name__}"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            return None, "'messages' must be a list of at least two messages"
        tools = file_tools
        if obj.get("tools") is not None:
            try:
                tools = _tools(obj["tools"])
            except ToolCallError as err:
                return None, str(err)
        out, why = _chat(msgs, tools)
        if why:
            return None, why
        return ({"messages": out, "tools": tools} if tools else {"messages": out}), None
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


def _chat(msgs: list, tools: list[dict] | None) -> tuple[list[dict], str | None]:
    """The messages with calls in canonical form, or the first problem: a bad role or content, a call
    without a name or with arguments that are not a JSON object, a tool turn with no call before it, a
    function not among the tools."""
    names = {t["function"]["name"] for t in tools} if tools else None
    out: list[dict] = []
    open_calls = 0  # calls of the last assistant turn not yet answered by a tool turn
    for i, m in enumerate(msgs):
        where = f"message {i}"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return [], f"{where}: each message needs a role in {ROLES}, got {m!r:.80}"
        role, content, calls = m["role"], m.get("content"), m.get("tool_calls")
        if calls is not None and role != "assistant":
            return [], f"{where}: only assistant turns carry tool_calls, not {role!r}"
        if calls:
            if not isinstance(calls, list):
                return [], f"{where}: 'tool_calls' must be a list of calls"
            try:
                canon = [canonical_call(c) for c in calls]
            except ToolCallError as err:
                return [], f"{where}: {err}"
            unknown = [c["name"] for c in canon if names is not None and c["name"] not in names]
            if unknown:
                return [], f"{where}: calls {unknown[0]!r}, which is not in the tools ({', '.join(sorted(names))})"
            if content is not None and not isinstance(content, str):
                return [], f"{where}: content must be a string or null"
            out.append(
                {
                    "role": role,
                    "content": content or "",
                    "tool_calls": [{"type": "function", "function": c} for c in canon],
                }
            )
            open_calls = len(canon)
            continue
        if not isinstance(content, str):
            return (
                [],
                f"{where}: each message needs a string content (an assistant turn with tool_calls may have none), got {m!r:.80}",
            )
        if role == "tool":
            if open_calls <= 0:
                return [], f"{where}: a tool turn with no assistant tool call before it"
            open_calls -= 1
        elif role != "system" or i:
            open_calls = 0
        msg = {"role": role, "content": content}
        if role == "tool" and isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    if out[-1]["role"] != "assistant":
        return [], "the last message must be the assistant's answer"
    return out, None
