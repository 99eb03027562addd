"""Teacher sources: a GGUF file converted once into a standard folder with the same logits, a pretrained
model fine-tuned (full or LoRA) into the task teacher and cached, SmolLM2's real tokenizer and chat
template through the whole pipeline, and the data knobs that real models need (system prompt, batches
grouped by length)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from conftest import chat_tokenizer, mixed_jsonl, smollm2_gguf, tiny_config


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    from families.gguf import convert_gguf

    return convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("gguf") / "smollm2")


@pytest.fixture(scope="module")
def texts(car_settings):
    from distill.data.car_assistant import generate

    return [t for e in generate("train", car_settings) for t in (e.request, e.answer)]


def _chat_ids(tok, request: str) -> torch.Tensor:
    text = tok.apply_chat_template([{"role": "user", "content": request}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False).input_ids


@pytest.mark.slow
def test_gguf_teacher_is_a_standard_folder_with_the_gguf_logits(smollm2_folder):
    """SmolLM2-135M-Instruct (Q4_1 GGUF) becomes a safetensors folder with config, tokenizer, chat template
    and generation config; reloaded by plain transformers it gives the GGUF-loaded model's logits and
    greedy answer, and its end-of-turn token is <|im_end|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.chat import end_of_turn_id
    from core.hashing import sha256_file
    from families.gguf import gguf_problems

    path = smollm2_gguf()
    assert gguf_problems(path, "teacher.path") == []
    names = {p.name for p in smollm2_folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "gguf.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".gguf")) for n in names)
    info = json.loads((smollm2_folder / "gguf.json").read_text())
    assert info["sha256"] == sha256_file(path) and info["max_logit_diff"] <= 1e-4

    folder_model = AutoModelForCausalLM.from_pretrained(str(smollm2_folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("<|im_end|>")
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    ids = _chat_ids(tok, "打开驾驶座的座椅加热")
    with torch.no_grad():
        a, b = folder_model(ids).logits, gguf_model.eval()(ids).logits
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
        kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tok.pad_token_id}
        assert torch.equal(folder_model.generate(ids, **kw), gguf_model.generate(ids, **kw))


@pytest.mark.slow
def test_a_conversion_that_does_not_reproduce_the_logits_is_not_kept(tmp_path, monkeypatch):
    import families.gguf as g

    monkeypatch.setattr(g, "MAX_LOGIT_DIFF", -1.0)  # nothing can pass: the check must refuse
    with pytest.raises(RuntimeError, match="does not reproduce its logits"):
        g.convert_gguf(smollm2_gguf(), tmp_path / "converted")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling is left


# ---- fine-tuning a pretrained model into the task teacher ----


def _records(car_settings):
    from distill.data.car_assistant import generate

    return {s: [e.to_record() for e in generate(s, car_settings)] for s in ("train", "test")}


def _answer_loss(folder: Path, tok, records, n=32) -> float:
    from transformers import AutoModelForCausalLM

    from core.chat import collate, encode

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    batch = collate([encode(tok, r["messages"]) for r in records[:n]], tok.pad_token_id)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_finetune_full_and_lora_train_the_base_once_and_lora_touches_only_its_targets(
    texts, car_settings, tmp_path, monkeypatch
):
    """A pretrained base (a tiny Llama with a ChatML tokenizer) fine-tuned on the task: the answer loss
    drops, the folder is cached by (base, data, settings) and reused without training, and a LoRA fine-tune
    merges back into a plain folder whose only changed weights are the LoRA targets'."""
    from safetensors.torch import load_file

    import distill.train
    from core.hashing import folder_hash
    from distill.config import compose
    from distill.teacher import finetune_teacher
    from distill.train import make_accelerator
    from families.hf import build_from_config, save_model_atomically

    tok = chat_tokenizer("chatml", texts)
    base = save_model_atomically(build_from_config(tiny_config(tok, model_type="llama"), seed=0), tok, tmp_path / "b")
    records = _records(car_settings)
    overrides = [
        "+exp=smoke",
        f"teacher.path={base}",
        f"teacher.cache_dir={tmp_path / 'cache'}",
        "teacher.finetune.enabled=true",
        "teacher.finetune.train.steps=25",
        "teacher.finetune.train.lr=3e-3",
        "teacher.finetune.train.warmup_steps=2",
        "teacher.finetune.min_exact_match=0",
        "eval.num_test=8",
        "eval.max_new_tokens=8",
    ]
    rc = compose(overrides)
    acc = make_accelerator("no")
    kw = {"accelerator": acc, "max_length": 128}
    tune = lambda tc: finetune_teacher(tc, base, folder_hash(base), records, "d1", rc.eval, **kw)  # noqa: E731
    full = tune(rc.teacher)
    before, after = _answer_loss(base, tok, records["train"]), _answer_loss(full, tok, records["train"])
    assert after < 0.7 * before, (before, after)
    info = json.loads((full / "teacher.json").read_text())
    assert info["base_hash"] == folder_hash(base) and info["settings"]["lora"]["enabled"] is False
    assert info["train_tokens"] > 0 and "exact_match" in info["test"]

    def no_training(*a, **k):
        raise AssertionError("a cached fine-tune was trained again")

    monkeypatch.setattr(distill.train, "train", no_training)
    assert tune(rc.teacher) == full  # same base, data and settings: reused
    monkeypatch.undo()

    rc_lora = compose(
        [*overrides, "teacher.finetune.lora.enabled=true", "teacher.finetune.lora.target_modules=[q_proj,v_proj]"]
    )
    lora = tune(rc_lora.teacher)
    assert lora != full
    w0, w1 = load_file(str(base / "model.safetensors")), load_file(str(lora / "model.safetensors"))
    assert w0.keys() == w1.keys()  # merged back: no adapter weights, loads as the base's architecture
    changed = {k for k in w0 if not torch.equal(w0[k], w1[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), changed
    assert _answer_loss(lora, tok, records["train"]) < before


@pytest.mark.slow
def test_smollm2_tokenizer_and_template_through_the_pipeline_with_a_finetuned_teacher(
    smollm2_folder, car_settings, tmp_path, monkeypatch, caplog
):
    """SmolLM2's real tokenizer (49,152 tokens) and ChatML template with its default system prompt, on a
    tiny Llama base fine-tuned inside the pipeline (teacher.finetune), JSONL data in both forms with
    tool-call and free-text answers: prune, distill, export and gate run; answers end with <|im_end|> in
    PyTorch and ONNX, and the ONNX student reproduces the PyTorch one."""
    from transformers import AutoTokenizer

    from distill.config import compose
    from distill.data.car_assistant import generate
    from distill.pipeline import run
    from families.hf import build_from_config, save_model_atomically

    tok = AutoTokenizer.from_pretrained(str(smollm2_folder))
    cfg = tiny_config(tok, model_type="llama", hidden=64, heads=4, kv=2)
    cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    base = save_model_atomically(build_from_config(cfg, seed=0), tok, tmp_path / "smol-tiny")

    train, test = (
        mixed_jsonl(tmp_path / "train.jsonl", generate("train", car_settings)[:200]),
        mixed_jsonl(tmp_path / "test.jsonl", generate("test", car_settings)[:10]),
    )
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    rc = compose(
        [
            "+exp=smoke",
            "data=jsonl",
            f"data.train_file={train}",
            f"data.test_file={test}",
            "data.max_length=192",
            f"teacher.path={base}",
            "teacher.finetune.enabled=true",
            "teacher.finetune.train.steps=3",
            "teacher.finetune.min_exact_match=0",
            "student.prune.fraction=0.5",
            "distill.features.weight=0",
            "distill.train.steps=3",
            "distill.train.group_by_length=true",
            "eval.max_new_tokens=10",
            "export.openvino=false",
            "quantize.variants=[int8]",
            "distill.general.examples=4",  # general text written by the base, not the fine-tuned teacher
            "distill.general.length=8",
            "distill.general.share=0.25",
            "distill.general.writer=base",
        ]
    )
    import distill.general

    writers, sample = [], distill.general.sample_general

    def recorded(model, *a, **k):
        writers.append(model.name_or_path)
        return sample(model, *a, **k)

    monkeypatch.setattr(distill.general, "sample_general", recorded)
    with caplog.at_level(logging.INFO, logger="distill"):
        m = run(rc, tmp_path / "run")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    record = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]
    assert record["teacher"]["status"] == "ran" and "/teachers/ft-" in record["teacher"]["folder"]
    student = tmp_path / "run" / "student"
    first = lambda ids: ids[0] if isinstance(ids, list) else ids  # noqa: E731 (one stop id is saved as an int)
    assert first(json.loads((student / "generation_config.json").read_text())["eos_token_id"]) == im_end
    meta = json.loads((tmp_path / "run" / "onnx" / "int8" / "onnx_config.json").read_text())
    assert first(meta["eos_token_id"]) == im_end
    assert m["onnx_fp32"]["exact_match"] == m["student"]["exact_match"] and "gate" in m
    assert writers == [str(base)]  # the general text's writer: the folder the fine-tune started from
    pool = json.loads((Path(record["general"]["folder"]) / "sequences.json").read_text())
    assert len(pool) == 4 and all(len(x) == 8 for x in pool)

    # The fine-tuned teacher's folder carries its test evaluation; the evaluate stage took the teacher's
    # test answers and top-k signals from it instead of generating again, and they are what a fresh
    # evaluation of that folder on the run's examples gives.
    from safetensors.torch import load_file

    from distill.data import encode_records, load_records
    from distill.evaluate import OWN_EVAL, OWN_TOPK, eval_settings, evaluate_model, split_key
    from families.hf import load_causal_lm

    folder = Path(record["teacher"]["folder"])
    own = json.loads((folder / OWN_EVAL).read_text())
    assert "measured by the teacher stage" in caplog.text
    assert m["teacher"]["exact_match"] == own["scores"]["exact_match"]
    t_tok = AutoTokenizer.from_pretrained(str(folder))
    enc = encode_records(t_tok, load_records(rc.data, "test"), rc.data.max_length)
    assert split_key(enc, rc.eval) == own["key"]
    scores, answers = evaluate_model(
        load_causal_lm(folder), t_tok, enc, keep_topk=rc.eval.kl_topk, **eval_settings(rc.eval)
    )
    assert answers == own["answers"] and scores["exact_match"] == own["scores"]["exact_match"]
    assert torch.equal(scores["signals"].indices, load_file(str(folder / OWN_TOPK))["indices"])


# ---- data knobs for real models ----


def test_system_prompt_is_given_to_every_example_without_one_and_versions_the_data(tmp_path):
    from distill.config import compose
    from distill.data import data_hash, load_records

    plain = compose(["+exp=smoke"]).data
    prompted = compose(["+exp=smoke", "data.system_prompt=In-car assistant."]).data
    assert data_hash(plain) != data_hash(prompted)
    records = load_records(prompted, "test")
    assert all(r["messages"][0] == {"role": "system", "content": "In-car assistant."} for r in records)
    assert [r["messages"][1:] for r in records] == [r["messages"] for r in load_records(plain, "test")]
    own = tmp_path / "own.jsonl"
    own.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Mine."},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        )
        + "\n"
    )
    jsonl = compose(
        ["+exp=smoke", "data=jsonl", f"data.train_file={own}", f"data.test_file={own}", "data.system_prompt=X"]
    ).data
    assert load_records(jsonl, "train")[0]["messages"][0]["content"] == "Mine."  # an example's own system message wins


def test_batches_grouped_by_length_pad_less_and_still_cover_every_example_once_per_epoch():
    import random

    from distill.train.batching import BatchStream

    rng = random.Random(0)
    lengths = [rng.randint(20, 200) for _ in range(1000)]
    gb = 16
    grouped, plain = BatchStream(1000, gb, 3, lengths), BatchStream(1000, gb, 3)
    steps = 1000 // gb
    seen = [i for j in range(steps) for i in grouped.global_batch(j)]
    assert sorted(seen) == sorted(set(seen)) and len(seen) == steps * gb  # no example twice in an epoch

    def padded(stream):
        return sum(gb * max(lengths[i] for i in stream.global_batch(j)) for j in range(steps))

    real = sum(lengths[i] for i in seen)
    assert padded(grouped) < 1.1 * real < padded(plain)  # plain random batches pad ~1.6x here
    again = BatchStream(1000, gb, 3, lengths)
    assert [again.global_batch(j) for j in (0, 7, 62)] == [grouped.global_batch(j) for j in (0, 7, 62)]
    longest = [max(lengths[i] for i in grouped.global_batch(j)) for j in range(steps)]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # batch order stays random


def _capture_prune_records(monkeypatch) -> dict:
    """Replace ``prune.prune_folder`` with a stub that keeps the calibration records the CLI passes it."""
    import prune

    got: dict = {}
    monkeypatch.setattr(
        prune,
        "prune_folder",
        lambda *a, **k: (
            got.update(records=k["records"]) or {"shape": 0, "params": 0, "teacher_params": 0, "fraction": 0}
        ),
    )
    return got


def test_prune_cli_calibrates_on_the_data_of_a_pipeline_run(tmp_path, monkeypatch, caplog):
    """``python -m prune --run DIR`` ranks channels on the run's own training data (its JSONL and system
    prompt), not on the built-in demo text; without --data or --run it says loudly that it falls back."""
    import logging

    import prune.__main__ as cli

    own = tmp_path / "train.jsonl"
    own.write_text("\n".join(json.dumps({"prompt": f"Q{i}", "completion": f"A{i}"}) for i in range(5)) + "\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = {"source": "jsonl", "train_file": str(own), "test_file": str(own), "system_prompt": "Be brief."}
    (run_dir / "config.yaml").write_text(json.dumps({"name": "x", "data": data}))
    got = _capture_prune_records(monkeypatch)
    assert cli.main(["src", str(tmp_path / "out"), "--fraction", "0.5", "--run", str(run_dir)]) == 0
    assert [r["messages"][1]["content"] for r in got["records"]] == [f"Q{i}" for i in range(5)]
    assert all(r["messages"][0] == {"role": "system", "content": "Be brief."} for r in got["records"])
    with caplog.at_level(logging.WARNING, logger="prune"):
        assert cli.main(["src", str(tmp_path / "out"), "--fraction", "0.5", "--calib-examples", "8"]) == 0
    assert "NOT on your task" in caplog.text and len(got["records"]) >= 8
    assert cli.main(["src", "out", "--fraction", "0.5", "--run", str(tmp_path)]) == 2  # no config.yaml there


def test_prune_cli_reads_function_calling_data_with_a_tools_file(tmp_path, monkeypatch, capsys):
    """``python -m prune --data calls.jsonl --tools-file tools.json``: lines without their own ``tools`` get
    the file's, and a call to a function the tools lack is one clear error naming the line."""
    import prune.__main__ as cli

    tools = [{"name": "open_window", "parameters": {"type": "object", "properties": {"side": {"type": "string"}}}}]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    call = {"type": "function", "function": {"name": "open_window", "arguments": {"side": "left"}}}
    line = {
        "messages": [{"role": "user", "content": "open the left window"}, {"role": "assistant", "tool_calls": [call]}]
    }
    data = tmp_path / "calls.jsonl"
    data.write_text(json.dumps(line) + "\n")
    got = _capture_prune_records(monkeypatch)
    args = ["src", str(tmp_path / "out"), "--fraction", "0.5", "--data", str(data)]
    assert cli.main([*args, "--tools-file", str(tmp_path / "tools.json")]) == 0
    (rec,) = got["records"]
    assert rec["tools"][0]["function"]["name"] == "open_window"
    assert rec["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"side": "left"}
    capsys.readouterr()
    other = [{"name": "close_window", "parameters": {"type": "object", "properties": {}}}]
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert cli.main([*args, "--tools-file", str(tmp_path / "other.json")]) == 2
    err = capsys.readouterr().err
    assert f"{data}:1" in err and "'open_window', which is not in the tools" in err
    assert cli.main(["src", "out", "--fraction", "0.5", "--tools-file", str(tmp_path / "tools.json")]) == 2


@pytest.mark.slow
def test_embeddings_that_differ_only_by_padding_rows_distill_and_export(tokenizer, tmp_path, monkeypatch):
    """Qwen2.5's case (151,936 embedding rows in one model, 152,064 in another, one tokenizer): a teacher
    and a student folder whose embeddings carry different numbers of padding rows are accepted, distilled
    over the real vocabulary and exported; the tokenizers, not the row counts, decide."""
    from distill.config import compose
    from distill.pipeline import run
    from families.hf import build_from_config, save_model_atomically, vocab_problems

    n = len(tokenizer)
    teacher = save_model_atomically(
        build_from_config(tiny_config(tokenizer, vocab=n + 64), 0), tokenizer, tmp_path / "t"
    )
    student_cfg = tiny_config(tokenizer, hidden=32, heads=2, kv=1, inter=64, vocab=n + 128)
    student = save_model_atomically(build_from_config(student_cfg, 1), tokenizer, tmp_path / "s")
    assert vocab_problems(teacher, student, "student.path") == []
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    rc = compose(
        [
            "+exp=smoke",
            f"teacher.path={teacher}",
            "student=folder",
            f"student.path={student}",
            "distill.features.weight=0",
            "distill.train.steps=3",
            "export.openvino=false",
            "quantize.variants=[int8]",
        ]
    )
    m = run(rc, tmp_path / "run")
    assert m["onnx_fp32"]["exact_match"] == m["student"]["exact_match"]
    assert json.loads((tmp_path / "run" / "student" / "config.json").read_text())["vocab_size"] == n + 128
