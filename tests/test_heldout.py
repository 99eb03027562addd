"""Requests unlike training: the heldout split in the gate and the report, augmentation that cannot leak it,
and the extra training pools' shares."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_config

from distill.data.car_assistant import GeneratorSettings, generate, heldout_vocabulary, units
from export.gate import THRESHOLDS, evaluate_gate

HELDOUT_CHECKS = {k: None for k in THRESHOLDS}


def _gate(**on):
    return {**HELDOUT_CHECKS, **on}


def test_per_part_gate_names_the_part_that_fails():
    """Each part of the heldout split is its own check, relative to the teacher on that part."""
    teacher = {
        "exact_match": 0.9,
        "heldout": {
            "exact_match": 0.8,
            "slices": {"part": {"values": {"n": 10, "exact_match": 0.8}, "phrasing": {"n": 10, "exact_match": 0.9}}},
        },
    }
    student = {
        "exact_match": 0.9,
        "heldout": {
            "exact_match": 0.6,
            "slices": {"part": {"values": {"n": 10, "exact_match": 0.4}, "phrasing": {"n": 10, "exact_match": 0.9}}},
        },
    }
    res = evaluate_gate(
        teacher,
        {"onnx_int4": student},
        _gate(min_exact_match_retention=0.97, min_heldout_part_retention=0.9, min_heldout_exact_match_retention=0.7),
        0.05,
    )
    by = {c.metric: c for c in res.checks}
    assert by["exact_match"].passed and by["heldout[phrasing]/exact_match"].passed
    assert not by["heldout[values]/exact_match"].passed and by["heldout[values]/exact_match"].value == pytest.approx(
        0.5
    )
    assert by["heldout/exact_match"].value == pytest.approx(0.75) and by["heldout/exact_match"].passed
    assert not res.passed and by["heldout[values]/exact_match"].name == "min_heldout_part_retention"
    # a variant measured without the heldout split fails the held-out checks: nobody measured them
    res = evaluate_gate(teacher, {"onnx_int4": {"exact_match": 0.9}}, _gate(min_heldout_part_retention=0.9), 0.05)
    assert not res.passed and {c.note for c in res.checks} == {"not measured"} and len(res.checks) == 2


def test_gate_cli_rejudges_heldout_thresholds(tmp_path):
    from export.gate import main

    teacher = {"exact_match": 0.9, "heldout": {"exact_match": 0.8}}
    m = {"teacher": teacher, "onnx_int8": {"exact_match": 0.9, "heldout": {"exact_match": 0.6}}}
    res = evaluate_gate(teacher, {"onnx_int8": m["onnx_int8"]}, _gate(min_heldout_exact_match_retention=0.7), 0.05)
    m["gate"] = res.to_dict()
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(m))
    assert main([str(path)]) == 0  # the run's own threshold, read back by its name
    assert main([str(path), "--min-heldout-exact-match-retention", "0.8"]) == 3


def test_slices_and_misses_carry_the_examples_tags(tokenizer):
    from distill.data import encode_records
    from distill.metrics import slice_retention, slice_scores

    recs = [e.to_record() for e in generate("heldout", GeneratorSettings(num_heldout=30))]
    enc = encode_records(tokenizer, recs, 256)
    assert {ex["tags"]["part"] for ex in enc} == {"values", "phrasing", "both"}
    assert all(ex["request"] == r["messages"][0]["content"] for ex, r in zip(enc, recs, strict=True))
    refs = [ex["answer"] for ex in enc]
    preds = [r if ex["tags"]["part"] != "values" else "{}" for r, ex in zip(refs, enc, strict=True)]
    sl = slice_scores(preds, refs, [ex["tags"] for ex in enc])
    assert sl["part"]["values"]["exact_match"] == 0 and sl["part"]["phrasing"]["exact_match"] == 1
    assert sum(v["n"] for v in sl["lang"].values()) == 30
    perfect = {"slices": slice_scores(refs, refs, [ex["tags"] for ex in enc])}
    assert slice_retention({"slices": sl}, perfect, "part") == {"both": 1.0, "phrasing": 1.0, "values": 0.0}


def test_jsonl_heldout_file_is_read_sliced_and_required_by_the_gate(tmp_path):
    from distill.config import ConfigError, compose
    from distill.data import load_records

    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    lines = [e.to_record() for e in generate("train", GeneratorSettings(num_train=10))]
    train.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in lines))
    held.write_text(
        "".join(json.dumps({"messages": r["messages"], "part": "names"}) + "\n" for r in lines[:4])
        + json.dumps({"prompt": "hi", "completion": "hello", "part": 3})
        + "\n"
    )
    base = ["+exp=smoke", "data=jsonl", f"data.train_file={train}", f"data.test_file={train}"]
    with pytest.raises(ConfigError, match="gate.min_heldout_part_retention: there is no heldout split"):
        compose([*base, "gate.min_heldout_part_retention=0.9"])
    rc = compose([*base, f"data.heldout_file={held}", "gate.min_heldout_part_retention=0.9"])
    from distill.data import DataError

    with pytest.raises(DataError, match=r"held.jsonl:5: 'part' must be a string"):
        load_records(rc.data, "heldout")
    held.write_text("".join(json.dumps({"messages": r["messages"], "part": "names"}) + "\n" for r in lines[:4]))
    assert [r["part"] for r in load_records(rc.data, "heldout")] == ["names"] * 4


def test_old_split_keys_say_what_they_became():
    from distill.config import ConfigError, compose

    with pytest.raises(ConfigError) as err:
        compose(["+exp=smoke", "+data.hard_file=x.jsonl", "+data.held_out_fraction=0.2"])
    assert "data.hard_file: renamed to data.heldout_file" in str(err.value)
    assert "data.held_out_fraction: removed" in str(err.value)


# ---- augmentation ----


def test_random_values_replace_open_values_and_never_a_heldout_unit():
    from distill.augment import candidates
    from distill.data.augment import open_values, random_value

    train = [e.to_record() for e in generate("train", GeneratorSettings(num_train=3000))]
    avoid = heldout_vocabulary()
    cands = candidates(train, 1500, 0, avoid, 0.25)
    assert len(cands) == 1500
    cross = 0
    for rec, new in cands:
        request, call = rec["messages"][0]["content"], json.loads(rec["messages"][1]["content"])
        assert not units(request) & avoid, request  # nothing of the heldout split's values
        for key, value in new.items():
            assert value in request and call["args"][key] == value
        cross += any(
            ("a" <= c.lower() <= "z") != (rec["messages"][0]["content"].isascii()) for c in new.get("name", "")[:1]
        )
    assert cross > 0
    # enumerated codes are chosen, not copied: never treated as open values
    rec = {
        "messages": [
            {"role": "user", "content": "switch the driver seat heater on"},
            {"role": "assistant", "content": '{"tool":"x","args":{"seat":"driver","state":"on"}}'},
        ]
    }
    assert open_values(rec) == []
    # a planted avoid list that holds every one-syllable word of the generator's alphabet: never drawn
    rng = random.Random(1)
    planted = frozenset({"ba", "be", "bi"}) | frozenset(chr(c) for c in range(0x4E00, 0x4E00 + 5000))
    for _ in range(300):
        v = random_value(rng, "Alice Smith", planted, 0.5)
        assert not units(v) & planted


def test_bootstrap_random_values_rewrite_request_and_answer_together():
    """``teacher.bootstrap.random_values``: the share of examples with open values that get random ones,
    request and reference rewritten together; the rest untouched."""
    from distill.data.augment import open_values, randomize

    train = [e.to_record() for e in generate("train", GeneratorSettings(num_train=2000))]
    out = randomize(train, 0.5, 0, heldout_vocabulary(), 0.25)
    changed = [(a, b) for a, b in zip(train, out, strict=True) if a != b]
    with_values = sum(1 for r in train if open_values(r))
    assert 0.4 < len(changed) / with_values < 0.6
    for old, new in changed:
        call = json.loads(new["messages"][1]["content"])
        for key, value in open_values(new):
            assert call["args"][key] == value and value not in old["messages"][0]["content"]
        assert call["tool"] == json.loads(old["messages"][1]["content"])["tool"]
    assert randomize(train, 0.5, 0, heldout_vocabulary(), 0.25) == out  # seeded


def test_augmentation_keeps_only_what_the_teacher_answers_consistently(tokenizer, teacher_dir, monkeypatch):
    """A planted teacher: right on every other request, one wrong argument on the rest. Only the right
    ones are kept, each with the teacher's own answer as its target."""
    import distill.augment as aug
    from core.chat import encode
    from families.hf import load_causal_lm

    train = [e.to_record() for e in generate("train", GeneratorSettings(num_train=400))]
    cands = aug.candidates(train, 40, 0, heldout_vocabulary(), 0.25)
    by_prompt = {}
    for i, (rec, _) in enumerate(cands):
        ex = encode(tokenizer, rec["messages"])
        answer = json.loads(rec["messages"][-1]["content"])
        if i % 2:
            key = next(iter(answer["args"]))
            answer["args"][key] = "Wrong Value"
        text = json.dumps(answer, ensure_ascii=False, separators=(",", ": "))  # other spacing: still consistent
        by_prompt[tuple(ex["input_ids"][: ex["prompt_len"]])] = (
            i,
            tokenizer(text, add_special_tokens=False)["input_ids"],
        )

    def planted(model, tok, max_new_tokens, batch_size):
        return lambda prompts: [by_prompt[tuple(p)][1] for p in prompts]

    monkeypatch.setattr(aug, "hf_generate_fn", planted)
    kept, stats = aug.label(load_causal_lm(teacher_dir), tokenizer, cands, max_length=256, batch_size=8)
    assert stats["kept"] == len(kept) == 20 and stats["rejected"] == 20
    expected = {json.dumps(json.loads(cands[i][0]["messages"][-1]["content"]), sort_keys=True) for i in range(0, 40, 2)}
    got = {json.dumps(json.loads(r["messages"][-1]["content"]), sort_keys=True) for r in kept}
    assert got == expected
    assert all(": " in r["messages"][-1]["content"] for r in kept)  # the teacher's own text is the target
    assert all("Wrong Value" in r["teacher"] for r in stats["rejected_examples"])


