"""Task data: the built-in car-assistant generator or a user's JSONL files, tokenized with response masks."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from core.jsonl import DataError, read_jsonl
from distill.data.car_assistant import GeneratorSettings, generate

__all__ = ["DataError", "load_records", "data_hash", "encode_records", "generator_settings", "tags_of", "FILES"]
FILES = ("train_file", "validation_file", "test_file", "heldout_file")  # data.<split>_file of the jsonl source


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
    if dc.system_prompt is None:
        return base
    return hashlib.sha256(f"{base}\0system:{dc.system_prompt}".encode()).hexdigest()[:16]


def _source_hash(dc) -> str:
    if dc.source == "car_assistant":
        return generator_settings(dc).data_hash()
    h = hashlib.sha256()
    for name in FILES:
        p = getattr(dc, name)
        h.update(name.encode())
        if p:
            h.update(Path(p).read_bytes())
    return h.hexdigest()[:16]


def load_records(dc, split: str) -> list[dict]:
    """Records ``{"messages": [...]}`` of one split (empty list for an absent optional JSONL split), with
    ``data.system_prompt`` given to each record that has no system message."""
    if dc.source == "car_assistant":
        records = [e.to_record() for e in generate(split, generator_settings(dc))]
    else:
        path = getattr(dc, f"{split}_file")
        records = read_jsonl(path, key=f"data.{split}_file") if path else []
    if dc.system_prompt is not None:
        system = {"role": "system", "content": dc.system_prompt}
        records = [
            r if r["messages"][0]["role"] == "system" else {**r, "messages": [system, *r["messages"]]} for r in records
        ]
    return records


def encode_records(tokenizer, records: list[dict], max_length: int, key: str = "data") -> list[dict]:
    """Encode records; examples longer than ``max_length`` are one DataError listing them."""
    from core.chat import encode

    out, too_long = [], []
    for i, r in enumerate(records):
        ex = encode(tokenizer, r["messages"])
        if len(ex["input_ids"]) > max_length:
            too_long.append((i, len(ex["input_ids"])))
            continue
        ex["answer"] = r["messages"][-1]["content"]
        ex["tags"] = tags_of(r)
        ex["request"] = next((m["content"] for m in reversed(r["messages"]) if m["role"] == "user"), "")
        out.append(ex)
    if too_long:
        shown = ", ".join(f"#{i} ({n} tokens)" for i, n in too_long[:5])
        raise DataError(
            f"{key}: {len(too_long)} examples are longer than data.max_length={max_length}: {shown}; "
            "shorten them or raise data.max_length (up to the model's max_position_embeddings)"
        )
    return out


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]")


def tags_of(record: dict) -> dict[str, str]:
    """The slices an example is reported under: ``lang`` (``zh`` when the last user message has CJK
    characters, else ``en``, unless the record says), ``intent`` (the record's, else the reference tool
    call's name, else ``text``) and ``part`` (the record's held-out part, e.g. ``values``, if any)."""
    from distill.metrics import parse_tool_call

    msgs = record["messages"]
    user = next((m["content"] for m in reversed(msgs) if m["role"] == "user"), "")
    call = parse_tool_call(msgs[-1]["content"])
    tags = {
        "lang": record.get("lang") or ("zh" if _CJK.search(user) else "en"),
        "intent": record.get("intent") or (call["tool"] if call else "text"),
    }
    if record.get("part"):
        tags["part"] = record["part"]
    return tags
