"""torch -> ONNX with KV cache: one graph with past inputs, dynamic batch / sequence / past length.

The graph (inputs and outputs by name) is what ``export.runtime`` and any ONNX Runtime application use:

    inputs   input_ids (B, S) int64, attention_mask (B, P+S) int64, position_ids (B, S) int64,
             past_key_values.{i}.key / .value (B, kv_heads, P, head_dim) for each layer i
    outputs  logits (B, S, V), present.{i}.key / .value (B, kv_heads, P+S, head_dim)

Prefill is the same graph with P = 0 (empty past tensors); decode feeds S = 1 and the presents back.
A vocabulary-trimmed graph (``keep_tokens``, ``export.vocab``) keeps this contract (``export/vocab.py``).
The folder also holds the tokenizer files and ``onnx_config.json`` (shapes, names, special ids), so it
runs without this project and without torch.

A small wrapper rebuilds the HF ``DynamicCache`` from the flat past inputs, and eager attention keeps
every mask explicit. Three exporters, all tested on Llama, Qwen2, Qwen3 and Mistral; ``auto`` (default)
takes ``fused`` where the model allows it, else ``dynamo``:

- ``dynamo``: ``torch.export`` with symbolic batch / sequence / past dimensions, then
  onnxscript's optimizer. Shape arithmetic is folded, so the graph has a fraction of the nodes and
  decodes faster (bench/onnx_latency.py); export takes seconds longer.
- ``torchscript``: the legacy tracer (``dynamo=False``), quick to export but every ``view`` leaves
  Shape/Gather/Concat glue in the graph. Deprecated by PyTorch; kept as a fallback.
- ``fused``: no tracing; ``export.fused`` writes the graph from the weights with ONNX Runtime's fused
  kernels (GroupQueryAttention, SkipSimplifiedLayerNormalization): ~11 nodes per layer instead of ~60,
  the decode speed of onnxruntime-genai's builder. Llama, Mistral, Qwen2, Qwen3 (not Phi-3).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

from core.files import building
from core.onnx_files import (
    CONFIG_FILE,
    EXTERNAL_DATA_FILE,
    GENAI_CONFIG_FILE,
    INPUTS,
    ONNX_FILE,
    TOKEN_MAP_FILE,
    TOKENIZER_FILES,
    TWO_GB,
    copy_runtime_files,
    past_names,
    present_names,
)
from export.fused import UnsupportedForFused, build_fused, check_fusable
from export.vocab import FILL, choose_tokens, trim_vocabulary
from families import head_dim

log = logging.getLogger(__name__)

EXPORTERS = ("auto", "fused", "dynamo", "torchscript")


def resolve_exporter(exporter: str, config, batched_openvino: bool = False) -> str:
    """``auto``: ``fused`` when the model's config allows it (``export.fused.check_fusable``) and OpenVINO is
    not asked to run it at a batch above 1 (its GroupQueryAttention runs batch 1 only), else ``dynamo``.
    ``fused``: itself, or ``UnsupportedForFused`` naming what the model needs. Reads the config only."""
    if exporter == "fused":
        check_fusable(config)
    if exporter != "auto":
        return exporter
    if batched_openvino:
        return "dynamo"
    try:
        check_fusable(config)
    except UnsupportedForFused as err:
        log.info("export: exporter auto -> dynamo (%s)", err)
        return "dynamo"
    return "fused"


class ExportError(RuntimeError):
    """The exported graph is invalid or does not reproduce the PyTorch model."""


def _wrapper(model):
    """An ``nn.Module`` with flat tensor inputs and outputs around an HF decoder."""
    import torch
    from transformers import DynamicCache

    n = model.config.num_hidden_layers

    class FlatKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # full-length layers for every layer, sliding-window ones included: the graph takes and returns
            # the whole past, and the model's mask applies the window (a sliding cache layer would crop it
            # with shape logic the trace freezes)
            cache = DynamicCache()
            for i in range(n):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            flat = []
            for layer in out.past_key_values.layers[:n]:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return FlatKV().eval()


def _example_inputs(config, batch: int = 2, seq: int = 3, past: int = 2):
    import torch

    kv, hd = config.num_key_value_heads, head_dim(config)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    pos = torch.arange(past, past + seq).expand(batch, seq)
    pkv = [torch.zeros(batch, kv, past, hd) for _ in range(2 * config.num_hidden_layers)]
    return (ids, mask, pos, *pkv)


def save_onnx(model_proto, dest_dir: Path, external_data_threshold: int = TWO_GB) -> None:
    """Write ``model.onnx``; weights go to ``model.onnx.data`` when they exceed the threshold. ONNX's checker
    runs unless the graph has ONNX Runtime's ``SimplifiedLayerNormalization`` (the fused graph's), which
    lives in the default domain without being an ONNX op, so the checker rejects it."""
    import onnx

    size = sum(len(t.raw_data) for t in model_proto.graph.initializer)
    external = size >= external_data_threshold
    onnx.save_model(
        model_proto,
        str(dest_dir / ONNX_FILE),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA_FILE,
        size_threshold=1024,
    )
    if not any(n.op_type == "SimplifiedLayerNormalization" and not n.domain for n in model_proto.graph.node):
        onnx.checker.check_model(str(dest_dir / ONNX_FILE))  # by path: works past 2 GB


def export_onnx(
    model_dir: str | Path,
    dest: str | Path,
    *,
    opset: int = 18,
    external_data_threshold: int = TWO_GB,
    verify: bool = True,
    verify_atol: float = 1e-3,
    verify_rtol: float = 1e-4,
    exporter: str = "auto",
    fallback: bool | None = None,
    keep_tokens: Sequence[int] | None = None,
) -> Path:
    """Export the HF causal LM in ``model_dir`` to ``dest/model.onnx`` (float32, + tokenizer,
    ``onnx_config.json``, ``genai_config.json``); ``to_float16`` makes the fp16 folder from it.

    With ``verify``, the graph is run once under ONNX Runtime on a padded prefill and a decode step and
    compared with PyTorch; a mismatch raises ``ExportError``. The folder is written under a temporary name
    and renamed when complete.

    ``auto`` never fails where ``dynamo`` would work: it takes ``fused`` only when the config passes every
    check of the fused graph (``check_fusable``), and if the fused graph still fails to build, to run under
    ONNX Runtime or to match PyTorch, it logs why and exports with ``dynamo``. An explicit ``fused`` fails
    loudly. ``fallback`` overrides that (the pipeline resolves ``auto`` first, then passes
    ``exporter="fused", fallback=True``).

    ``keep_tokens`` trims the vocabulary of the graph to those ids (``export.vocab``): same inputs and outputs,
    the embedding and LM head smaller, ``token_map.json`` in the folder; verified on the kept tokens.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    model_dir, dest = Path(model_dir), Path(dest)
    fallback = exporter == "auto" if fallback is None else fallback
    if exporter in ("auto", "fused"):  # choose, or refuse an unsupported family, before the weights load
        from transformers import AutoConfig

        exporter = resolve_exporter(exporter, AutoConfig.from_pretrained(str(model_dir)))
    keep = None
    if keep_tokens is not None:  # checked before the weights load
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(model_dir)).get_text_config().vocab_size
        keep = choose_tokens([keep_tokens], vocab, top=0)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with building(dest) as tmp:
        try:
            _write(
                model, model_dir, tmp, exporter, opset, external_data_threshold, verify, verify_atol, verify_rtol, keep
            )
        except Exception as err:
            if exporter != "fused" or not fallback:
                raise
            log.warning("export: the fused graph failed (%s); exporter auto -> dynamo", str(err).splitlines()[0][:300])
            for p in tmp.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            _write(
                model, model_dir, tmp, "dynamo", opset, external_data_threshold, verify, verify_atol, verify_rtol, keep
            )
    return dest


