"""Generation with ONNX Runtime, numpy and the tokenizer only: what an in-car application embeds.

This module never imports torch (a test enforces it). It reads a folder written by ``export.onnx``
(``model.onnx``, ``onnx_config.json``, ``tokenizer.json``, the chat template) and offers:

- ``OnnxCausalLM.forward``: one step of the graph with an explicit KV cache;
- ``OnnxCausalLM.generate``: greedy or sampled decoding with KV cache, left-padded batches, stop on
  end-of-sequence;
- ``OnnxCausalLM.sequence_logits``: teacher-forced logits of whole sequences (for agreement and KL);
- ``ChatTokenizer``: the model's chat template (rendered as transformers renders it, tools included) and
  tokenizer without transformers;
- ``ChatModel.chat(messages, tools)``: one assistant turn as ``{"content", "tool_calls"}``, the calls
  parsed by ``core/toolcalls.py``, the same code the release gate scores them with.

``backend="openvino"`` runs the same ONNX file under OpenVINO on CPU (optional extra), for
cross-runtime checks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# This file is copied into applications as it is, with core/toolcalls.py beside it for tool calls (no other
# import from this project): the folder names are repeated from core.onnx_files, and tests/test_layers.py
# checks that they agree.
ONNX_FILE = "model.onnx"
CONFIG_FILE = "onnx_config.json"

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class _OrtSession:
    def __init__(self, path: Path, threads: int | None, providers: Sequence[str] | None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(path), sess_options=so, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_types = {i.name: _NP_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, feed)


def openvino_quantizes_activations() -> bool:
    """Whether OpenVINO's CPU plugin, on this machine, quantizes the activations of a compressed-weight MatMul
    (int8, per token in groups of 32, as ONNX Runtime's ``MatMulNBits`` does at ``accuracy_level`` 4). It
    does on CPUs with int8 dot products (VNNI / AMX) and keeps them in float elsewhere (AVX2 alone), whatever
    the file says; so there the same int4 / int8 weight-only file computes other numbers under the two
    runtimes unless it asks ONNX Runtime for float activations (``accuracy_level`` 0 or 1). Where both
    quantize, their roundings still differ: on a VNNI CPU the SmolLM2 int8_wo student answered 289 of 300
    heldout requests alike under the two (OpenVINO's answers were closer to its own float ones, 296 / 300;
    BENCHMARKS.md section 31)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.is_file() else set()
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def openvino_accuracy_level() -> int:
    """The ``MatMulNBits`` ``accuracy_level`` at which ONNX Runtime computes a weight-only file's activations as
    OpenVINO's CPU plugin does on this machine: 4 (int8) where it quantizes them, else 1 (float)."""
    return 4 if openvino_quantizes_activations() else 1


class _OpenVinoSession:
    def __init__(self, path: Path, threads: int | None, config: dict | None = None):
        try:
            import openvino as ov
        except ImportError as err:
            raise RuntimeError(
                "backend='openvino' needs the openvino package: pip install 'car-distill[openvino]'"
            ) from err
        core = ov.Core()
        model = core.read_model(str(path))
        props = {"INFERENCE_PRECISION_HINT": "f32"}  # CPUs with bf16 would otherwise compute in bf16
        if threads:
            props["INFERENCE_NUM_THREADS"] = threads
        props.update(config or {})  # e.g. {"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}: float activations on VNNI / AMX too
        self.compiled = core.compile_model(model, "CPU", props)
        self.request = self.compiled.create_infer_request()
        types = {"f32": np.float32, "f16": np.float16}
        self.input_types = {p.any_name: types.get(p.element_type.get_type_name()) for p in self.compiled.inputs}
        self.output_names = [p.any_name for p in self.compiled.outputs]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.request.infer(feed, share_inputs=False)
        return [np.array(res[self.compiled.output(name)]) for name in self.output_names]


class OnnxCausalLM:
    """A decoder exported by ``export.onnx``, run with ONNX Runtime (or OpenVINO) and numpy."""

    def __init__(
        self,
        folder: str | Path,
        *,
        backend: str = "onnxruntime",
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        openvino_config: dict | None = None,
    ):
        self.folder = Path(folder)
        meta_path = self.folder / CONFIG_FILE
        if not meta_path.is_file() or not (self.folder / ONNX_FILE).is_file():
            raise FileNotFoundError(
                f"{self.folder} is not an exported model folder (needs {ONNX_FILE} and {CONFIG_FILE})"
            )
        self.meta = json.loads(meta_path.read_text())
        self.num_layers = self.meta["num_hidden_layers"]
        self.kv_heads, self.head_dim = self.meta["num_key_value_heads"], self.meta["head_dim"]
        self.eos_ids = set(self.meta["eos_token_id"])
        self.pad_id = self.meta["pad_token_id"] if self.meta["pad_token_id"] is not None else 0
        if backend == "onnxruntime":
            self.session = _OrtSession(self.folder / ONNX_FILE, threads, providers)
        elif backend == "openvino":
            self.session = _OpenVinoSession(self.folder / ONNX_FILE, threads, openvino_config)
        else:
            raise ValueError(f"backend must be onnxruntime or openvino, got {backend!r}")
        self.backend = backend
        self.kv_dtype = self.session.input_types.get("past_key_values.0.key") or np.float32

    # one graph call -------------------------------------------------------------------------------
    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=self.kv_dtype) for _ in range(2 * self.num_layers)]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray] | None = None
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (B, S, V) as float32 and the new KV cache. ``attention_mask`` covers past + new tokens
        (0 on left padding); positions are derived from it, so padded rows decode like unpadded ones."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        attention_mask = np.asarray(attention_mask, dtype=np.int64)
        b, s = input_ids.shape
        if b > 1 and self.backend == "openvino" and self.meta.get("graph") == "fused":
            raise ValueError(
                f"{self.folder}: OpenVINO runs the fused graph (GroupQueryAttention) at batch 1 only, got batch {b}; "
                "run it one prompt at a time (batch_size=1) or export with exporter=dynamo"
            )
        past = past if past is not None else self.empty_past(b)
        position_ids = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None)[:, -s:]
        feed = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for i in range(self.num_layers):
            feed[f"past_key_values.{i}.key"] = past[2 * i]
            feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
        out = self.session.run(feed)
        return out[0].astype(np.float32, copy=False), out[1:]

    # generation -----------------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        batch_size: int = 16,  # not a knob: the embeddable runner's own default (the pipeline passes eval.batch_size)
    ) -> list[list[int]]:
        """Answer token ids for each prompt (end-of-sequence stripped). Greedy unless ``do_sample``."""
        rng = np.random.default_rng(seed)
        out: list[list[int]] = []
        for i in range(0, len(prompts), batch_size):
            out += self._generate_batch(
                prompts[i : i + batch_size], max_new_tokens, do_sample, temperature, top_k, top_p, rng, min_new_tokens
            )
        return out

    def _generate_batch(self, prompts, max_new_tokens, do_sample, temperature, top_k, top_p, rng, min_new_tokens):
        b, width = len(prompts), max(len(p) for p in prompts)
        ids = np.full((b, width), self.pad_id, dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = p
            mask[r, width - len(p) :] = 1
        answers: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, dtype=bool)
        logits, past = self.forward(ids, mask)
        for step in range(max_new_tokens):
            scores = logits[:, -1, :]
            if step < min_new_tokens and self.eos_ids:
                scores = scores.copy()
                scores[:, sorted(self.eos_ids)] = -np.inf
            nxt = _sample(scores, temperature, top_k, top_p, rng) if do_sample else scores.argmax(-1)
            for r in range(b):
                if done[r]:
                    continue
                if int(nxt[r]) in self.eos_ids:
                    done[r] = True
                else:
                    answers[r].append(int(nxt[r]))
            if done.all() or step == max_new_tokens - 1:
                break
            nxt = np.where(done, self.pad_id, nxt).astype(np.int64)[:, None]
            mask = np.concatenate([mask, np.ones((b, 1), dtype=np.int64)], axis=1)
            logits, past = self.forward(nxt, mask, past)
        return answers

    # teacher-forced --------------------------------------------------------------------------------
    def sequence_logits(
        self,
        sequences: Sequence[Sequence[int]],
        batch_size: int = 16,  # not a knob: the embeddable runner's own default (the pipeline passes eval.batch_size)
    ) -> list[np.ndarray]:
        """Logits (len, V) of each whole sequence in one pass each (right-padded batches, empty cache)."""
        out: list[np.ndarray] = []
        for i in range(0, len(sequences), batch_size):
            chunk = sequences[i : i + batch_size]
            width = max(len(s) for s in chunk)
            ids = np.full((len(chunk), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.int64)
            for r, s in enumerate(chunk):
                ids[r, : len(s)] = s
                mask[r, : len(s)] = 1
            logits, _ = self.forward(ids, mask)
            out += [logits[r, : len(s)] for r, s in enumerate(chunk)]
        return out


def _sample(scores: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> np.ndarray:
    """One token per row from softmax(scores / temperature), restricted to top-k and nucleus top-p."""
    x = scores.astype(np.float64) / max(temperature, 1e-6)
    if top_k and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p  # always keeps the most likely token
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def _toolcalls():
    """``core.toolcalls`` here, or ``toolcalls.py`` copied beside this file in an application."""
    try:
        from core import toolcalls
    except ImportError:
        import toolcalls  # type: ignore[no-redef]
    return toolcalls


class ChatTokenizer:
    """The exported folder's tokenizer (``tokenizers``) and chat template (jinja2), without transformers."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer

        folder = Path(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        self.template = template
        self.response_template = cfg.get("response_template")
        self.special = {k: cfg.get(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self._compiled = None

    def _env_template(self):
        """The template compiled the way transformers compiles chat templates (sandboxed; ``tojson`` without
        HTML escaping or key sorting; ``raise_exception``; ``strftime_now``), so prompts match exactly."""
        if self._compiled is None:
            from datetime import datetime

            from jinja2 import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(
                    x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
                )

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.template)
        return self._compiled

    def prompt(
        self, messages: Sequence[dict], add_generation_prompt: bool = True, tools: Sequence[dict] | None = None
    ) -> str:
        if not self.template:
            return "".join(m.get("content") or "" for m in messages)
        kw = {"tools": list(tools)} if tools else {}
        return self._env_template().render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **kw, **self.special
        )

    def encode_chat(self, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
        return self.encode(self.prompt(messages, tools=tools))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def call_format(self) -> str:
        """The syntax the chat template writes tool calls in (``core.toolcalls.FORMATS``)."""
        return _toolcalls().format_of(self.template)


class ChatModel:
    """What the car's application calls: messages (and tools) in, one assistant turn out, tool calls parsed.

    ``ChatModel(folder).chat(messages, tools)`` renders the conversation with the exported chat template
    (OpenAI / TRL messages: system, user, assistant with ``tool_calls``, tool), decodes greedily, and
    returns ``{"content": str, "tool_calls": [{"type": "function", "function": {"name", "arguments"}}]}``
    parsed by ``core.toolcalls`` (the syntax read from the template, or the tokenizer's transformers
    response template when transformers is installed): the same parser the release gate scored."""

    def __init__(self, folder: str | Path, **runner_kw):
        self.model = OnnxCausalLM(folder, **runner_kw)
        self.tokenizer = ChatTokenizer(folder)

    def chat(
        self,
        messages: Sequence[dict],
        tools: Sequence[dict] | None = None,
        max_new_tokens: int = 128,  # not a knob: the embeddable runner's own default
    ) -> dict:
        tc = _toolcalls()
        tools = [tc.openai_tool(t) for t in tools] if tools else None
        ids = self.tokenizer.encode_chat(messages, tools=tools)
        (answer,) = self.model.generate([ids], max_new_tokens, batch_size=1)
        text = self.tokenizer.decode(answer)
        turn = tc.parse(
            text, self.tokenizer.call_format, response_template=self.tokenizer.response_template, tools=tools
        )
        return {
            "content": turn["content"],
            "tool_calls": [{"type": "function", "function": c} for c in turn["tool_calls"]],
            "text": text,
        }
