"""Tool calls in the ecosystem's format (OpenAI / TRL): their canonical form, the syntaxes models write them
in, parsing generated text back into calls, and checking a call against the tools' JSON schemas.

Pure Python (no torch, no transformers needed): the release gate, the metrics and the car's runtime parse
with this same code. A call's canonical form is ``{"name": str, "arguments": dict}``; a parsed turn is
``{"content": str, "tool_calls": [call, ...]}`` plus ``malformed``, the number of call blocks that were
started but could not be read.

``FORMATS`` is the one list of call syntaxes; ``format_of`` picks one from a chat template's text:

- ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Hermes, Qwen2.5 / Qwen3, our
  ``conf/templates/tool_chatml.jinja``), any number of blocks, text around them is the content;
- ``llama3_json``: the turn is one JSON object ``{"name": ..., "parameters": {...}}`` (Llama-3.1 / 3.2),
  optionally after ``<|python_tag|>``, several separated by ``;``;
- ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` or ``[TOOL_CALLS]name[ARGS]{...}``;
- ``json``: the whole turn is a JSON object (or a list of them) with ``name`` and ``arguments`` /
  ``parameters``, or this project's compact ``{"tool": ..., "args": {...}}``.

A tokenizer with a transformers ``response_template`` is parsed by transformers' own parser instead
(``parse(..., response_template=...)``), when transformers is installed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

FORMATS = ("hermes", "llama3_json", "mistral", "json")


class ToolCallError(ValueError):
    """A tool call or tool list that cannot be read (the message says what is wrong)."""


# ----------------------------------------------------------------------------------------- canonical form


def canonical_call(call: Any) -> dict:
    """``{"name", "arguments"}`` of one call written the OpenAI / TRL way (``{"type": "function",
    "function": {"name", "arguments"}}``) or flat (``{"name", "arguments"}``); arguments may be an object or
    a JSON string of one. Raises ToolCallError naming what is missing."""
    if not isinstance(call, dict):
        raise ToolCallError(f"a tool call must be an object, got {type(call).__name__}")
    fn = call.get("function", call)
    if not isinstance(fn, dict):
        raise ToolCallError("'function' of a tool call must be an object with 'name' and 'arguments'")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ToolCallError(f"a tool call needs a function name, got {fn.get('name')!r}")
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as err:
            raise ToolCallError(f"the arguments of {name!r} are not JSON ({err.msg}): {args!r:.80}") from None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ToolCallError(f"the arguments of {name!r} must be a JSON object, got {type(args).__name__}")
    return {"name": name, "arguments": args}


def canonical_tool(tool: Any) -> dict:
    """The function schema ``{"name", "description", "parameters"}`` of a tool given the OpenAI way
    (``{"type": "function", "function": {...}}``) or flat."""
    if not isinstance(tool, dict):
        raise ToolCallError(f"a tool must be a JSON-schema object, got {type(tool).__name__}")
    fn = tool.get("function", tool)
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ToolCallError(f"a tool needs a function name, got {tool!r:.80}")
    params = fn.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, dict):
        raise ToolCallError(f"the parameters of tool {fn['name']!r} must be a JSON schema object")
    return {"name": fn["name"], "description": fn.get("description", ""), "parameters": params}


def openai_tool(tool: Any) -> dict:
    """A tool in the ``{"type": "function", "function": {...}}`` form chat templates expect."""
    return {"type": "function", "function": canonical_tool(tool)}


def openai_call(call: Any) -> dict:
    """A call in the ``{"type": "function", "function": {"name", "arguments": {...}}}`` form chat
    templates expect (arguments as an object)."""
    return {"type": "function", "function": canonical_call(call)}


def canon(value: Any) -> str:
    """A value as canonical JSON (sorted keys): equal values, equal strings."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def same_calls(a: Sequence[dict], b: Sequence[dict]) -> bool:
    """Whether two lists of canonical calls are equal, order-free (parallel calls), as multisets."""
    return sorted(canon(c) for c in a) == sorted(canon(c) for c in b)


