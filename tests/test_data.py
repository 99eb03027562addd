"""The car-assistant generator: determinism, split guarantees, bilingual coverage, copyable tokens."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from distill.data.car_assistant import (
    HELDOUT_CORES,
    HELDOUT_PARTS,
    HO_EN_MSG,
    HO_ZH_MSG,
    INTENT_BY_NAME,
    INTENTS,
    OPEN_INTENTS,
    SPLITS,
    GeneratorSettings,
    _reserved,
    _unseen,
    build_pools,
    generate,
    heldout_vocabulary,
    training_vocabulary,
    units,
)


def test_deterministic_and_versioned(car_settings):
    a = [e.to_record() for e in generate("test", car_settings)]
    b = [e.to_record() for e in generate("test", car_settings)]
    assert a == b
    other = dataclasses.replace(car_settings, seed=1)
    assert other.data_hash() != car_settings.data_hash()
    assert [e.request for e in generate("test", other)] != [r["messages"][0]["content"] for r in a]


def test_answers_are_compact_tool_calls(car_settings):
    for split in ("train", "test", "heldout"):
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


def _core_pattern(core: str) -> re.Pattern:
    """A phrasing as a regex: its fixed text in order, any slot value between."""
    fixed = re.split(r"\{\w+\}", core)
    return re.compile("(.+)".join(re.escape(f) for f in fixed), re.IGNORECASE)


@pytest.fixture(scope="module")
def big_splits():
    s = GeneratorSettings(num_train=20000, num_validation=400, num_test=600, num_heldout=900)
    return {split: generate(split, s) for split in SPLITS}


def test_heldout_values_share_no_word_or_character_with_training(big_splits):
    """The planted truth of the heldout split: every open value of its ``values`` and ``both`` parts (names,
    destinations, artists) has no English word and no Chinese character that any training request has; the
    message texts use templates no training request contains; a quarter cross scripts."""
    train_units = set().union(*(units(e.request) for e in big_splits["train"]))
    held_messages = [_core_pattern(m.replace("{n}", "{p}")) for m in (*HO_EN_MSG, *HO_ZH_MSG)]
    held = big_splits["heldout"]
    assert {e.part for e in held} == set(HELDOUT_PARTS) and all(e.split == "heldout" for e in held)
    new_values = [e for e in held if e.part in ("values", "both")]
    assert len(new_values) == 600 and {e.intent for e in new_values} == set(OPEN_INTENTS)
    for e in new_values:
        args = e.call["args"]
        for key in ("destination", "name", "artist"):
            if key in args:
                assert args[key] in e.request and not units(args[key]) & train_units, (e.request, args[key])
        if "text" in args:  # a held-out template: no training request holds its wording
            assert any(p.fullmatch(args["text"]) for p in held_messages), args["text"]
    for e in big_splits["train"]:
        assert not any(p.search(e.request) for p in held_messages), e.request
    cross = [e for e in new_values if e.cross_script]
    assert 0.15 < len(cross) / len(new_values) < 0.35
    latin_in_zh = [e for e in cross if e.lang == "zh" and re.search(r"[A-Za-z]{3}", e.call["args"].get("name", "x"))]
    cjk_in_en = [
        e for e in cross if e.lang == "en" and units(e.request) - set(re.findall(r"[a-z]+", e.request.lower()))
    ]
    assert latin_in_zh and cjk_in_en
    # the filter that makes this true, on a planted collision: a training word is dropped, a new one kept
    assert _unseen(["Alice", "Zorblax", "Kai Smith"]) == ("Zorblax",)
    assert not heldout_vocabulary() & training_vocabulary()


def test_heldout_phrasings_never_match_a_training_request(big_splits):
    held = big_splits["heldout"]
    patterns = {
        (name, lang): [_core_pattern(c) for c in cores[i]]
        for name, cores in HELDOUT_CORES.items()
        for i, lang in enumerate(("en", "zh"))
    }
    assert set(HELDOUT_CORES) == {i.name for i in INTENTS}
    new_phrasing = [e for e in held if e.part in ("phrasing", "both")]
    for e in new_phrasing:
        assert patterns[e.intent, e.lang][e.core].search(e.request), (e.request, e.core)
    for e in (x for split in ("train", "validation", "test") for x in big_splits[split]):
        assert not any(p.search(e.request) for p in patterns[e.intent, e.lang]), e.request
    # the phrasing part keeps training values: only the wording is new
    pools = build_pools()
    for e in held:
        if e.part == "phrasing" and e.intent in ("call_contact", "navigate_to"):
            v = e.call["args"].get("name") or e.call["args"]["destination"]
            assert v in pools[e.lang, "train"].names + pools[e.lang, "train"].places
    # and the values part keeps training phrasings
    for e in held:
        if e.part == "values":
            cores = INTENT_BY_NAME[e.intent].en if e.lang == "en" else INTENT_BY_NAME[e.intent].zh
            assert _core_pattern(cores[e.core]).search(e.request), e.request


def test_tokenizer_makes_values_copyable(tokenizer, car_settings):
    from core.chat import encode

    for e in generate("heldout", car_settings)[:40]:
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
    for split in ("train", "test", "heldout"):
        for e in generate(split, car_settings)[:300]:
            for text in (e.request, e.answer):
                assert (
                    reloaded(text, add_special_tokens=False)["input_ids"]
                    == tokenizer(text, add_special_tokens=False)["input_ids"]
                ), text