def test_implied_augmentation_keeps_every_request_with_the_call_its_values_imply(tokenizer):
    """``distill.augment.keep=implied``: no teacher answers; every candidate that fits is kept, its target
    the substituted call (the new values copied into it); the long ones are counted, not kept."""
    from core.chat import encode
    from distill.augment import candidates, implied

    train = [e.to_record() for e in generate("train", GeneratorSettings(num_train=400))]
    cands = candidates(train, 60, 0, heldout_vocabulary(), 0.25)
    lengths = [len(encode(tokenizer, rec["messages"])["input_ids"]) for rec, _ in cands]
    limit = sorted(lengths)[45]  # a planted cut: those longer than it must be dropped
    kept, stats = implied(cands, tokenizer, max_length=limit)
    fits = [rec for (rec, _), n in zip(cands, lengths, strict=True) if n <= limit]
    assert 0 < len(kept) == stats["kept"] == len(fits) < len(cands)
    assert stats["too_long"] == len(cands) - len(fits) and stats["rejected"] == 0
    assert kept == fits
    for (rec, new), n in zip(cands, lengths, strict=True):
        if n > limit:
            continue
        call = json.loads(rec["messages"][-1]["content"])
        assert all(call["args"][k] == v and v in rec["messages"][-2]["content"] for k, v in new.items())
        assert not units(rec["messages"][-2]["content"]) & heldout_vocabulary()