# ----------------------------------------------------------------------------------------- parsing


def _turn(content: str, calls: list[dict], malformed: int = 0) -> dict:
    return {"content": content.strip(), "tool_calls": calls, "malformed": malformed}


def _calls_of(obj: Any) -> list[dict] | None:
    """Canonical calls of a decoded JSON value (an object or a list of them), None when it is not calls."""
    items = obj if isinstance(obj, list) else [obj]
    out = []
    for it in items:
        if not isinstance(it, dict):
            return None
        if "tool" in it and "name" not in it and "function" not in it:  # this project's compact form
            if not isinstance(it["tool"], str) or not isinstance(it.get("args", {}), dict):
                return None
            it = {"name": it["tool"], "arguments": it.get("args", {})}
        if "name" not in it and "function" not in it:
            return None
        try:
            out.append(canonical_call(it))
        except ToolCallError:
            return None
    return out or None


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return _NOT_JSON


_NOT_JSON = object()
_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


def _parse_hermes(text: str) -> dict:
    calls, malformed = [], 0
    for m in _HERMES.finditer(text):
        found = _calls_of(_json_value(m.group(1).strip()))
        if found is None:
            malformed += 1
        else:
            calls += found
    return _turn(_HERMES.sub("", text), calls, malformed)


def _parse_llama3(text: str) -> dict:
    body = text.replace("<|python_tag|>", "").strip()
    if not body.startswith(("{", "[")):
        return _turn(text, [])
    whole = _calls_of(_json_value(body))
    if whole is not None:
        return _turn("", whole)
    calls, malformed = [], 0
    for part in (p.strip() for p in body.split(";")):
        if not part:
            continue
        found = _calls_of(_json_value(part))
        if found is None:
            malformed += 1
        else:
            calls += found
    if not calls and malformed:
        return _turn("", [], 1) if body.startswith("{") and '"name"' in body else _turn(text, [])
    return _turn("", calls, malformed)


_MISTRAL_ARGS = re.compile(r"([A-Za-z0-9_.\-]+)\[ARGS\]")


def _parse_mistral(text: str) -> dict:
    if "[TOOL_CALLS]" not in text:
        return _turn(text, [])
    content, _, rest = text.partition("[TOOL_CALLS]")
    calls, malformed = [], 0
    for chunk in (c.strip() for c in rest.split("[TOOL_CALLS]")):
        if not chunk:
            continue
        if chunk.startswith("["):  # v3: a JSON list of calls
            found = _calls_of(_json_value(chunk))
            calls, malformed = (calls + found, malformed) if found else (calls, malformed + 1)
            continue
        m = _MISTRAL_ARGS.match(chunk)  # v11+: name[ARGS]{...}
        if not m:
            malformed += 1
            continue
        args = _json_value(chunk[m.end() :].strip())
        if isinstance(args, dict):
            calls.append({"name": m.group(1), "arguments": args})
        else:
            malformed += 1
    return _turn(content, calls, malformed)


def _parse_json(text: str) -> dict:
    body = text.strip()
    if not body.startswith(("{", "[")):
        return _turn(text, [])
    value = _json_value(body)
    found = _calls_of(value) if value is not _NOT_JSON else None
    if found is not None:
        return _turn("", found)
    # JSON-looking text that is not a call: a broken call when it names one, else plain content
    looks_like_call = body.startswith("{") and ('"tool"' in body or '"name"' in body)
    return _turn("", [], 1) if looks_like_call else _turn(text, [])


_PARSERS = {"hermes": _parse_hermes, "llama3_json": _parse_llama3, "mistral": _parse_mistral, "json": _parse_json}


