"""Vocabulary trimming of the exported graph (export/vocab.py, export.vocab): against PyTorch restricted to the
kept tokens, with planted rows, through int4 with a shared tied embedding, under OpenVINO, from the CLI and in
the pipeline."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, genai_answers_are_ours, python_env, tiny_config


def _prompts(tokenizer, car_settings, n=6):
    from distill.data.car_assistant import generate

    return [tokenizer(e.request)["input_ids"] for e in list(generate("test", car_settings))[:n]]


def _teacher(tmp_path, tokenizer, model_type="qwen2", tie=True, seed=0, edit=None):
    from families.hf import build_from_config, save_model_atomically

    model = build_from_config(tiny_config(tokenizer, model_type=model_type, tie=tie), seed=seed)
    if edit:
        edit(model)
    return model, save_model_atomically(model, tokenizer, tmp_path / "teacher")


def _keep(tokenizer, car_settings, top=40):
    """The tokens of the training requests and answers, and the first ``top`` ids: a strict subset."""
    from distill.data.car_assistant import generate
    from export.vocab import choose_tokens, special_tokens

    seqs = [
        tokenizer(t)["input_ids"] for e in list(generate("train", car_settings))[:60] for t in (e.request, e.answer)
    ]
    return choose_tokens(seqs, len(tokenizer), top=top, always=special_tokens(tokenizer))


def _embedding_rows(folder) -> int:
    """Rows of the table the embedding lookup reads (after the token map)."""
    import onnx

    g = onnx.load(str(folder / "model.onnx")).graph
    table = next(n.input[0] for n in g.node if n.op_type == "Gather" and n.input[1] == "vocab_trim/input_ids")
    return next(i.dims[0] for i in g.initializer if i.name == table)


def test_choose_tokens_is_the_union_of_data_first_ids_and_specials():
    from export.vocab import TrimError, choose_tokens

    assert choose_tokens([[7, 3], [9]], 20, top=2, always=[19]) == [0, 1, 3, 7, 9, 19]
    assert choose_tokens([], 5, top=99) == [0, 1, 2, 3, 4]
    with pytest.raises(TrimError, match="token id 20 is outside the vocabulary"):
        choose_tokens([[1, 20]], 20, top=0)


def test_nearest_kept_maps_a_row_to_its_most_similar_kept_row():
    from export.vocab import nearest_kept

    rng = np.random.default_rng(0)
    table = rng.normal(size=(50, 8)).astype(np.float32)
    keep = np.array([1, 4, 9, 30])
    table[12] = 5 * table[9]  # planted: row 12 points exactly where kept row 9 does
    table[40] = -table[4] + 0.01 * table[30]  # opposite to 4: must not map to 4
    got = nearest_kept(table, keep, chunk=7)  # chunks that do not divide the table
    assert got[keep].tolist() == [0, 1, 2, 3] and got[12] == 2 and got[40] != 1
    sims = (table / np.linalg.norm(table, axis=1, keepdims=True)) @ (
        table[keep] / np.linalg.norm(table[keep], axis=1, keepdims=True)
    ).T
    assert np.array_equal(np.delete(got, keep), np.delete(sims.argmax(1), keep))


@pytest.mark.parametrize(
    ("model_type", "tie", "exporter"),
    [("qwen2", True, "fused"), ("llama", False, "dynamo")],
)
def test_trimmed_graph_generates_what_pytorch_generates_over_the_kept_tokens(
    tmp_path, tokenizer, car_settings, model_type, tie, exporter
):
    """Reference: transformers' greedy generation with every trimmed token suppressed. The graph keeps its
    inputs and outputs (full-vocabulary logits, trimmed ones at FILL) and its folder holds the token map."""
    import torch

    from export.onnx import export_onnx
    from export.runtime import OnnxCausalLM
    from export.vocab import FILL, special_tokens

    model, src = _teacher(tmp_path, tokenizer, model_type, tie)
    vocab, eos = len(tokenizer), tokenizer.eos_token_id
    prompts = _prompts(tokenizer, car_settings)
    with torch.no_grad():
        free = [model.generate(torch.tensor([p]), max_new_tokens=1, do_sample=False)[0, -1].item() for p in prompts]
    # the untrimmed model's first answer token is trimmed: the kept-token answers must differ from the free ones
    keep = [t for t in _keep(tokenizer, car_settings) if t not in set(free) - special_tokens(tokenizer)]
    prompts = [[t for t in p if t in set(keep)] for p in prompts]
    assert 100 < len(keep) < vocab - 100 and set(free) - set(keep)
    folder = export_onnx(src, tmp_path / "onnx", exporter=exporter, keep_tokens=keep)
    meta = json.loads((folder / "onnx_config.json").read_text())
    assert meta["vocab_size"] == vocab and meta["vocabulary"]["kept"] == len(keep)
    assert json.loads((folder / "token_map.json").read_text()) == keep
    assert _embedding_rows(folder) == len(keep)

    rt = OnnxCausalLM(folder)
    logits, _ = rt.forward(np.array([prompts[0]]), np.ones((1, len(prompts[0])), np.int64))
    dropped = sorted(set(range(vocab)) - set(keep))
    assert logits.shape[-1] == vocab and np.all(logits[..., dropped] == FILL)
    got = rt.generate(prompts, 16, batch_size=3)  # left-padded batches
    for p, g in zip(prompts, got, strict=True):
        with torch.no_grad():
            ref = model.generate(
                torch.tensor([p]),
                max_new_tokens=16,
                do_sample=False,
                suppress_tokens=dropped,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
            )[0, len(p) :].tolist()
        ref = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert g[: len(ref)] == ref


def test_a_trimmed_input_token_is_read_as_its_nearest_kept_token(tmp_path, tokenizer, car_settings):
    """Planted: the embedding row of a trimmed token is twice the row of a kept one, so the graph reads it as
    that kept token: same logits as PyTorch given the kept token."""
    import torch

    from export.onnx import export_onnx
    from export.runtime import OnnxCausalLM

    keep = _keep(tokenizer, car_settings)
    dropped = next(t for t in range(len(tokenizer)) if t not in set(keep))
    kept = keep[len(keep) // 2]

    def plant(model):
        emb = model.get_input_embeddings().weight
        with torch.no_grad():
            emb[dropped] = 2 * emb[kept]

    model, src = _teacher(tmp_path, tokenizer, "llama", tie=False, edit=plant)
    rt = OnnxCausalLM(export_onnx(src, tmp_path / "onnx", exporter="fused", keep_tokens=keep))
    seq = [keep[3], dropped, keep[5]]
    with_dropped, _ = rt.forward(np.array([seq]), np.ones((1, 3), np.int64))
    seq[1] = kept
    with_kept, _ = rt.forward(np.array([seq]), np.ones((1, 3), np.int64))
    assert np.array_equal(with_dropped, with_kept)
    with torch.no_grad():
        ref = model(torch.tensor([seq])).logits.numpy()
    assert np.abs(with_kept[..., keep] - ref[..., keep]).max() < 1e-4


def test_trimmed_int4_stores_the_tied_embedding_once_smaller_and_runs_under_openvino_and_genai(
    tmp_path, tokenizer, car_settings
):
    """The quantizers see an ordinary smaller embedding and LM head: int4 with the embedding shares the tied
    table, the file shrinks by the trimmed rows, and OpenVINO and onnxruntime-genai answer what ONNX Runtime
    answers."""
    pytest.importorskip("openvino")
    from export.onnx import export_onnx
    from export.runtime import OnnxCausalLM
    from quantize import quantize_int4

    _, src = _teacher(tmp_path, tokenizer, "qwen2", tie=True)
    keep = _keep(tokenizer, car_settings)
    sizes = {}
    for name, kept in (("full", None), ("trimmed", keep)):
        fp32 = export_onnx(src, tmp_path / name / "fp32", exporter="fused", keep_tokens=kept)
        q = quantize_int4(fp32, tmp_path / name / "int4", block_size=16, embedding=True)
        info = json.loads((q / "quantization.json").read_text())
        assert info["settings"]["embedding_shared"], info["settings"]
        sizes[name] = info["bytes"]
    assert json.loads((q / "token_map.json").read_text()) == keep  # travels with the quantized folder
    import onnx
    from onnx import helper

    g = onnx.load(str(q / "model.onnx")).graph
    head = next(n for n in g.node if n.op_type == "MatMulNBits" and "lm_head" in n.name)
    assert next(helper.get_attribute_value(a) for a in head.attribute if a.name == "N") == len(keep)
    table = next(n.input[0] for n in g.node if n.op_type == "GatherBlockQuantized")
    assert table == head.input[1]  # the embedding reads the head's kept rows
    assert sizes["trimmed"] < sizes["full"], sizes
    prompts = [[t for t in p if t in set(keep)] for p in _prompts(tokenizer, car_settings)]
    ort = OnnxCausalLM(q).generate(prompts, 12, batch_size=1)
    assert OnnxCausalLM(q, backend="openvino").generate(prompts, 12, batch_size=1) == ort
    assert all(t in set(keep) for a in ort for t in a)
    og = pytest.importorskip("onnxruntime_genai")  # the runtime in-car apps embed reads the same answers
    genai_answers_are_ours(og, q, prompts[:3], tokenizer.eos_token_id)


def test_export_cli_trims_and_refuses_a_bad_token_file_before_loading(tmp_path, tokenizer, car_settings):
    _, src = _teacher(tmp_path, tokenizer)
    keep = _keep(tokenizer, car_settings, top=0)
    good, bad = tmp_path / "keep.json", tmp_path / "bad.json"
    good.write_text(json.dumps(keep[::2]))
    bad.write_text(json.dumps([1, 2, len(tokenizer) + 5]))
    cmd = [sys.executable, "-m", "export", str(src)]
    res = subprocess.run(
        [*cmd, str(tmp_path / "bad"), "--keep-tokens", str(bad)],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and f"--keep-tokens: {bad}: token id {len(tokenizer) + 5} is outside" in res.stderr
    assert not (tmp_path / "bad").exists()
    res = subprocess.run(
        [*cmd, str(tmp_path / "out"), "--keep-tokens", str(good), "--vocab-top", "10", "--quantize", "int8"],
        cwd=ROOT,
        env=python_env(),
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    kept = json.loads((tmp_path / "out" / "int8" / "token_map.json").read_text())
    assert set(kept) == set(keep[::2]) | set(range(10)) | set(tokenizer.all_special_ids)


def test_trimming_refuses_a_graph_without_one_float_embedding_and_head(tmp_path, tokenizer):
    import onnx

    from export.onnx import export_onnx
    from export.vocab import TrimError, trim_vocabulary
    from quantize import quantize_int4

    _, src = _teacher(tmp_path, tokenizer)
    q = quantize_int4(export_onnx(src, tmp_path / "fp32", exporter="fused"), tmp_path / "int4", embedding=True)
    with pytest.raises(TrimError, match="trim the vocabulary of the fp32 export, before quantization"):
        trim_vocabulary(onnx.load(str(q / "model.onnx")), [0, 1, 2], len(tokenizer))


def test_pipeline_trims_the_shipped_files_to_the_data_and_reports_it(tmp_path, monkeypatch, cache_env):
    """``export.vocab.trim``: every ONNX file keeps the training data's tokens (never a test-only one); the
    report says so; the gate still runs on the trimmed files."""
    from transformers import AutoTokenizer

    from distill.config import compose
    from distill.data import encode_records, load_records
    from distill.pipeline import run
    from export.vocab import special_tokens

    over = ["+exp=smoke", "export.vocab.trim=true", "export.vocab.top=0", "quantize.variants=[int4]"]
    rc = compose([*over, "gate.variants=[int4]", "export.openvino=false"])
    m = run(rc, tmp_path / "run")
    keep = json.loads((tmp_path / "run" / "onnx" / "int4" / "token_map.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "student"))
    seen = {
        t
        for split in ("train", "validation")
        for ex in encode_records(tok, load_records(rc.data, split), rc.data.max_length)
        for t in ex["input_ids"]
    }
    assert set(keep) == seen | special_tokens(tok)
    vocab = m["onnx_int4"]["vocabulary"]["vocab_size"]
    assert m["onnx_fp32"]["vocabulary"] == {"kept": len(keep), "vocab_size": vocab} and len(keep) < vocab
    assert "Vocabulary trimmed to" in (tmp_path / "run" / "report.md").read_text()
    assert "gate" in m and m["onnx_int4"]["bytes"] > 0
