"""Task data: the built-in car-assistant generator or a user's JSONL files, tokenized with response masks."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from core.jsonl import DataError, read_jsonl, read_tools
from distill.data.car_assistant import TOOL_FORMAT_VERSION, GeneratorSettings, generate, tool_call_records

__all__ = [
    "DataError",
    "load_records",
    "data_hash",
    "encode_records",
    "generator_settings",
    "tags_of",
    "FILES",
    "TEMPLATES",
    "chat_template_text",
    "uses_tools",
    "encoding",
    "prepare_tokenizer",
]
FILES = ("train_file", "validation_file", "test_file", "heldout_file")  # data.<split>_file of the jsonl source
# chat templates shipped with the project (data.chat_template=<name>; any other value is a .jinja file)
# tool_chatml lists tools compactly (one line each); tool_chatml_json as one JSON list (~275 vs ~172 tokens a line),
# which onnxruntime-genai's apply_chat_template renders exactly as transformers does
TEMPLATES = {
    name: Path(__file__).resolve().parents[2] / "conf" / "templates" / f"{name}.jinja"
    for name in ("tool_chatml", "tool_chatml_json")
}


def chat_template_text(dc) -> str | None:
    """The chat template ``data.chat_template`` names (a shipped one or a Jinja file), None when unset."""
    if dc.chat_template is None:
        return None
    path = TEMPLATES.get(dc.chat_template, Path(dc.chat_template))
    if not path.is_file():
        raise DataError(f"data.chat_template: {path} does not exist (shipped: {', '.join(TEMPLATES)})")
    return path.read_text(encoding="utf-8")


def encoding(dc) -> dict:
    """``encode_records``' settings from the data config: the turns trained on and the call syntax."""
    return {"targets": dc.targets, "fmt": None if dc.tool_format == "auto" else dc.tool_format}


def prepare_tokenizer(tokenizer, dc, records: list[dict], key: str) -> list[str]:
    """Give ``tokenizer`` the chat template ``data.chat_template`` names (if set) and return the problems
    formatting ``records`` with it (function-calling data: a template must render tools, calls and tool
    turns; ``tool_chatml`` needs the ChatML tokens). Reads no weights."""
    from core.chat import check_template, check_tools_template

    template = chat_template_text(dc)
    if template is not None:
        tokenizer.chat_template = template
        key = "data.chat_template"
    problems = check_template(tokenizer, key)
    if dc.chat_template == "tool_chatml":
        vocab = tokenizer.get_vocab()
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
        if missing:
            problems.append(
                f"data.chat_template=tool_chatml writes ChatML markers, and this tokenizer has no {' / '.join(missing)} "
                "token; give data.chat_template a Jinja file in the model's own chat format that renders tools, "
                "tool_calls and tool turns"
            )
    if not problems and uses_tools(records):
        problems += check_tools_template(tokenizer, key)
    return problems


def uses_tools(records: list[dict]) -> bool:
    """Whether records are function-calling chat: tools, assistant tool calls or tool turns."""
    return any(
        r.get("tools") or any(m["role"] == "tool" or m.get("tool_calls") for m in r["messages"]) for r in records
    )


def generator_settings(dc) -> GeneratorSettings:
    return GeneratorSettings(
        seed=dc.seed,
        num_train=dc.num_train,
        num_validation=dc.num_validation,
        num_test=dc.num_test,
        num_heldout=dc.num_heldout,
        reserve_modulus=dc.reserve_modulus,
        cross_script=dc.cross_script,
    )


def data_hash(dc) -> str:
    """Version of the data: hash of the generator settings, or of the JSONL files' bytes (and of
    ``data.system_prompt`` when one is set)."""
    base = _source_hash(dc)
    extra = [f"system:{dc.system_prompt}"] if dc.system_prompt is not None else []
    if dc.chat_template is not None:
        extra.append(f"template:{chat_template_text(dc)}")
    if dc.targets != "all":
        extra.append(f"targets:{dc.targets}")
    if dc.source == "car_assistant" and dc.format != "text":
        extra.append(f"format:{TOOL_FORMAT_VERSION}:{dc.tools_per_example}:{dc.multi_turn}")
    if not extra:
        return base
    return hashlib.sha256("\0".join([base, *extra]).encode()).hexdigest()[:16]