def parse(text: str, fmt: str = "json", *, response_template: dict | None = None, tools=None) -> dict:
    """The turn a model wrote: ``{"content", "tool_calls", "malformed"}``. ``fmt`` is one of ``FORMATS``;
    a ``response_template`` (transformers' response parsing schema, from a tokenizer) takes precedence
    when transformers is installed."""
    if response_template is not None:
        parsed = _parse_with_transformers(text, response_template, tools)
        if parsed is not None:
            return parsed
    if fmt not in _PARSERS:
        raise ValueError(f"unknown tool-call format {fmt!r}; known: {FORMATS}")
    return _PARSERS[fmt](text)


def _parse_with_transformers(text: str, response_template: dict, tools) -> dict | None:
    try:
        from transformers.utils.chat_parsing import parse_response
    except ImportError:  # the car's runtime without transformers: the registry's parser
        return None
    try:
        msg = parse_response(text, response_template, prefix="", tools=tools)
    except Exception:  # noqa: BLE001 - an unparseable answer is a malformed turn, not a crash
        return _turn("", [], 1)
    calls, malformed = [], 0
    for c in msg.get("tool_calls") or []:
        try:
            calls.append(canonical_call(c))
        except ToolCallError:
            malformed += 1
    content = msg.get("content") or ""
    return _turn(content if isinstance(content, str) else json.dumps(content), calls, malformed)


def format_of(template: str | None) -> str:
    """The call syntax a chat template writes (one of ``FORMATS``), read from its text; ``json`` when it
    writes none of the others (a template without tool support: calls are plain JSON answers)."""
    t = template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "python_tag" in t or ('"parameters"' in t and "tool_calls" in t):
        return "llama3_json"
    return "json"


def render_call(call: dict, fmt: str) -> str:
    """How a model writing ``fmt`` spells one canonical call (used for probes and fixtures)."""
    c = canonical_call(call)
    if fmt == "hermes":
        return "<tool_call>\n" + json.dumps(c, ensure_ascii=False) + "\n</tool_call>"
    if fmt == "llama3_json":
        return json.dumps({"name": c["name"], "parameters": c["arguments"]}, ensure_ascii=False)
    if fmt == "mistral":
        return "[TOOL_CALLS]" + json.dumps([c], ensure_ascii=False)
    return json.dumps(c, ensure_ascii=False)


# ----------------------------------------------------------------------------------------- schemas

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def _type_ok(value: Any, types: Any) -> bool:
    names = types if isinstance(types, list) else [types]
    for t in names:
        py = _TYPES.get(t)
        if py is None:
            return True  # a type this checker does not know: not held against the call
        if isinstance(value, bool) and t in ("integer", "number"):
            continue
        if isinstance(value, py):
            return True
    return False


def schema_problems(call: dict, tools: Sequence[dict]) -> list[str]:
    """What is wrong with a canonical ``call`` against the ``tools`` it could use (empty when valid): an
    unknown function, missing required arguments, unknown arguments (unless the schema allows extra ones),
    a value of the wrong type or outside its ``enum`` (BFCL's AST checks)."""
    schemas = {t["name"]: t for t in (canonical_tool(t) for t in tools)}
    spec = schemas.get(call["name"])
    if spec is None:
        return [f"unknown function {call['name']!r}"]
    params = spec["parameters"]
    props = params.get("properties", {}) or {}
    args = call["arguments"]
    problems = [f"missing required argument {k!r}" for k in params.get("required", []) if k not in args]
    for k, v in args.items():
        p = props.get(k)
        if p is None:
            if params.get("additionalProperties", False) is False:
                problems.append(f"unknown argument {k!r}")
            continue
        if "type" in p and not _type_ok(v, p["type"]):
            problems.append(f"argument {k!r} should be {p['type']}, got {type(v).__name__}")
        elif "enum" in p and v not in p["enum"]:
            problems.append(f"argument {k!r}={v!r} is not one of {p['enum']}")
    return problems


def tool_names(tools: Sequence[dict] | None) -> set[str]:
    return {canonical_tool(t)["name"] for t in tools or []}
