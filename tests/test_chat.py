"""Real families' chat templates: the answer ends with the template's end-of-turn token, generation stops
on it, tokenizers without a pad token work everywhere, and a tokenizer without a template is one clear
error. Tokenizers are built here with each family's special tokens and template (nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
from conftest import chat_tokenizer, mixed_jsonl, tiny_config

from core.chat import IGNORE, check_template, collate, encode, end_of_turn_id, ensure_pad, stop_ids

MESSAGES = [{"role": "user", "content": "Call Alice Smith"}, {"role": "assistant", "content": "Calling Alice now."}]
EXPECTED = {
    "chatml": ("<|im_end|>", "<|endoftext|>"),
    "llama3": ("<|eot_id|>", "<|end_of_text|>"),
    "mistral": ("</s>", "</s>"),
}


@pytest.fixture(scope="module")
def texts(car_settings):
    from distill.data.car_assistant import generate

    return [t for e in generate("train", car_settings) for t in (e.request, e.answer)]


@pytest.mark.parametrize("style", sorted(EXPECTED))
def test_the_answer_ends_with_the_templates_end_of_turn_token(style, texts):
    tok = chat_tokenizer(style, texts)
    eot, eos = (tok.convert_tokens_to_ids(t) for t in EXPECTED[style])
    assert end_of_turn_id(tok) == eot and stop_ids(tok) == ([eot] if eot == eos else [eot, eos])
    ex = encode(tok, MESSAGES)
    assert ex["input_ids"][-1] == eot and ex["labels"][-1] == eot  # learned, not masked
    answer = [t for t, lab in zip(ex["input_ids"], ex["labels"], strict=True) if lab != IGNORE]
    assert tok.decode(answer[:-1]) == "Calling Alice now."
    # the prompt is what generation starts from: the template's own generation prompt
    assert tok.decode(ex["input_ids"][: ex["prompt_len"]]) == tok.apply_chat_template(
        MESSAGES[:1], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.parametrize("style", ["llama3", "mistral"])
def test_a_tokenizer_without_pad_gets_one_that_is_never_trained_on(style, texts):
    tok = chat_tokenizer(style, texts)
    assert tok.pad_token_id is None
    assert ensure_pad(tok) == EXPECTED[style][0] and tok.pad_token_id == end_of_turn_id(tok)
    assert ensure_pad(tok) is None  # already has one
    short, long = encode(tok, MESSAGES), encode(tok, [MESSAGES[0], {"role": "assistant", "content": "x " * 20}])
    b = collate([short, long], tok.pad_token_id)
    n = len(short["input_ids"])
    assert (b["labels"][0, n:] == IGNORE).all() and (b["attention_mask"][0, n:] == 0).all()


def test_a_tokenizer_without_a_chat_template_is_one_clear_error(texts):
    tok = chat_tokenizer("chatml", texts)
    tok.chat_template = None
    (problem,) = check_template(tok, "teacher.path")
    assert problem.startswith("teacher.path: the tokenizer has no chat template") and "chat_template" in problem


@pytest.mark.slow
def test_llama3_style_teacher_without_pad_token_on_jsonl_data_end_to_end(texts, car_settings, tmp_path, monkeypatch):
    """A Llama-3-style tokenizer (no pad token, <|eot_id|> ending turns, <|end_of_text|> as eos) on a tiny
    Llama teacher, JSONL data in both forms with tool-call and free-text answers: the smoke pipeline runs
    through export and gate; the student learned to end answers with <|eot_id|>, stops on it in PyTorch and
    ONNX, and records the pad token it was given."""
    from distill.config import compose
    from distill.data.car_assistant import generate
    from distill.pipeline import run
    from families.hf import build_from_config, save_model_atomically

    tok = chat_tokenizer("llama3", texts)
    cfg = tiny_config(tok, model_type="llama", heads=4, kv=2)
    cfg.pad_token_id, cfg.bos_token_id = None, tok.bos_token_id
    teacher = save_model_atomically(build_from_config(cfg, seed=0), tok, tmp_path / "llama3")
    assert (
        "pad_token" not in json.loads((teacher / "tokenizer_config.json").read_text())
        or json.loads((teacher / "tokenizer_config.json").read_text()).get("pad_token") is None
    )

    train, test = (
        mixed_jsonl(tmp_path / "train.jsonl", generate("train", car_settings)[:300]),
        mixed_jsonl(tmp_path / "test.jsonl", generate("test", car_settings)[:12]),
    )
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    rc = compose(
        [
            "+exp=smoke",
            "data=jsonl",
            f"data.train_file={train}",
            f"data.test_file={test}",
            "data.max_length=160",
            f"teacher.path={teacher}",
            "distill.train.steps=4",
            "distill.on_policy.fraction=0.5",  # the student's own samples, padded with the end-of-turn token
            "eval.max_new_tokens=12",
            "export.openvino=false",
            "quantize.variants=[int8]",
        ]
    )
    m = run(rc, tmp_path / "run")
    eot, eos = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|end_of_text|>")
    student = tmp_path / "run" / "student"
    assert json.loads((student / "generation_config.json").read_text())["eos_token_id"] == [eot, eos]
    assert json.loads((student / "tokenizer_config.json").read_text())["pad_token"] == "<|eot_id|>"
    meta = json.loads((tmp_path / "run" / "onnx" / "int8" / "onnx_config.json").read_text())
    assert meta["eos_token_id"][:1] == [eot] and meta["pad_token_id"] == eot
    assert m["onnx_fp32"]["exact_match"] == m["student"]["exact_match"] and "gate" in m


def test_editing_the_chat_template_changes_the_teacher_hash(teacher_dir, tmp_path):
    """Every file that changes behaviour is in the folder hash behind the stage keys: a new chat template
    (or generation config, or tokenizer) redoes the stages that used the teacher."""
    import shutil

    from core.hashing import folder_hash

    d = shutil.copytree(teacher_dir, tmp_path / "t")
    before = folder_hash(d)
    template = d / "chat_template.jinja"
    assert template.is_file()
    template.write_text(template.read_text() + "{# edited #}")
    after_template = folder_hash(d)
    gen = d / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "eos_token_id": [1, 2]}))
    after_generation = folder_hash(d)
    assert len({before, after_template, after_generation}) == 3
    (d / "README.md").write_text("notes")  # not part of what the model computes or how it is prompted
    assert folder_hash(d) == after_generation