def _write(model, model_dir: Path, tmp: Path, exporter, opset, threshold, verify, atol, rtol, keep=None) -> None:
    """One attempt: the graph (vocabulary-trimmed to ``keep``), its folder files, and the check against PyTorch."""
    proto = build_fused(model, opset) if exporter == "fused" else _traced(model, exporter, opset, tmp / "raw")
    meta = _metadata(model, model_dir, exporter, opset)
    if keep is not None:
        meta["vocabulary"] = {**trim_vocabulary(proto, keep, model.config.vocab_size), "token_map": TOKEN_MAP_FILE}
        (tmp / TOKEN_MAP_FILE).write_text(json.dumps(keep))
        log.info(
            "export: vocabulary trimmed to %d of %d tokens (%.1f MB of float weights removed)",
            len(keep),
            model.config.vocab_size,
            meta["vocabulary"]["float_bytes_removed"] / 1e6,
        )
    save_onnx(proto, tmp, threshold)
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    (tmp / GENAI_CONFIG_FILE).write_text(json.dumps(genai_config(meta, model.config), indent=2))
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, tmp / name)
    if verify:
        err = verify_against_torch(tmp, model, atol, rtol, keep)
        log.info("export: ONNX Runtime vs PyTorch max |logit diff| %.2e", err)


