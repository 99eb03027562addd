"""ONNX export with KV cache, the torch-free runner, quantization and the release gate, on tiny models.

References: PyTorch's own logits and greedy generations (fp32 must reproduce them), and planted
truths (a stop token placed where greedy decoding will produce it; corrupted weights that must fail
the gate)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import genai_answers_are_ours, tiny_config

from core.onnx_files import EXTERNAL_DATA_FILE, ONNX_FILE
from export.onnx import export_onnx, to_float16
from export.runtime import ChatTokenizer, OnnxCausalLM, _sample
from families.hf import build_from_config, save_model_atomically

FAMILIES = [  # (model_type, tied embeddings, query heads, kv heads): GQA ratios 1, 2 and 4
    ("qwen2", True, 4, 2),
    ("llama", False, 4, 4),
    ("qwen3", True, 4, 1),
    ("mistral", False, 4, 2),
    ("phi3", False, 4, 2),  # fused qkv_proj / gate_up_proj
    ("gemma3_text", True, 4, 1),  # sliding-window and global layers, two rotary bases, (1 + w) norms, q/k norms
    ("gemma2", False, 4, 2),  # sliding-window layers, soft-capped attention and logits
]
GEMMA = ("gemma3_text", "gemma2")


def _prompts(tokenizer, car_settings, n=6):
    from core.chat import encode
    from distill.data.car_assistant import generate

    exs = [encode(tokenizer, e.to_record()["messages"]) for e in generate("test", car_settings)[:n]]
    return [ex["input_ids"][: ex["prompt_len"]] for ex in exs], [ex["input_ids"] for ex in exs]


def _model(tokenizer, family, seed=0):
    mt, tie, nh, kv = family
    cfg = tiny_config(tokenizer, model_type=mt, heads=nh, kv=kv, tie=tie)
    if mt in ("qwen3", "phi3", *GEMMA):
        cfg.head_dim = 16
    if mt in GEMMA:  # a window shorter than the test sequences, so the sliding layers really slide
        cfg.sliding_window = 8
        cfg.layer_types = ["sliding_attention", "full_attention"]
    model = build_from_config(cfg, seed).eval()
    with torch.no_grad():  # sharper logits than the default init: greedy paths are not near-ties
        model.lm_head.weight.mul_(4.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@pytest.fixture(scope="module")
def qwen_onnx(tmp_path_factory, tokenizer):
    base = tmp_path_factory.mktemp("qwen_onnx")
    model = _model(tokenizer, FAMILIES[0])
    hf = save_model_atomically(model, tokenizer, base / "hf")
    return model, hf, export_onnx(hf, base / "fp32", exporter="dynamo")  # the traced graph (fused: own tests)


CASES = (
    [(f, "dynamo") for f in FAMILIES]
    + [(FAMILIES[0], "torchscript"), (FAMILIES[1], "torchscript")]
    + [(f, "fused") for f in FAMILIES if f[0] != "phi3" and f[0] not in GEMMA]
)


@pytest.mark.parametrize(
    "family,exporter", CASES, ids=[f"{f[0]}-tied{int(f[1])}-gqa{f[2] // f[3]}-{e}" for f, e in CASES]
)
def test_fp32_onnx_reproduces_pytorch(tmp_path, tokenizer, car_settings, family, exporter):
    model = _model(tokenizer, family)
    hf = save_model_atomically(model, tokenizer, tmp_path / "hf")
    folder = export_onnx(hf, tmp_path / "onnx", exporter=exporter)
    import onnx

    if exporter != "fused":  # (ONNX's checker does not know ORT's SimplifiedLayerNormalization)
        onnx.checker.check_model(str(folder / ONNX_FILE))
    meta = json.loads((folder / "onnx_config.json").read_text())
    assert meta["num_key_value_heads"] == family[3] and meta["eos_token_id"] == [tokenizer.eos_token_id]
    # the LM head is a plain weight matmul (tied heads included), so quantizers can reach it
    graph = onnx.load(str(folder / ONNX_FILE))
    inits = {i.name for i in graph.graph.initializer}
    made_by = {o: n for n in graph.graph.node for o in n.output}
    head = made_by["logits"]
    for _ in range(4):  # Gemma 2 soft-caps the logits after the head: cap * tanh(x / cap)
        if head.op_type == "MatMul":
            break
        head = made_by[head.input[0]]
    assert head.op_type == "MatMul" and head.input[1] in inits
    assert not any(n.metadata_props for n in graph.graph.node)  # no exporter debug records shipped
    rt = OnnxCausalLM(folder)
    prompts, seqs = _prompts(tokenizer, car_settings)
    # logits of whole sequences (batched, right-padded) within 1e-4 of PyTorch's
    for seq, got in zip(seqs, rt.sequence_logits(seqs, batch_size=4), strict=True):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq])).logits[0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # greedy generation through the KV cache, left-padded batches, identical token for token
    ours = rt.generate(prompts, 12, batch_size=4)
    for p, answer in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False)
        ref = out[0, len(p) :].tolist()
        if tokenizer.eos_token_id in ref:
            ref = ref[: ref.index(tokenizer.eos_token_id)]
        assert answer == ref


def test_generation_stops_on_end_of_sequence_per_row(qwen_onnx, tokenizer, car_settings):
    _, _, folder = qwen_onnx
    rt = OnnxCausalLM(folder)
    prompts, _ = _prompts(tokenizer, car_settings, n=3)
    free = rt.generate(prompts, 10)
    stop = free[0][4]  # plant the stop token where row 0 will produce it
    rt.eos_ids = {stop}
    stopped = rt.generate(prompts, 10)
    for full, cut in zip(free, stopped, strict=True):
        expect = full[: full.index(stop)] if stop in full else full
        assert cut == expect
    assert len(stopped[0]) == free[0].index(stop) <= 4


def test_sampling_is_seeded_and_follows_the_distribution(qwen_onnx, tokenizer, car_settings):
    _, _, folder = qwen_onnx
    rt = OnnxCausalLM(folder)
    prompts, _ = _prompts(tokenizer, car_settings, n=3)
    a = rt.generate(prompts, 8, do_sample=True, temperature=1.5, seed=7)
    assert a == rt.generate(prompts, 8, do_sample=True, temperature=1.5, seed=7)
    assert rt.generate(prompts, 8, do_sample=True, top_k=1, seed=3) == rt.generate(prompts, 8)
    # the sampler itself against a planted distribution
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    draws = np.array([_sample(logits, 1.0, 0, 1.0, rng)[0] for _ in range(4000)])
    np.testing.assert_allclose(np.bincount(draws, minlength=4) / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    kept = {_sample(logits, 1.0, 0, 0.7, rng)[0] for _ in range(300)}  # nucleus 0.7: the top two
    assert kept == {0, 1}
    assert {_sample(logits, 1.0, 3, 1.0, rng)[0] for _ in range(300)} == {0, 1, 2}


def test_chat_tokenizer_matches_transformers(qwen_onnx, tokenizer, car_settings):
    from core.chat import prompt_text
    from distill.data.car_assistant import generate

    _, hf, folder = qwen_onnx
    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(hf))
    ours = ChatTokenizer(folder)
    for e in generate("test", car_settings)[:20]:
        msgs = e.to_record()["messages"]
        assert ours.prompt(msgs[:-1]) == prompt_text(reloaded, msgs)
        assert (
            ours.encode_chat(msgs[:-1]) == reloaded(prompt_text(reloaded, msgs), add_special_tokens=False)["input_ids"]
        )
        ids = ours.encode(msgs[-1]["content"])
        assert ours.decode(ids) == msgs[-1]["content"]


def test_fp16_and_external_data(qwen_onnx, tmp_path, tokenizer, car_settings):
    model, hf, fp32 = qwen_onnx
    _, seqs = _prompts(tokenizer, car_settings, n=4)
    ref = OnnxCausalLM(fp32).sequence_logits(seqs)
    half = to_float16(fp32, tmp_path / "fp16")
    rt16 = OnnxCausalLM(half)
    assert rt16.kv_dtype == np.float16 and json.loads((half / "onnx_config.json").read_text())["dtype"] == "float16"
    for a, b in zip(rt16.sequence_logits(seqs), ref, strict=True):
        np.testing.assert_allclose(a, b, atol=0.05)
    ext = export_onnx(hf, tmp_path / "ext", external_data_threshold=0, exporter="dynamo")  # the > 2 GB layout
    assert (ext / EXTERNAL_DATA_FILE).stat().st_size > 0.9 * sum(p.numel() * 4 for p in model.parameters())
    for a, b in zip(OnnxCausalLM(ext).sequence_logits(seqs), ref, strict=True):
        np.testing.assert_array_equal(a, b)


def test_export_refuses_a_graph_that_does_not_match(qwen_onnx, tmp_path):
    from export.onnx import ExportError, verify_against_torch

    model, _, folder = qwen_onnx
    wrong = build_from_config(model.config, seed=1).eval()  # same shapes, other weights
    with pytest.raises(ExportError, match="differ from PyTorch"):
        verify_against_torch(folder, wrong)


def test_quantized_variants(qwen_onnx, tmp_path, tokenizer, car_settings):
    from quantize import quantize_int4, quantize_int8_dynamic, quantize_int8_static, quantize_int8_weights

    _, _, fp32 = qwen_onnx
    _, seqs = _prompts(tokenizer, car_settings, n=6)
    ref = OnnxCausalLM(fp32).sequence_logits(seqs)
    scale = float(np.mean([np.abs(r).mean() for r in ref]))
    built = {
        "int8": quantize_int8_dynamic(fp32, tmp_path / "int8"),
        "int8_embedding": quantize_int8_dynamic(fp32, tmp_path / "int8e", embedding=True),
        "int8_static": quantize_int8_static(fp32, tmp_path / "int8s", seqs),
        "int8_wo": quantize_int8_weights(fp32, tmp_path / "int8w", block_size=16),
        "int4_rtn": quantize_int4(fp32, tmp_path / "int4", block_size=16),
        "int4_embedding": quantize_int4(fp32, tmp_path / "int4e", block_size=16, embedding=True),
        "int4_hqq": quantize_int4(fp32, tmp_path / "int4h", block_size=16, algorithm="hqq"),
        "int4_gptq": quantize_int4(fp32, tmp_path / "int4g", block_size=16, algorithm="gptq", calibration=seqs),
    }
    fp32_bytes = sum(p.stat().st_size for p in fp32.glob("model.onnx*"))
    sizes = {}
    for name, folder in built.items():
        info = json.loads((folder / "quantization.json").read_text())
        q = info["quantized"]
        assert q["weight_matmuls"] == 15 and q["weight_matmuls_left_float"] == [] and q["lm_head"], name
        assert info["bytes"] < fp32_bytes, name
        sizes[name] = info["bytes"]
        ops = info["ops_after"]
        if name.startswith("int4") or name == "int8_wo":
            assert ops["MatMulNBits"] == 15 and info["settings"]["bits"] == (8 if name == "int8_wo" else 4)
        got = OnnxCausalLM(folder).sequence_logits(seqs)
        err = max(float(np.abs(a - b).mean()) for a, b in zip(got, ref, strict=True))
        assert err < 0.15 * scale, (name, err, scale)  # close to fp32, not equal to it
        assert err > 0, name
    assert (
        "GatherBlockQuantized" in json.loads((built["int4_embedding"] / "quantization.json").read_text())["ops_after"]
    )
    assert sizes["int4_rtn"] < sizes["int8"] and sizes["int8_embedding"] < sizes["int8"]
    assert sizes["int4_rtn"] < sizes["int8_wo"] < fp32_bytes
    with pytest.raises(ValueError, match="power of two"):
        quantize_int4(fp32, tmp_path / "bad", block_size=24)
    assert not (tmp_path / "bad").exists()


def test_each_variant_reports_its_distance_to_the_source(qwen_onnx, tmp_path, tokenizer, car_settings):
    """quantization.json's ``vs_source`` (KL(fp32 || variant) per token, argmax agreement, largest logit
    difference on probe sequences run alone) against the same numbers computed here with torch from the two
    folders' logits; a copy of the source is at distance 0."""
    import shutil

    import torch.nn.functional as F

    from quantize import compare_to_source, quantize_int4

    _, _, fp32 = qwen_onnx
    _, seqs = _prompts(tokenizer, car_settings, n=5)
    q = quantize_int4(fp32, tmp_path / "int4", block_size=16, probe=seqs)
    got = json.loads((q / "quantization.json").read_text())["vs_source"]
    a, b = OnnxCausalLM(fp32), OnnxCausalLM(q)
    p = torch.cat([torch.from_numpy(a.sequence_logits([x])[0]) for x in seqs]).double()
    r = torch.cat([torch.from_numpy(b.sequence_logits([x])[0]) for x in seqs]).double()
    kl = F.kl_div(F.log_softmax(r, -1), F.log_softmax(p, -1), log_target=True, reduction="sum") / p.shape[0]
    assert got["tokens"] == p.shape[0] == sum(len(x) for x in seqs) and got["sequences"] == 5
    assert got["kl"] == pytest.approx(float(kl), rel=1e-4) and got["kl"] > 0
    assert got["agreement"] == pytest.approx(float((p.argmax(-1) == r.argmax(-1)).double().mean()))
    assert got["max_logit_diff"] == pytest.approx(float((p - r).abs().max()), rel=1e-4)
    shutil.copytree(fp32, tmp_path / "same")
    same = compare_to_source(fp32, tmp_path / "same", seqs)
    assert same["kl"] == 0.0 and same["agreement"] == 1.0 and same["max_logit_diff"] == 0.0