def test_general_text_is_the_models_own_seeded_samples(tokenizer, teacher_dir, tmp_path):
    from core.chat import IGNORE
    from distill.general import as_examples, first_tokens, sample_general
    from distill.stages.inputs import corpus_sequences
    from families.hf import load_causal_lm

    model = load_causal_lm(teacher_dir)
    a = sample_general(model, tokenizer, 10, 12, 1.0, 0, 4, progress=False)
    assert len(a) == 10 and all(len(x) == 12 for x in a)
    assert a == sample_general(model, tokenizer, 10, 12, 1.0, 0, 4, progress=False)
    assert a != sample_general(model, tokenizer, 10, 12, 1.0, 1, 4, progress=False)
    starts = set(first_tokens(tokenizer))
    assert all(x[0] in starts for x in a) and not starts & set(tokenizer.all_special_ids)
    ex = as_examples(a)[0]
    assert ex["labels"][0] == IGNORE and ex["labels"][1:] == a[0][1:]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"navigate to Maple Street number {i}"}) + "\n" for i in range(40)))
    seqs = corpus_sequences(str(corpus), tokenizer, 5, 16)
    assert len(seqs) == 5 and all(len(x) == 16 for x in seqs)
    corpus.write_text('{"txt": 1}\n')
    from distill.data import DataError

    with pytest.raises(DataError, match=r"c.jsonl:1: expected"):
        corpus_sequences(str(corpus), tokenizer, 5, 16)


