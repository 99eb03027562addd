"""The car-assistant generator: determinism, split guarantees, bilingual coverage, copyable tokens."""

from __future__ import annotations

import dataclasses
import json

import pytest

from distill.data.car_assistant import INTENTS, GeneratorSettings, _reserved, build_pools, generate


def test_deterministic_and_versioned(car_settings):
    a = [e.to_record() for e in generate("test", car_settings)]
    b = [e.to_record() for e in generate("test", car_settings)]
    assert a == b
    other = dataclasses.replace(car_settings, seed=1)
    assert other.data_hash() != car_settings.data_hash()
    assert [e.request for e in generate("test", other)] != [r["messages"][0]["content"] for r in a]


def test_answers_are_compact_tool_calls(car_settings):
    for split in ("train", "test", "hard"):
        for e in generate(split, car_settings):
            call = json.loads(e.answer)
            assert set(call) == {"tool", "args"} and isinstance(call["args"], dict)
            assert " " not in e.answer.replace(call["args"].get("text", ""), "").replace(
                call["args"].get("name", ""), ""
            ).replace(call["args"].get("destination", ""), "").replace(call["args"].get("artist", ""), "")


def test_bilingual_and_every_domain(car_settings):
    train = generate("train", car_settings)
    assert {e.lang for e in train} == {"en", "zh"}
    assert {e.intent for e in train} == {i.name for i in INTENTS}
    assert any("\u4e00" <= ch <= "\u9fff" for e in train if e.lang == "zh" for ch in e.request)


def test_test_split_pairs_never_seen_in_training():
    s = GeneratorSettings(num_train=3000, num_test=300)
    train, test = generate("train", s), generate("test", s)
    assert not {e.request for e in train} & {e.request for e in test}
    # The planted truth: every test pair is reserved by the hash, and training never holds a reserved pair.
    by_name = {i.name: i for i in INTENTS}
    train_pairs = set()
    for e in train:
        i = by_name[e.intent]
        if i.primary:
            key = e.call["args"][i.primary]
            assert not _reserved(i.name, e.lang, e.core, key, s.reserve_modulus)
            train_pairs.add((i.name, e.lang, e.core, json.dumps(key)))
    checked = 0
    for e in test:
        i = by_name[e.intent]
        if i.primary:
            key = e.call["args"][i.primary]
            assert _reserved(i.name, e.lang, e.core, key, s.reserve_modulus)
            assert (i.name, e.lang, e.core, json.dumps(key)) not in train_pairs
            checked += 1
    assert checked > 200


def _matches(core: str, request: str) -> bool:
    fixed = [p for part in core.split("{") for p in [part.split("}")[-1]] if p.strip()]
    return all(f.strip().lower() in request.lower() for f in fixed)


def test_hard_split_values_and_phrasings_never_in_training():
    s = GeneratorSettings(num_train=4000, num_hard=300)
    train, hard = generate("train", s), generate("hard", s)
    train_answers = " ".join(e.answer for e in train)
    pools = build_pools(s.held_out_fraction)
    hard_values = {v for p in pools.values() for pool in (p.names, p.places, p.artists) for v in pool["hard"]}
    copied = [e for e in hard if e.intent in ("navigate_to", "call_contact", "play_music", "send_message")]
    assert len(copied) > 30
    for e in copied:
        for key in ("destination", "name", "artist"):
            v = e.call["args"].get(key)
            if v:
                assert v in hard_values and f'"{v}"' not in train_answers
    # held-out phrasings: every hard request uses its intent's last core, which no training request does
    for i in INTENTS:
        if i.primary is None:
            continue
        for lang, cores in (("en", i.en), ("zh", i.zh)):
            ours = [e for e in hard if e.intent == i.name and e.lang == lang]
            assert ours and all(e.core == len(cores) - 1 and _matches(cores[-1], e.request) for e in ours)
            assert all(e.core < len(cores) - 1 for e in train if e.intent == i.name and e.lang == lang)


def test_tokenizer_makes_values_copyable(tokenizer, car_settings):
    from core.chat import encode

    for e in generate("hard", car_settings)[:40]:
        enc = encode(tokenizer, e.to_record()["messages"])
        prompt = enc["input_ids"][: enc["prompt_len"]]
        answer = enc["input_ids"][enc["prompt_len"] :]
        for key in ("name", "destination", "artist"):
            v = e.call["args"].get(key)
            if not v:
                continue
            ids = tokenizer(v, add_special_tokens=False)["input_ids"]
            assert _contains(prompt, ids) and _contains(answer, ids), (v, tokenizer.convert_ids_to_tokens(ids))
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    assert [p for p, _ in pre.pre_tokenize_str("2025")] == ["2", "0", "2", "5"]
    assert len(pre.pre_tokenize_str("北京西站")) == 4  # every CJK character is its own piece
    assert len(tokenizer("2025", add_special_tokens=False)["input_ids"]) == 4


def _contains(seq, sub) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_labels_cover_only_the_answer(tokenizer, car_settings):
    from core.chat import IGNORE, encode

    e = generate("train", car_settings)[0]
    enc = encode(tokenizer, e.to_record()["messages"])
    labelled = [t for t in enc["labels"] if t != IGNORE]
    assert labelled[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labelled[:-1]) == e.answer
    assert all(t == IGNORE for t in enc["labels"][: enc["prompt_len"]])


def test_jsonl_reader(tmp_path, tokenizer):
    from core.jsonl import read_jsonl
    from distill.data import DataError, encode_records

    good = tmp_path / "good.jsonl"
    good.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                ]
            }
        )
        + "\n\n"
        + json.dumps({"prompt": "open window", "completion": '{"tool":"open_window","args":{}}'})
        + "\n",
        encoding="utf-8",
    )
    recs = read_jsonl(good)
    assert len(recs) == 2 and recs[1]["messages"][0]["role"] == "user"
    enc = encode_records(tokenizer, recs, 128)
    assert enc[0]["answer"] == "hello"
    text = tokenizer.decode(enc[0]["input_ids"][: enc[0]["prompt_len"]])
    assert text == "<|system|>be brief<|user|>hi<|assistant|>"  # the tokenizer's chat template
    with pytest.raises(DataError, match="longer than data.max_length=5"):
        encode_records(tokenizer, recs, 5)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\nnot json\n{"text": "x"}\n')
    with pytest.raises(DataError) as err:
        read_jsonl(bad)
    msg = str(err.value)
    assert "bad.jsonl:1" in msg and "bad.jsonl:2" in msg and "bad.jsonl:3" in msg and "prompt" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_jsonl(empty)


def test_autotokenizer_reload_is_faithful(tmp_path, tokenizer, teacher_dir, car_settings):
    """AutoTokenizer loads Qwen2 folders as Qwen2Tokenizer, which swaps in Qwen's pre-tokenizer regex.
    Our merges never cross our piece boundaries, so the ids must not change: checked on every split."""
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(teacher_dir))
    assert len(reloaded) == len(tokenizer) and reloaded.get_vocab() == tokenizer.get_vocab()
    for split in ("train", "test", "hard"):
        for e in generate(split, car_settings)[:300]:
            for text in (e.request, e.answer):
                assert (
                    reloaded(text, add_special_tokens=False)["input_ids"]
                    == tokenizer(text, add_special_tokens=False)["input_ids"]
                ), text