def test_weight_only_variants_do_not_depend_on_the_batch(qwen_onnx, tmp_path, tokenizer, car_settings):
    """A row's logits alone (batch 1, as the car runs) and inside a padded batch of 4: weight-only int8 / int4
    give the same numbers (float rounding), dynamic int8 does not (one activation scale per call, over the
    whole batch and its padding): why the pipeline scores variants at ``export.deploy_batch``."""
    from quantize import quantize_int4, quantize_int8_dynamic, quantize_int8_weights

    _, _, fp32 = qwen_onnx
    _, seqs = _prompts(tokenizer, car_settings, n=4)
    folders = {
        "int8": quantize_int8_dynamic(fp32, tmp_path / "int8"),
        "int8_wo": quantize_int8_weights(fp32, tmp_path / "int8w", block_size=16),
        "int4": quantize_int4(fp32, tmp_path / "int4", block_size=16),
    }
    gap = {}
    for name, folder in folders.items():
        rt = OnnxCausalLM(folder)
        alone = [rt.sequence_logits([x], 1)[0] for x in seqs]
        together = rt.sequence_logits(seqs, 4)
        gap[name] = max(float(np.abs(x - y).max()) for x, y in zip(alone, together, strict=True))
    assert gap["int8_wo"] < 1e-4 and gap["int4"] < 1e-4, gap
    assert gap["int8"] > 100 * max(gap["int8_wo"], gap["int4"], 1e-6), gap
    # the pipeline's check before it scores a variant at a larger batch than the deployed one
    from core.chat import encode
    from distill.data.car_assistant import generate
    from distill.evaluate import batch_invariance

    data = [encode(tokenizer, e.to_record()["messages"]) for e in generate("test", car_settings)[:6]]
    dyn = batch_invariance(OnnxCausalLM(folders["int8"]), data, 8, 1, 4, 512)
    assert dyn == {"examples": 6, "ops_mixing_rows": ["DynamicQuantizeLinear"], "invariant": False}
    wo = batch_invariance(OnnxCausalLM(folders["int8_wo"]), data, 8, 1, 4, 512)
    assert wo["ops_mixing_rows"] == [] and wo["identical_answers"] == 1.0 and wo["invariant"]