def _source_hash(dc) -> str:
    if dc.source == "car_assistant":
        return generator_settings(dc).data_hash()
    h = hashlib.sha256()
    for name in (*FILES, "tools_file"):
        p = getattr(dc, name)
        h.update(name.encode())
        if p:
            h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def load_records(dc, split: str) -> list[dict]:
    """Records ``{"messages": [...]}`` of one split (empty list for an absent optional JSONL split), with
    ``data.system_prompt`` given to each record that has no system message."""
    if dc.source == "car_assistant":
        examples = generate(split, generator_settings(dc))
        if dc.format == "tool_calls":
            records = tool_call_records(examples, tools_per_example=dc.tools_per_example, multi_turn=dc.multi_turn)
        else:
            records = [e.to_record() for e in examples]
    else:
        path = getattr(dc, f"{split}_file")
        tools = read_tools(dc.tools_file) if dc.tools_file else None
        records = read_jsonl(path, key=f"data.{split}_file", tools=tools) if path else []
    if dc.system_prompt is not None:
        system = {"role": "system", "content": dc.system_prompt}
        records = [
            r if r["messages"][0]["role"] == "system" else {**r, "messages": [system, *r["messages"]]} for r in records
        ]
    return records


def encode_records(
    tokenizer, records: list[dict], max_length: int, key: str = "data", targets: str = "all", fmt: str | None = None
) -> list[dict]:
    """Encode records (with their tools; ``targets``: which assistant turns are trained on); examples longer
    than ``max_length`` are one DataError listing them. Each example keeps ``answer``, its final answer as
    the model writes it (a call as the template spells it), its ``tools`` and ``tags``. A call the template
    writes in a syntax ``fmt`` (default: read from the template) does not parse back is a DataError."""
    from core.chat import IGNORE, call_format, encode, end_of_turn_id
    from core.toolcalls import canonical_call, parse, same_calls

    fmt = fmt or call_format(tokenizer)
    eot = end_of_turn_id(tokenizer)
    out, too_long, unread = [], [], []
    for i, r in enumerate(records):
        ex = encode(tokenizer, r["messages"], tools=r.get("tools"), targets=targets)
        if len(ex["input_ids"]) > max_length:
            too_long.append((i, len(ex["input_ids"])))
            continue
        last = r["messages"][-1]
        if last.get("tool_calls"):
            answer = [t for t in ex["labels"][ex["prompt_len"] :] if t != IGNORE and t != eot]
            ex["answer"] = tokenizer.decode(answer, skip_special_tokens=True)
            wanted = [canonical_call(c) for c in last["tool_calls"]]
            if not same_calls(parse(ex["answer"], fmt)["tool_calls"], wanted):
                unread.append((i, ex["answer"]))
        else:
            ex["answer"] = last["content"]
        ex["tools"] = r.get("tools")
        ex["format"] = fmt  # the call syntax answers are parsed in (distill.metrics)
        ex["tags"] = tags_of(r)
        ex["request"] = next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
        out.append(ex)
    if too_long:
        shown = ", ".join(f"#{i} ({n} tokens)" for i, n in too_long[:5])
        raise DataError(
            f"{key}: {len(too_long)} examples are longer than data.max_length={max_length}: {shown}; "
            "shorten them or raise data.max_length (up to the model's max_position_embeddings)"
        )
    if unread:
        i, text = unread[0]
        raise DataError(
            f"{key}: the chat template writes example #{i}'s tool call as {text!r:.120}, which the {fmt!r} call "
            "parser does not read back; set data.tool_format to the template's syntax (hermes, llama3_json, "
            "mistral, json) or data.chat_template to a template that writes one of them"
        )
    return out


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def tags_of(record: dict) -> dict[str, str]:
    """The slices an example is reported under: ``lang`` (``zh`` when the last user message has CJK
    characters, else ``en``, unless the record says), ``intent`` (the record's, else the reference tool
    call's name, else ``text``), ``part`` (the record's held-out part, e.g. ``values``, if any) and, for
    function-calling chat, ``turns`` (``multi`` when an earlier request came before the last, else ``single``)."""
    from distill.metrics import parse_tool_call

    msgs = record["messages"]
    user = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
    calls = msgs[-1].get("tool_calls")
    call = parse_tool_call(msgs[-1]["content"] or "")
    name = calls[0]["function"]["name"] if calls else call["tool"] if call else "text"
    tags = {
        "lang": record.get("lang") or ("zh" if _CJK.search(user) else "en"),
        "intent": record.get("intent") or name,
    }
    if record.get("part"):
        tags["part"] = record["part"]
    if uses_tools([record]):
        tags["turns"] = "multi" if sum(m["role"] == "user" for m in msgs) > 1 else "single"
    return tags