def test_general_text_written_by_the_base_is_the_bases_own_samples_cached_apart(
    tokenizer, teacher_dir, tmp_path, monkeypatch
):
    """``distill.general.writer=base``: the sequences are the pretrained base's own seeded samples (planted: a
    base whose weights differ from the teacher's), in a cache entry of their own beside the teacher's; the
    teacher's entry keeps its key (the knob's neutral value); refused without a fine-tuned teacher.path."""
    from types import SimpleNamespace

    from conftest import tiny_config

    from distill.config import ConfigError, compose
    from distill.general import sample_general
    from distill.manifest import Stages
    from distill.stages.inputs import general
    from distill.stages.run import LazyTeacher, Run
    from families.hf import build_from_config, load_causal_lm, save_model_atomically

    base = save_model_atomically(build_from_config(tiny_config(tokenizer), seed=1), tokenizer, tmp_path / "base")
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    common = ["+exp=smoke", f"teacher.path={base}", "teacher.finetune.enabled=true", "distill.general.examples=6"]
    common += ["distill.general.length=10", "distill.general.batch_size=4"]

    def pool(writer: str) -> list[list[int]]:
        rc = compose([*common, f"distill.general.writer={writer}"])
        acc = SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None)
        r = Run(rc=rc, dir=tmp_path, acc=acc, stages=Stages())
        r.base = base
        r.teacher = SimpleNamespace(id="teacher", tokenizer=tokenizer, model=LazyTeacher(teacher_dir, rc))
        general(r)
        return r.pools.general_sequences

    want = {
        who: sample_general(load_causal_lm(folder), tokenizer, 6, 10, 1.0, 0, 4, progress=False)
        for who, folder in (("teacher", teacher_dir), ("base", base))
    }
    assert want["teacher"] != want["base"]
    assert pool("base") == want["base"] and pool("teacher") == want["teacher"]
    assert len(list((tmp_path / "cache" / "general").iterdir())) == 2
    from core.hashing import digest

    before = {"teacher": "teacher", "tokens": len(tokenizer), "examples": 6, "length": 10, "temperature": 1.0}
    before |= {"batch_size": 4, "seed": 0}  # the teacher's entry's key as it was before the knob existed
    assert (tmp_path / "cache" / "general" / digest(before) / "sequences.json").is_file()
    assert pool("base") == want["base"]  # read back from its own entry
    with pytest.raises(ConfigError, match="distill.general.writer=base samples the pretrained model"):
        compose(["+exp=smoke", "distill.general.examples=6", "distill.general.writer=base"])


# ---- extra pools in every batch ----