def test_onnxruntime_genai_runs_the_exported_folders(qwen_onnx, tmp_path, tokenizer, car_settings):
    """``genai_config.json`` (written by export, carried by every quantized variant): onnxruntime-genai's own
    runtime, the one in-car apps embed from C/C++/C#/Java, loads the folder and its greedy answers are our
    runner's (fp32 and the int4 file)."""
    og = pytest.importorskip("onnxruntime_genai")
    from quantize import quantize_int4

    _, _, fp32 = qwen_onnx
    prompts, _ = _prompts(tokenizer, car_settings, n=4)
    int4 = quantize_int4(fp32, tmp_path / "int4", block_size=16)
    assert json.loads((int4 / "genai_config.json").read_text()) == json.loads((fp32 / "genai_config.json").read_text())
    for folder in (fp32, int4):
        genai_answers_are_ours(og, folder, prompts, tokenizer.eos_token_id)


def test_fused_graph_is_fused_and_runs_everywhere(tmp_path, tokenizer, car_settings):
    """``export.exporter: fused`` (logits and left-padded generation against PyTorch: the ``fused`` cases of
    ``test_fp32_onnx_reproduces_pytorch``): one GroupQueryAttention and no attention glue per layer; its int4
    file holds every weight as MatMulNBits; onnxruntime-genai runs both in one preallocated cache buffer with
    our runner's answers; OpenVINO at the deployment batch (1) gives ONNX Runtime's answers."""
    import onnx

    from quantize import quantize_int4

    family = FAMILIES[0]  # qwen2: q / k / v biases in the packed MatMul
    model = _model(tokenizer, family)
    hf = save_model_atomically(model, tokenizer, tmp_path / "hf")
    fp32 = export_onnx(hf, tmp_path / "fused", exporter="fused")
    nodes = onnx.load(str(fp32 / ONNX_FILE)).graph.node
    ops = [n.op_type for n in nodes]
    layers = model.config.num_hidden_layers
    assert ops.count("GroupQueryAttention") == layers and ops.count("SkipSimplifiedLayerNormalization") == 2 * layers
    assert not {"Softmax", "Transpose", "Pow", "ReduceMean"} & set(ops)
    assert ops.count("MatMul") == 5 * layers + 1 and len(nodes) <= 12 * layers + 25  # q, k, v in one MatMul
    prompts, seqs = _prompts(tokenizer, car_settings, n=4)
    meta = json.loads((fp32 / "onnx_config.json").read_text())
    assert meta["graph"] == "fused"
    assert json.loads((fp32 / "genai_config.json").read_text())["search"]["past_present_share_buffer"] is True
    half = to_float16(fp32, tmp_path / "fp16")
    for a, b in zip(
        OnnxCausalLM(half).sequence_logits(seqs, 4), OnnxCausalLM(fp32).sequence_logits(seqs, 4), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=0.05)
    int4 = quantize_int4(fp32, tmp_path / "int4", block_size=16)
    info = json.loads((int4 / "quantization.json").read_text())
    assert info["quantized"]["weight_matmuls"] == 5 * layers + 1 and not info["quantized"]["weight_matmuls_left_float"]
    from quantize import quantize_int8_dynamic, quantize_int8_static, quantize_int8_weights

    ref = OnnxCausalLM(fp32).sequence_logits(seqs, 4)
    for q in (  # every scheme reads the fused graph (its com.microsoft ops have no ONNX shape inference)
        quantize_int8_dynamic(fp32, tmp_path / "int8"),
        quantize_int8_static(fp32, tmp_path / "int8s", seqs),
        quantize_int8_weights(fp32, tmp_path / "int8w", block_size=16),
    ):
        got = OnnxCausalLM(q).sequence_logits(seqs, 4)
        scale = max(float(np.abs(b).max()) for b in ref)  # int8 error is relative to the logits' size
        assert max(float(np.abs(a - b).max()) for a, b in zip(got, ref, strict=True)) < 0.2 * scale, q.name
        assert np.mean([float((a.argmax(-1) == b.argmax(-1)).mean()) for a, b in zip(got, ref, strict=True)]) > 0.95
    # each runtime checked on its own: one that is not installed skips only its part (reported at the end)
    missing = [m for m in ("openvino", "onnxruntime_genai") if importlib.util.find_spec(m) is None]
    if "openvino" not in missing:
        ort_rt, ov_rt = OnnxCausalLM(fp32), OnnxCausalLM(fp32, backend="openvino")
        for a, b in zip(ort_rt.sequence_logits(seqs, 1), ov_rt.sequence_logits(seqs, 1), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-3)
        assert ort_rt.generate(prompts, 10, batch_size=1) == ov_rt.generate(prompts, 10, batch_size=1)
    if "onnxruntime_genai" not in missing:
        import onnxruntime_genai as og

        for folder in (fp32, int4):
            genai_answers_are_ours(og, folder, prompts, tokenizer.eos_token_id)
    if missing:
        pytest.skip(f"everything else checked; not installed: {', '.join(missing)} (pip install -e .[dev])")
    with pytest.raises(ValueError, match="batch 1 only"):  # one clear error, not OpenVINO's reshape failure
        ov_rt.generate(prompts, 10, batch_size=2)