def _traced(model, exporter: str, opset: int, raw: Path):
    """The ``dynamo`` or ``torchscript`` graph of ``model`` (written to ``raw``, loaded back, ``raw`` removed):
    transposed weight constants folded, the dynamo exporter's per-node debug records dropped."""
    import onnx
    import torch

    n = model.config.num_hidden_layers
    raw.mkdir()
    wrapper = _wrapper(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python branches on shapes, axis renames
        common = dict(
            input_names=[*INPUTS, *past_names(n)], output_names=["logits", *present_names(n)], opset_version=opset
        )
        if exporter == "dynamo":
            from torch.export import Dim

            b, q, p, t = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
            shapes = ({0: b, 1: q}, {0: b, 1: t}, {0: b, 1: q}, tuple({0: b, 2: p} for _ in range(2 * n)))
            # onnx_ir logs every folded initializer at INFO; torch.onnx warns that torchvision is absent
            quiet = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
            levels = [q.level for q in quiet]
            for q in quiet:
                q.setLevel(logging.ERROR)
            try:
                torch.onnx.export(
                    wrapper,
                    _example_inputs(model.config),
                    str(raw / ONNX_FILE),
                    dynamic_shapes=shapes,
                    dynamo=True,
                    optimize=True,
                    verbose=False,
                    **common,
                )
            finally:
                for q, level in zip(quiet, levels, strict=True):
                    q.setLevel(level)
        else:
            axes = {
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "total_sequence"},
                "position_ids": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"},
            }
            axes.update({k: {0: "batch", 2: "past_sequence"} for k in past_names(n)})
            axes.update({k: {0: "batch", 2: "total_sequence"} for k in present_names(n)})
            torch.onnx.export(
                wrapper,
                _example_inputs(model.config),
                str(raw / ONNX_FILE),
                dynamic_axes=axes,
                do_constant_folding=True,
                dynamo=False,
                **common,
            )
    proto = onnx.load(str(raw / ONNX_FILE), load_external_data=True)
    proto.producer_name = "car-distill"
    fold_transposed_weights(proto)
    for node in proto.graph.node:  # the dynamo exporter's per-node debug records (FX nodes, stacks)
        del node.metadata_props[:]
    shutil.rmtree(raw)
    return proto


def _metadata(model, model_dir: Path, exporter: str, opset: int) -> dict:
    """``onnx_config.json``: what a runner needs to feed the graph (shapes, names, special ids)."""
    import torch

    config, gen = model.config, model.generation_config
    n = config.num_hidden_layers
    return {
        "model_type": config.model_type,
        "num_hidden_layers": n,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": head_dim(config),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "max_position_embeddings": config.max_position_embeddings,
        "eos_token_id": _ids(gen.eos_token_id or config.eos_token_id),
        "pad_token_id": gen.pad_token_id if gen.pad_token_id is not None else config.pad_token_id,
        "dtype": "float32",
        "inputs": [*INPUTS, *past_names(n)],
        "outputs": ["logits", *present_names(n)],
        "opset": opset,
        "source": str(model_dir),
        "exporter": "export.fused"
        if exporter == "fused"
        else f"torch.onnx.export ({exporter}) torch {torch.__version__}",
        "graph": "fused" if exporter == "fused" else "traced",
    }