def test_mixture_puts_each_pool_at_its_share_of_every_batch():
    from distill.train.batching import Mixture, make_stream

    main = [{"input_ids": [1] * (i % 7 + 1), "pool": "main", "i": i} for i in range(100)]
    aug = [{"input_ids": [2] * 3, "pool": "aug", "i": i} for i in range(30)]
    gen = [{"input_ids": [3] * 5, "pool": "gen", "i": i} for i in range(7)]
    mix = Mixture(main, [(aug, 0.5), (gen, 0.25), ([], 0.1)])
    assert len(mix) == 137 and mix[100]["pool"] == "aug" and mix[136]["pool"] == "gen"
    for group in (False, True):
        s = make_stream(mix, 16, 3, group)
        seen = {"aug": set(), "gen": set()}
        for j in range(10):
            batch = [mix[i] for i in s.global_batch(j)]
            pools = [e["pool"] for e in batch]
            assert pools.count("aug") == 8 and pools.count("gen") == 4 and pools.count("main") == 4
            assert pools[:8].count("aug") == 4  # spread: each half (each of 2 processes) gets its share
            for e in batch:
                if e["pool"] != "main":
                    seen[e["pool"]].add(e["i"])
        assert len(seen["aug"]) == 30 and len(seen["gen"]) == 7  # every example before any repeats twice
        assert s.global_batch(9) == make_stream(mix, 16, 3, group).global_batch(9)  # a pure function of (seed, j)
    with pytest.raises(ValueError, match="leave part of every batch"):
        Mixture(main, [(aug, 0.6), (gen, 0.4)])


def test_pool_use_counts_what_the_steps_read_and_names_the_rest(caplog):
    """A pool larger than its count per batch times the steps is partly labelled for nothing: the shipped
    SmolLM2 recipe read 1,200 of 1,660 augmented requests. Checked against the examples a real stream
    draws, with QAD's steps longer than distillation's and pruning's calibration reading general text."""
    import logging
    from types import SimpleNamespace

    from distill.config import compose
    from distill.stages.inputs import pool_use
    from distill.stages.run import Run
    from distill.train.batching import make_stream

    overrides = ["+exp=smoke", "student=pruned", "distill.train.steps=40", "distill.train.batch_size=16"]
    overrides += ["distill.augment.examples=250", "distill.augment.share=0.25", "distill.general.examples=150"]
    overrides += ["distill.general.share=0.1", "quantize.variants=[int4_qad]", "gate.variants=[int4_qad]"]
    overrides += ["quantize.int4_qad.steps=50"]
    rc = compose([*overrides, "student.prune.calib_general=120"])
    main = [{"input_ids": [1] * (i % 9 + 1)} for i in range(1000)]
    pools = {"augment": [{"input_ids": [2] * (i % 5 + 1)} for i in range(230)], "general": [{"input_ids": [3]}] * 150}
    r = Run(rc=rc, dir=None, acc=SimpleNamespace(num_processes=1), stages=None)
    r.teacher = SimpleNamespace(enc={"train": main})
    r.pools.examples = pools
    r.pools.info = {"augment": {"kept": 230}, "general": {"sequences": 150}}
    with caplog.at_level(logging.INFO, logger="distill"):
        pool_use(r)
    mix = r.train_data()
    stream = make_stream(mix, 16, rc.distill.train.seed, rc.distill.train.group_by_length)
    read = {i for j in range(50) for i in stream.global_batch(j)}  # QAD's 50 steps, longer than distillation's 40
    aug = len(read & set(range(mix.offsets[1], mix.offsets[2])))
    gen = len(read & set(range(mix.offsets[2], mix.offsets[3])))
    assert (aug, gen) == (200, 100)  # 4 and 2 a batch (sorted by name: augment, then general)
    assert r.pools.info["augment"]["read"] == aug and r.pools.info["general"]["read"] == 120  # pruning reads 120
    assert "augment: 50 steps read 200 of the 230 examples (4 a batch); 30 are never trained on" in caplog.text
    assert "distill.augment.examples=218 would label" in caplog.text  # 200 reads at 230 kept of 250
    assert "distill.general.examples=120 would make just those" in caplog.text
    from distill.report import _train_data

    info = {"task": 1000, "augment": {**r.pools.info["augment"], "candidates": 250, "rejected": 20, "share": 0.25}}
    (line,) = _train_data({**info, "general": {**r.pools.info["general"], "length": 64, "share": 0.1}})
    assert "230 augmented requests at 25% of every batch (the teacher answered 230 of 250" in line
    assert "20 rejected), of which training read 200;" in line and line.endswith("at 10%, of which training read 120.")
    caplog.clear()
    r = Run(rc=compose([*overrides, "quantize.int4_qad.steps=70"]), dir=None, acc=r.acc, stages=None)
    r.teacher, r.pools.examples = SimpleNamespace(enc={"train": main}), pools
    r.pools.info = {"augment": {"kept": 230}, "general": {"sequences": 150}}
    with caplog.at_level(logging.INFO, logger="distill"):
        pool_use(r)
    assert r.pools.info["augment"]["read"] == 230 and r.pools.info["general"]["read"] == 140
    assert "augment: 70 steps read all 230 examples" in caplog.text