def test_fused_exporter_refuses_what_it_does_not_implement(tmp_path, tokenizer):
    from export.fused import UnsupportedForFused, check_fusable

    for cfg, says in (
        ({"model_type": "phi3"}, "export.exporter=dynamo"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "SiLU"),
        ({"model_type": "mistral", "sliding_window": 64, "max_position_embeddings": 128}, "sliding_window 64"),
        ({"model_type": "qwen2", "hidden_size": 48, "num_attention_heads": 4}, "head_dim 12"),
        ({"model_type": "llama", "partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ):
        with pytest.raises(UnsupportedForFused, match=says):
            check_fusable(cfg)
    check_fusable({"model_type": "mistral", "sliding_window": None, "max_position_embeddings": 128})
    hf = save_model_atomically(_model(tokenizer, FAMILIES[4]), tokenizer, tmp_path / "hf")  # phi3
    with pytest.raises(UnsupportedForFused, match="phi3"):
        export_onnx(hf, tmp_path / "onnx", exporter="fused")
    assert not (tmp_path / "onnx").exists()


def test_runner_cross_checks_under_openvino(qwen_onnx, tokenizer, car_settings):
    pytest.importorskip("openvino")
    _, _, folder = qwen_onnx
    prompts, seqs = _prompts(tokenizer, car_settings, n=4)
    ort_rt, ov_rt = OnnxCausalLM(folder), OnnxCausalLM(folder, backend="openvino")
    for a, b in zip(ort_rt.sequence_logits(seqs), ov_rt.sequence_logits(seqs), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)
    assert ort_rt.generate(prompts, 10) == ov_rt.generate(prompts, 10)


def test_weight_only_int8_computes_the_same_numbers_under_openvino(qwen_onnx, tmp_path, tokenizer, car_settings):
    """OpenVINO's CPU plugin runs a compressed-weight MatMul its own way, whatever the file says: on CPUs with
    int8 dot products (VNNI / AMX) it quantizes the activations per token in groups of 32, which ONNX
    Runtime does at ``accuracy_level`` 4 with blocks of 32; elsewhere (AVX2 without VNNI, as on one of our
    CI hosts) it keeps them in float, which ONNX Runtime does at ``accuracy_level`` 1. At the matching level
    the two runtimes compute the same numbers; at the other they differ by ~1e-2 here."""
    pytest.importorskip("openvino")
    from quantize import quantize_int8_weights

    _, _, fp32 = qwen_onnx
    prompts, seqs = _prompts(tokenizer, car_settings, n=4)
    matching = _matching_level()
    gaps = {}
    for level in (1, 4):
        q = quantize_int8_weights(fp32, tmp_path / f"int8w{level}", block_size=32, accuracy_level=level)
        ort_rt, ov_rt = OnnxCausalLM(q), OnnxCausalLM(q, backend="openvino")
        pairs = zip(ort_rt.sequence_logits(seqs, 1), ov_rt.sequence_logits(seqs, 1), strict=True)
        gaps[level] = max(float(np.abs(a - b).max()) for a, b in pairs)
        if level == matching:
            assert ort_rt.generate(prompts, 10, batch_size=1) == ov_rt.generate(prompts, 10, batch_size=1)
    assert gaps[matching] < 1e-3, gaps  # rounding ties of the int8 activations: a few 1e-4
    assert gaps[5 - matching] > 10 * gaps[matching], gaps  # the other level computes something else


def test_openvino_float_activations_match_onnxruntime_level_1(qwen_onnx, tmp_path, tokenizer, car_settings):
    """``openvino_config={"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}`` turns OpenVINO's activation quantization off,
    so on any CPU it computes an int8 weight-only file as ONNX Runtime does at ``accuracy_level`` 1 (float)."""
    pytest.importorskip("openvino")
    from quantize import quantize_int8_weights

    _, _, fp32 = qwen_onnx
    _, seqs = _prompts(tokenizer, car_settings, n=4)
    q = quantize_int8_weights(fp32, tmp_path / "int8w1", block_size=32, accuracy_level=1)
    ov_rt = OnnxCausalLM(q, backend="openvino", openvino_config={"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0})
    assert int(ov_rt.session.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")) == 0
    pairs = zip(OnnxCausalLM(q).sequence_logits(seqs, 1), ov_rt.sequence_logits(seqs, 1), strict=True)
    assert max(float(np.abs(a - b).max()) for a, b in pairs) < 1e-3


def _matching_level() -> int:
    """The accuracy level at which ONNX Runtime computes what OpenVINO computes on this CPU."""
    from export.runtime import openvino_accuracy_level

    return openvino_accuracy_level()


@pytest.mark.parametrize(
    ("tied", "hidden", "block"),
    [(True, 64, 16), (True, 48, 32), (False, 48, 32)],
    ids=["tied", "tied-padded", "untied-padded"],
)
def test_int8_weight_only_stores_the_embedding_at_8_bits(
    qwen_onnx, tmp_path, tokenizer, car_settings, tied, hidden, block
):
    """``int8_wo.embedding``: a tied embedding reads the LM head's 8-bit bytes (stored once); an untied one is put
    on its own grid; where the blocks do not divide the hidden size (48, blocks of 32) the looked-up rows are
    cut back. Either way no float table is left, the file shrinks by the table, and the answers are the
    float-embedding file's, under ONNX Runtime and OpenVINO."""
    import onnx

    from quantize import quantize_int8_weights

    if hidden == 64:
        _, _, fp32 = qwen_onnx
    else:
        cfg = tiny_config(tokenizer, model_type="qwen2" if tied else "llama", hidden=hidden, tie=tied)
        model = build_from_config(cfg, 0).eval()
        with torch.no_grad():
            model.lm_head.weight.mul_(4.0)
        hf = save_model_atomically(model, tokenizer, tmp_path / "hf")
        fp32 = export_onnx(hf, tmp_path / "fp32", exporter="dynamo")
    prompts, seqs = _prompts(tokenizer, car_settings, n=4)
    level, vocab = _matching_level(), len(tokenizer)
    made = {
        emb: quantize_int8_weights(
            fp32, tmp_path / f"emb{int(emb)}", block_size=block, accuracy_level=level, embedding=emb, probe=seqs
        )
        for emb in (False, True)
    }
    info = {emb: json.loads((q / "quantization.json").read_text()) for emb, q in made.items()}
    done = info[True]["settings"]["embedding_8bit"]
    assert (done["shared_with"] == "lm_head/MatMul_Q8") == tied and "embedding_8bit" not in info[False]["settings"]
    blocks = -(-hidden // block)  # the float table out; in: its bytes (unless shared) and a scale per block
    expected = vocab * (4 * hidden - (0 if tied else blocks * block) - 4 * blocks)
    assert info[False]["bytes"] - info[True]["bytes"] >= 0.95 * expected
    tables = [i for i in onnx.load(str(made[True] / "model.onnx")).graph.initializer if i.data_type == 1]
    assert not any(list(i.dims) == [vocab, hidden] for i in tables)
    kl = {emb: i["vs_source"]["kl"] for emb, i in info.items()}
    assert kl[True] < 10 * kl[False] + 1e-5, kl  # a wrong zero point or layout reads garbage rows: KL ~1
    answers = {emb: OnnxCausalLM(q).generate(prompts, 10, batch_size=1) for emb, q in made.items()}
    assert answers[True] == answers[False]
    if importlib.util.find_spec("openvino"):
        assert OnnxCausalLM(made[True], backend="openvino").generate(prompts, 10, batch_size=1) == answers[True]


def test_cross_runtime_report_compares_a_few_rows_at_a_time(qwen_onnx, tokenizer, car_settings, monkeypatch):
    """The pipeline's OpenVINO check: identical answers and argmax on the same file, and neither runtime
    is asked for more than ~chunk_size tokens of logits at once (a split's full logits would not fit at a
    152k vocabulary)."""
    pytest.importorskip("openvino")
    from core.chat import encode
    from distill.data.car_assistant import generate
    from distill.stages.ship import cross_runtime

    _, _, folder = qwen_onnx
    data = [encode(tokenizer, e.to_record()["messages"]) for e in generate("test", car_settings)[:6]]
    runner = OnnxCausalLM(folder)
    answers = runner.generate([ex["input_ids"][: ex["prompt_len"]] for ex in data], 8, batch_size=4)
    seen = []
    real = OnnxCausalLM.sequence_logits

    def counted(self, seqs, batch_size=16):
        seen.append(sum(len(x) for x in seqs))
        return real(self, seqs, batch_size)

    monkeypatch.setattr(OnnxCausalLM, "sequence_logits", counted)
    longest = max(len(ex["input_ids"]) for ex in data)
    out = cross_runtime(folder, runner, answers, data, 8, batch_size=4, chunk_size=2 * longest)
    assert out["examples"] == 6 and out["generation_match"] == 1.0
    assert out["argmax_agreement"] == 1.0 and out["max_logit_diff"] < 1e-3
    assert sum(seen) == 2 * sum(len(ex["input_ids"]) for ex in data)  # every token, by both runtimes
    assert max(seen) <= 2 * longest


def test_cross_runtime_scores_each_runtime_and_names_their_activation_arithmetic(
    qwen_onnx, tmp_path, tokenizer, car_settings
):
    """The OpenVINO check scores both runtimes' answers on the same examples (planted: ONNX Runtime's answers
    are the references for 3 of 6 examples, so its exact match is 0.5; the untrained model's own answers under
    OpenVINO are not), and says how each runtime computes a weight-only file's activations on this CPU:
    alike exactly where the numbers agree (``test_weight_only_int8_computes_the_same_numbers_under_openvino``)."""
    pytest.importorskip("openvino")
    from distill.data import encode_records
    from distill.data.car_assistant import generate
    from distill.evaluate import evaluate_generations
    from distill.stages.ship import cross_runtime
    from quantize import quantize_int8_weights

    _, _, fp32 = qwen_onnx
    data = encode_records(tokenizer, [e.to_record() for e in generate("test", car_settings)[:6]], 512)
    planted = [tokenizer.encode(ex["answer"], add_special_tokens=False) if i < 3 else [] for i, ex in enumerate(data)]
    out = cross_runtime(fp32, OnnxCausalLM(fp32), planted, data, 8, batch_size=1, chunk_size=512, tokenizer=tokenizer)
    ov = OnnxCausalLM(fp32, backend="openvino")
    own, _ = evaluate_generations(data, lambda p: ov.generate(p, 8, batch_size=1), tokenizer)
    assert out["onnxruntime_exact_match"] == 0.5
    assert out["exact_match"] == own["exact_match"] < 0.5 and out["generation_match"] < 0.5
    assert "activations" not in out  # float weights: one arithmetic

    matching = _matching_level()
    for level in (1, 4):
        q = quantize_int8_weights(fp32, tmp_path / f"int8w{level}", block_size=32, accuracy_level=level)
        graph = (q / "model.onnx").read_bytes()
        ort_rt = OnnxCausalLM(q)
        answers = ort_rt.generate([ex["input_ids"][: ex["prompt_len"]] for ex in data], 8, batch_size=1)
        out = cross_runtime(q, ort_rt, answers, data, 8, batch_size=1, chunk_size=512, arithmetic="matched")
        acts = out["activations"]
        assert acts["onnxruntime"] == ("int8" if level == 4 else "float")
        assert (acts["onnxruntime"] == acts["openvino"]) == (level == matching), (level, acts)
        if level == matching:  # one arithmetic already: nothing to match
            assert "matched" not in out
            continue
        # export.openvino_arithmetic: matched reruns ONNX Runtime on a copy at OpenVINO's level: same numbers
        m = out["matched"]
        assert m["accuracy_level"] == matching and m["generation_match"] == 1.0, m
        assert m["max_logit_diff"] < 1e-3 and out["max_logit_diff"] > 10 * m["max_logit_diff"], (out, m)
        assert (q / "model.onnx").read_bytes() == graph  # the shipped file is untouched
        shipped = cross_runtime(q, ort_rt, answers, data, 8, batch_size=1, chunk_size=512, arithmetic="shipped")
        assert "matched" not in shipped and shipped["generation_match"] == out["generation_match"]


def test_with_accuracy_level_rewrites_only_the_graph_of_a_file_with_external_weights(qwen_onnx, tmp_path):
    """``quantize.with_accuracy_level`` on a folder whose weights sit in external data (every model over 2 GB):
    the copy computes exactly what the file quantized at that level computes, its graph keeps pointing at its
    own copy of the weights instead of embedding them, and the source folder is byte for byte unchanged and
    still loads (onnx refuses external data with several hard links)."""
    import onnx

    from core.onnx_files import EXTERNAL_DATA_FILE
    from quantize import quantize_int8_weights, with_accuracy_level

    _, _, fp32 = qwen_onnx
    q4 = quantize_int8_weights(fp32, tmp_path / "level4", block_size=32, accuracy_level=4)
    q1 = quantize_int8_weights(fp32, tmp_path / "level1", block_size=32, accuracy_level=1)
    model = onnx.load(str(q4 / "model.onnx"))
    onnx.save_model(
        model, str(q4 / "model.onnx"), save_as_external_data=True, location=EXTERNAL_DATA_FILE, size_threshold=1024
    )
    before = {f.name: f.read_bytes() for f in q4.iterdir()}
    assert with_accuracy_level(q4, tmp_path / "copy", 1) == sum(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert {f.name: f.read_bytes() for f in q4.iterdir()} == before
    onnx.load(str(q4 / "model.onnx"))  # with its external data, while the copy exists
    copy = tmp_path / "copy"
    graph = (copy / "model.onnx").stat().st_size  # the source's graph plus one attribute per node, no weights
    assert abs(graph - len(before["model.onnx"])) < 1000 and graph < (copy / EXTERNAL_DATA_FILE).stat().st_size
    seqs = [[1, 5, 9, 13, 2, 7, 3], [4, 4, 8]]
    for a, b in zip(
        OnnxCausalLM(copy).sequence_logits(seqs, 1), OnnxCausalLM(q1).sequence_logits(seqs, 1), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_the_gates_openvino_match_reads_each_split_at_matched_arithmetic_where_measured():
    """Planted checks whose as-shipped and matched shares differ: the gate's number is the lowest split at
    matched arithmetic where that was measured, as shipped elsewhere, and nothing when a split failed to run."""
    from distill.stages.ship import openvino_match

    test = {"examples": 64, "generation_match": 0.99, "matched": {"generation_match": 1.0}}
    heldout = {"examples": 200, "generation_match": 0.925, "matched": {"generation_match": 0.995}}
    assert openvino_match([test, heldout]) == (0.995, 200)  # with the examples of the split it comes from
    assert openvino_match([test, {"examples": 50, "generation_match": 0.97}]) == (0.97, 50)  # as shipped
    tied = {"examples": 32, "generation_match": 1.0}
    assert openvino_match([test, tied]) == (1.0, 32)  # a tie: the fewer examples (the wider error)
    assert openvino_match([test, {"error": "unsupported op"}]) is None
    assert openvino_match([]) is None


def test_gate_states_the_openvino_checks_error_from_its_own_examples():
    """OpenVINO runs on the first export.openvino_examples of each split: its check states the error of
    those examples (``openvino_match_n``), not of the whole split; 63 of 64 identical still fails 0.99 but
    says 64 examples cannot settle it, while 990 of 1,000 passes outside its error and 600 of 1,000 fails so."""
    from export.gate import evaluate_gate, wilson_error

    teacher = {"exact_match": 0.8, "slices": {"lang": {"en": {"n": 300}, "zh": {"n": 300}}}}
    base = {**teacher, "openvino_match": 63 / 64, "openvino_match_n": 64}
    th = {"min_openvino_match": 0.99}
    (c,) = evaluate_gate(teacher, {"onnx_int4": base}, th, 0.0).checks
    assert not c.passed and c.uncertain and c.n == 64 and c.error == pytest.approx(wilson_error(63 / 64, 64))
    assert "on 64 examples" in c.describe()
    (c,) = evaluate_gate(
        teacher, {"onnx_int4": {**base, "openvino_match": 0.999, "openvino_match_n": 1000}}, th, 0.0
    ).checks
    assert c.passed and not c.uncertain and c.n == 1000
    (c,) = evaluate_gate(
        teacher, {"onnx_int4": {**base, "openvino_match": 0.6, "openvino_match_n": 1000}}, th, 0.0
    ).checks
    assert not c.passed and not c.uncertain
    # an older metrics.json without the count: no error stated (never the whole split's 600)
    old = {k: v for k, v in base.items() if k != "openvino_match_n"}
    (c,) = evaluate_gate(teacher, {"onnx_int4": old}, th, 0.0).checks
    assert not c.passed and c.n is None and c.error is None and not c.uncertain


# --- the gate -----------------------------------------------------------------------------------


def test_gate_states_when_a_verdict_is_within_the_evaluations_error():
    """A check on a per-example metric says when its margin is inside the 95% interval its examples allow
    (the verdict stands; more examples would settle it), and only then."""
    from export.gate import evaluate_gate, wilson_error

    # textbook Wilson 95% intervals: 8 of 8 -> [0.676, 1]; 50 of 100 -> [0.404, 0.596]
    assert 1.0 - 2 * wilson_error(1.0, 8) == pytest.approx(0.6756, abs=1e-4)
    assert wilson_error(0.5, 100) == pytest.approx((0.5962 - 0.4038) / 2, abs=1e-4)

    def scored(em: float, n: int) -> dict:
        return {"exact_match": em, "kl": 0.01, "slices": {"lang": {"en": {"n": n // 2}, "zh": {"n": n - n // 2}}}}

    th = {"min_exact_match_retention": 0.97, "max_kl": 0.05}
    r = evaluate_gate(scored(0.9, 200), {"onnx_int8": scored(0.88, 200)}, th, 0.0)
    em, kl = (next(c for c in r.checks if c.metric == m) for m in ("exact_match", "kl"))
    assert r.passed and em.uncertain and em.n == 200 and not kl.uncertain and kl.error is None
    assert em.error == pytest.approx(wilson_error(0.88, 200) / 0.9)  # retention's error: the teacher as reference
    assert "ok (within the evaluation's 95% error, ±0.05" in em.describe() and "on 200 examples)" in em.describe()
    assert r.describe().startswith("release gate PASSED (1 within the evaluation's 95% error")
    assert r.to_dict()["uncertain"] == [em.describe()]
    # the same scores on 20,000 examples: the margin (0.0078) is outside the interval (0.005)
    r = evaluate_gate(scored(0.9, 20000), {"onnx_int8": scored(0.88, 20000)}, th, 0.0)
    assert r.passed and not r.uncertain and "within" not in r.describe()
    # a failure inside the error says so too; one far outside does not
    r = evaluate_gate(scored(0.9, 200), {"a": scored(0.86, 200), "b": scored(0.5, 200)}, th, 0.0)
    assert [c.variant for c in r.failures] == ["a", "b"] and [c.variant for c in r.uncertain] == ["a"]
    assert "FAILED, short by 0.0144 (within the evaluation's 95% error" in r.failures[0].describe()


def test_gate_judges_planted_numbers():
    from export.gate import evaluate_gate

    teacher = {"exact_match": 0.8, "tool_accuracy": 1.0}
    ok = {"exact_match": 0.79, "tool_accuracy": 1.0, "agreement": 0.99, "kl": 0.01}
    bad = {"exact_match": 0.70, "tool_accuracy": 1.0, "agreement": 0.99, "kl": 0.2}
    th = {"min_exact_match_retention": 0.97, "min_agreement": 0.98, "max_kl": 0.05, "min_valid_json": None}
    r = evaluate_gate(teacher, {"onnx_int8": ok}, th, 0.0)
    assert r.passed and len(r.checks) == 3
    em = next(c for c in r.checks if c.metric == "exact_match")
    assert em.value == pytest.approx(0.79 / 0.8) and em.margin == pytest.approx(0.79 / 0.8 - 0.97)
    r = evaluate_gate(teacher, {"onnx_int8": ok, "onnx_int4": bad}, th, 0.0)
    assert not r.passed and {(c.variant, c.metric) for c in r.failures} == {
        ("onnx_int4", "exact_match"),
        ("onnx_int4", "kl"),
    }
    text = r.describe()
    assert "FAILED" in text and "kl = 0.2000 (needs <= 0.0500): FAILED, over by 0.1500" in text
    assert "exact_match / teacher's = 0.8750 (needs >= 0.9700): FAILED, short by 0.0950" in text
    # a number nobody measured fails its check rather than passing silently
    r = evaluate_gate(teacher, {"onnx_fp32": {"exact_match": 0.8}}, {"max_kl": 0.1}, 0.0)
    assert not r.passed and np.isnan(r.checks[0].value)
    with pytest.raises(ValueError, match="unknown gate thresholds"):
        evaluate_gate(teacher, {"x": ok}, {"min_accuracy": 0.5}, 0.0)
    # cross-runtime: the share of answers identical under OpenVINO; a file OpenVINO cannot load has none
    same = {"onnx_int4_qad": {**ok, "openvino_match": 1.0}, "onnx_int8": {**ok, "openvino_match": 0.97}}
    r = evaluate_gate(teacher, {**same, "onnx_int4": ok}, {"min_openvino_match": 0.99}, 0.0)
    assert {(c.variant, c.passed) for c in r.checks} == {
        ("onnx_int4_qad", True),
        ("onnx_int8", False),
        ("onnx_int4", False),
    }


@pytest.fixture(scope="module")
def trained_pair(tmp_path_factory, tokenizer, car_settings):
    """A tiny Qwen2 trained for a few hundred steps on the task (so greedy answers are real) and its ONNX."""
    from core.chat import collate, encode
    from distill.data.car_assistant import generate

    base = tmp_path_factory.mktemp("trained")
    model = build_from_config(tiny_config(tokenizer), seed=0)
    data = [encode(tokenizer, e.to_record()["messages"]) for e in generate("train", car_settings)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(150):
        idx = torch.randint(0, len(data), (16,), generator=g).tolist()
        b = collate([data[i] for i in idx], tokenizer.pad_token_id)
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    hf = save_model_atomically(model, tokenizer, base / "hf")
    test = []
    for e in generate("test", car_settings)[:24]:
        ex = encode(tokenizer, e.to_record()["messages"])
        ex["answer"] = e.answer
        test.append(ex)
    return model, export_onnx(hf, base / "fp32"), test


def _corrupt(src, dest, scale=1.0, seed=0):
    """Copy of an ONNX folder whose weight matrices carry Gaussian noise of ``scale`` x their std."""
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dest)
    m = onnx.load(str(dest / ONNX_FILE))
    rng = np.random.default_rng(seed)
    for init in m.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.dtype == np.float32:
            init.CopyFrom(
                numpy_helper.from_array(
                    (w + scale * w.std() * rng.standard_normal(w.shape)).astype(np.float32), init.name
                )
            )
    onnx.save(m, str(dest / ONNX_FILE))
    return dest


def test_gate_passes_a_good_artifact_and_fails_a_broken_one(trained_pair, tmp_path, tokenizer):
    from distill.evaluate import evaluate_model, evaluate_onnx
    from export.gate import evaluate_gate
    from quantize import quantize_int8_dynamic

    model, fp32, test = trained_pair
    ev = dict(max_new_tokens=40, batch_size=8)
    with torch.no_grad():
        t_scores, t_ans = evaluate_model(model, tokenizer, test, **ev)
    assert t_scores["valid_json"] > 0.5  # the planted reference model really answers
    th = {"min_exact_match_retention": 0.97, "min_valid_json": 0.5, "min_agreement": 0.97, "max_kl": 0.02}
    measured = {}
    for name, folder in (
        ("onnx_fp32", fp32),
        ("onnx_int8", quantize_int8_dynamic(fp32, tmp_path / "int8")),
        ("onnx_broken", _corrupt(fp32, tmp_path / "broken")),
    ):
        with torch.no_grad():
            measured[name], _ = evaluate_onnx(
                OnnxCausalLM(folder), tokenizer, test, teacher=model, teacher_answers=t_ans, **ev
            )
    # the exported reference itself: identical answers, KL ~ 0
    assert measured["onnx_fp32"]["generation_match"] == 1.0 and measured["onnx_fp32"]["kl"] < 1e-6
    assert evaluate_gate(t_scores, {"onnx_fp32": measured["onnx_fp32"]}, th, 0.0).passed
    # int8 moves logits a little: close to the teacher token by token (exact match over 24 examples of a
    # barely trained model is too coarse a number to gate here, and its near-ties flip a few argmaxes)
    near = {"min_agreement": 0.9, "max_kl": 0.02}  # int8 0.94 / 0.008 here, the broken file 0.52 / 1.1
    assert evaluate_gate(t_scores, {"onnx_int8": measured["onnx_int8"]}, near, 0.0).passed
    broken = evaluate_gate(t_scores, {"onnx_broken": measured["onnx_broken"]}, th, 0.0)
    assert not broken.passed
    assert {"agreement", "kl"} <= {c.metric for c in broken.failures}
    assert not evaluate_gate(t_scores, {"onnx_broken": measured["onnx_broken"]}, near, 0.0).passed


def test_gate_cli_rejudges_a_finished_run(tmp_path, capsys):
    from export.gate import main

    m = {
        "teacher": {"exact_match": 0.9},
        "onnx_int8": {"exact_match": 0.89, "agreement": 0.99, "kl": 0.03},
        "gate": {"checks": [{"variant": "onnx_int8", "metric": "kl", "threshold": 0.05}]},
    }
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(m))
    assert main([str(path)]) == 0  # the run's own threshold
    assert main([str(path), "--max-kl", "0.01"]) == 3
    assert "kl = 0.0300 (needs <= 0.0100): FAILED, over by 0.0200" in capsys.readouterr().out
    assert main([str(path), "--min-exact-match-retention", "0.98"]) == 0  # 0.89 / 0.9 = 0.989
    assert main([str(path), "--min-exact-match-retention", "0.99"]) == 3
    assert main([str(path), "--variants", "onnx_int4"]) == 2


def test_export_cli_refuses_bad_input_before_loading(tmp_path, capsys):
    from export.__main__ import main

    assert main([str(tmp_path / "missing"), str(tmp_path / "out"), "--quantize", "int4", "--block-size", "24"]) == 2
    err = capsys.readouterr().err
    assert "is not a folder" in err and "quantize.int4.block_size: 24 must be a power of two" in err
    assert main([str(tmp_path / "missing"), str(tmp_path / "out"), "--quantize", "int8_static"]) == 2
    assert "int8_static with these settings needs calibration data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


HEAD_DIMS = (8, 16, 24, 40, 64, 80, 96, 128, 256)
AUTO_CASES = [(mt, hd) for mt in ("llama", "qwen2", "qwen3", "mistral") for hd in HEAD_DIMS]


@pytest.mark.slow
@pytest.mark.parametrize("model_type,hd", AUTO_CASES, ids=[f"{mt}-hd{hd}" for mt, hd in AUTO_CASES])
def test_auto_export_never_fails_over_head_dims(tmp_path, tokenizer, car_settings, model_type, hd):
    """``export.exporter=auto`` on head sizes the CPU GroupQueryAttention takes (multiples of 16: fused) and
    refuses (8, 24, 40: dynamo, chosen from the config before anything loads): logits within 1e-4 of PyTorch
    and greedy generation through the KV cache identical, token for token."""
    from export.fused import GQA_HEAD_MULTIPLE

    cfg = tiny_config(tokenizer, model_type=model_type, hidden=2 * hd, layers=1, heads=2, kv=1, inter=64)
    cfg.head_dim = hd
    model = build_from_config(cfg, 0).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    hf = save_model_atomically(model, tokenizer, tmp_path / "hf")
    folder = export_onnx(hf, tmp_path / "onnx", exporter="auto")
    meta = json.loads((folder / "onnx_config.json").read_text())
    assert meta["head_dim"] == hd
    assert meta["graph"] == ("fused" if hd % GQA_HEAD_MULTIPLE == 0 else "traced")
    rt = OnnxCausalLM(folder)
    prompts, seqs = _prompts(tokenizer, car_settings, n=3)
    for seq, got in zip(seqs, rt.sequence_logits(seqs, batch_size=3), strict=True):
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([seq])).logits[0].numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    for p, answer in zip(prompts, rt.generate(prompts, 8, batch_size=3), strict=True):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False)[0, len(p) :].tolist()
        assert answer == (ref[: ref.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ref else ref)


def test_auto_falls_back_to_dynamo_when_the_fused_graph_fails_its_check(tmp_path, tokenizer, monkeypatch, caplog):
    """A fused graph that builds but does not reproduce PyTorch (planted: its LM head negated): ``auto``
    logs why and ships the traced graph; an explicit ``fused`` raises."""
    import export.onnx as eo
    from export.onnx import ExportError

    real = eo.build_fused

    def broken(model, opset=18):
        proto = real(model, opset)
        from onnx import numpy_helper

        (w,) = [i for i in proto.graph.initializer if i.name == "lm_head.weight.T"]
        w.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(w), w.name))
        return proto

    monkeypatch.setattr(eo, "build_fused", broken)
    hf = save_model_atomically(_model(tokenizer, FAMILIES[0]), tokenizer, tmp_path / "hf")
    with caplog.at_level("WARNING", logger="export.onnx"):
        folder = export_onnx(hf, tmp_path / "auto", exporter="auto")
    assert json.loads((folder / "onnx_config.json").read_text())["graph"] == "traced"
    assert "exporter auto -> dynamo" in caplog.text
    with pytest.raises(ExportError):
        export_onnx(hf, tmp_path / "fused", exporter="fused")
    assert not (tmp_path / "fused").exists()  # nothing half-written left behind


@pytest.mark.parametrize("model_type", ["gemma3_text", "gemma2"])
def test_auto_picks_dynamo_for_gemma_and_fused_refuses_it(model_type, caplog):
    """The fused graph covers Llama-style attention only; for Gemma ``auto`` chooses the traced graph from
    the config (before any weights load) and an explicit ``fused`` says what to set instead."""
    from transformers import AutoConfig

    from export.fused import UnsupportedForFused
    from export.onnx import resolve_exporter

    cfg = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16)
    with caplog.at_level("INFO"):
        assert resolve_exporter("auto", cfg) == "dynamo"
    assert f"not '{model_type}'" in caplog.text
    with pytest.raises(UnsupportedForFused, match="set export.exporter=dynamo"):
        resolve_exporter("fused", cfg)