def genai_config(meta: dict, config) -> dict:
    """``genai_config.json`` for onnxruntime-genai's runtime: our graph's inputs and outputs by name (they
    follow its conventions), greedy search by default. The traced graph grows its cache by concatenation
    (``past_present_share_buffer: false``); the fused graph's GroupQueryAttention also runs in one buffer
    preallocated at ``max_length`` (``true``: no copy of the cache per token). Apps in C, C++, C#, Java or Python then load the folder with
    ``og.Model(folder)``."""
    eos = meta["eos_token_id"]
    return {
        "model": {
            "type": "llama",  # onnxruntime-genai's generic decoder-only pipeline; the names below drive it
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else eos[0],
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": meta["pad_token_id"] if meta["pad_token_id"] is not None else eos[0],
            "vocab_size": meta["vocab_size"],
            "context_length": meta["max_position_embeddings"],
            "decoder": {
                "filename": ONNX_FILE,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": meta["head_dim"],
                "hidden_size": meta["hidden_size"],
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": meta["num_key_value_heads"],
                "num_hidden_layers": meta["num_hidden_layers"],
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "do_sample": False,
            "num_beams": 1,
            "max_length": meta["max_position_embeddings"],
            "min_length": 0,
            "past_present_share_buffer": meta.get("graph") == "fused",
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def fold_transposed_weights(proto) -> None:
    """Replace ``MatMul(x, Transpose(W))`` by ``MatMul(x, W.T)`` with ``W.T`` a new initializer, and name
    the matmul that produces the logits ``lm_head/MatMul``.

    The dynamo exporter keeps a tied LM head as a Transpose of the embedding table; ONNX Runtime's
    quantizers only quantize matmuls whose weight is an initializer, so without this the LM head (the
    largest matrix of a small-vocabulary-heavy model) would stay in float.
    """
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop = []
    for n in g.node:
        if n.op_type != "Transpose" or len(n.input) != 1 or n.input[0] not in inits:
            continue
        users = consumers.get(n.output[0], [])
        if not users or any(u.op_type != "MatMul" or u.input[1] != n.output[0] for u in users):
            continue
        w = numpy_helper.to_array(inits[n.input[0]])
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
        new_name = n.input[0] + ".T"
        g.initializer.append(numpy_helper.from_array(w.transpose(perm).copy(), new_name))
        for u in users:
            u.input[1] = new_name
        drop.append(n)
    for n in drop:
        g.node.remove(n)
    for n in g.node:
        if n.op_type == "MatMul" and "logits" in n.output and "lm_head" not in n.name:
            n.name = "lm_head/MatMul"


def _ids(x) -> list[int]:
    if x is None:
        return []
    return [int(v) for v in (x if isinstance(x, list | tuple) else [x])]


def to_float16(src: str | Path, dest: str | Path, external_data_threshold: int = TWO_GB) -> Path:
    """A new folder with fp16 weights and activations (KV cache and logits included), converted with
    ONNX Runtime's float16 converter (its block list keeps range-sensitive ops in fp32 behind casts)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dest = Path(src), Path(dest)
    with building(dest) as tmp:
        copy_runtime_files(src, tmp)
        proto = onnx.load(str(src / ONNX_FILE), load_external_data=True)
        half = convert_float_to_float16(proto, keep_io_types=False, disable_shape_infer=True)
        save_onnx(half, tmp, external_data_threshold)
        meta = json.loads((tmp / CONFIG_FILE).read_text())
        meta["dtype"] = "float16"
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return dest


def verify_against_torch(
    folder: str | Path, model, atol: float = 1e-3, rtol: float = 1e-4, keep: Sequence[int] | None = None
) -> float:
    """Run a padded prefill and one decode step through ONNX Runtime and PyTorch; return the largest
    absolute logit difference (on real tokens), raising ``ExportError`` above ``atol + rtol * scale``,
    ``scale`` being the largest |logit|: float32 rounding over 30 layers grows with the logits' size (a
    fine-tuned SmolLM2-135M differs by 1.2e-3 at logits up to ~30), while a wrong graph differs by the
    order of the logits themselves. A vocabulary-trimmed graph (``keep``) is fed kept tokens and compared on
    their logits; every other logit must be ``export.vocab.FILL``."""
    import numpy as np
    import torch

    from export.runtime import OnnxCausalLM

    config = model.config
    rt = OnnxCausalLM(folder)
    g = torch.Generator().manual_seed(0)
    pool = torch.tensor(keep if keep is not None else range(config.vocab_size))
    ids = pool[torch.randint(0, len(pool), (2, 5), generator=g)]
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    nxt = pool[torch.randint(0, len(pool), (2, 1), generator=g)]
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        ref2 = model(
            input_ids=nxt,
            attention_mask=mask2,
            position_ids=(mask2.cumsum(-1) - 1)[:, -1:],
            past_key_values=ref.past_key_values,
        )
    logits, past = rt.forward(ids.numpy(), mask.numpy())
    logits2, _ = rt.forward(nxt.numpy(), mask2.numpy(), past)
    real = mask.numpy().astype(bool)
    ref_logits, ref_logits2 = ref.logits.numpy(), ref2.logits.numpy()
    if keep is not None:
        dropped = np.ones(config.vocab_size, bool)
        dropped[list(keep)] = False
        if not (np.all(logits[..., dropped] == FILL) and np.all(logits2[..., dropped] == FILL)):
            raise ExportError(f"the trimmed tokens' logits are not {FILL} in {folder}")
        cols = list(keep)
        logits, logits2, ref_logits, ref_logits2 = (x[..., cols] for x in (logits, logits2, ref_logits, ref_logits2))
    err = max(
        float(np.abs(logits[real] - ref_logits[real]).max()),
        float(np.abs(logits2 - ref_logits2).max()),
    )
    scale = max(float(np.abs(ref_logits[real]).max()), float(np.abs(ref_logits2).max()))
    allowed = atol + rtol * scale
    if not err <= allowed:
        raise ExportError(
            f"ONNX Runtime logits differ from PyTorch by {err:.3g} (> {allowed:.3g} = export.verify_atol {atol} + "
            f"export.verify_rtol {rtol} x largest |logit| {scale:.3g}) in {folder}"
        )
    return err