# ---- the gate catches a student that memorised its names ----


@pytest.mark.slow
def test_student_trained_on_a_fixed_name_list_passes_in_distribution_and_fails_heldout(tokenizer):
    """A tiny model trained from scratch on calls to 6 names answers calls to those names in new
    wordings (the in-distribution test), and not calls to names it never saw (the heldout split's
    ``values`` part). Against a teacher that copies every name (the references), the gate passes the
    test checks and fails the held-out ones, naming the part."""
    from distill.data import encode_records
    from distill.data.car_assistant import INTENT_BY_NAME, Example, _wrap
    from distill.evaluate import evaluate_model
    from distill.metrics import score, slice_scores
    from distill.train import CrossEntropy, make_accelerator, train
    from families.hf import build_from_config

    s = GeneratorSettings(num_heldout=600)
    names = ["Alice Smith", "Bob Brown", "Carol King", "David Hall", "Emma Young", "Frank Green"]
    rng = random.Random(0)
    cores = INTENT_BY_NAME["call_contact"].en
    fixed = {}
    while len(fixed) < 400:
        k, name = rng.randrange(len(cores)), rng.choice(names)
        req = _wrap(rng, "en", cores[k].format(name=name))
        fixed[req] = Example(req, {"tool": "call_contact", "args": {"name": name}}, "en", "call_contact", "train", k)
    fixed = list(fixed.values())
    train_recs, test_recs = [e.to_record() for e in fixed[:-40]], [e.to_record() for e in fixed[-40:]]
    held = [e.to_record() for e in generate("heldout", s) if e.intent == "call_contact" and e.lang == "en"]
    held = [r for r in held if r["part"] in ("values", "phrasing") and r["messages"][0]["content"].isascii()][:60]
    enc = {
        k: encode_records(tokenizer, v, 128) for k, v in (("train", train_recs), ("test", test_recs), ("heldout", held))
    }
    assert {"values", "phrasing"} == {ex["tags"]["part"] for ex in enc["heldout"]}

    model = build_from_config(tiny_config(tokenizer, hidden=64, layers=2, heads=4, kv=2, inter=128), seed=0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    from distill.config import compose

    tc = compose(["+exp=smoke"]).teacher.bootstrap.train
    import dataclasses

    tc = dataclasses.replace(tc, steps=300, batch_size=16, lr=3e-3, warmup_steps=10, log_every=50)
    train(model, tokenizer, enc["train"], tc, accelerator=make_accelerator("no"), mode=CrossEntropy(1024))
    with torch.no_grad():
        got = {
            k: evaluate_model(model, tokenizer, enc[k], max_new_tokens=None, batch_size=32)[0]
            for k in ("test", "heldout")
        }
    assert got["test"]["exact_match"] >= 0.9, got["test"]
    # the teacher: every reference answer (it copies any name)
    refs = {k: [ex["answer"] for ex in enc[k]] for k in ("test", "heldout")}
    teacher = {**score(refs["test"], refs["test"]), "heldout": score(refs["heldout"], refs["heldout"])}
    teacher["heldout"]["slices"] = slice_scores(refs["heldout"], refs["heldout"], [ex["tags"] for ex in enc["heldout"]])
    student = {**got["test"], "heldout": got["heldout"]}
    res = evaluate_gate(
        teacher,
        {"onnx_fp32": student},
        _gate(min_exact_match_retention=0.9, min_tool_accuracy_retention=0.99, min_heldout_part_retention=0.9),
        0.05,
    )
    by = {c.metric: c for c in res.checks}
    assert by["exact_match"].passed and by["tool_accuracy"].passed, res.describe()
    assert not by["heldout[values]/exact_match"].passed and by["heldout[values]/exact_match"].value < 0.5, (
        res.describe()
    )
    assert not res.passed
