"""ONNX Runtime quantization of an exported decoder folder (``export.onnx``): each writes a new folder.

- ``quantize_int8_dynamic``: int8 weights (per output channel), activations quantized on the fly.
- ``quantize_int8_static``: int8 weights and activations in QDQ format, activation ranges calibrated on
  task sequences.
- ``quantize_int8_weights``: int8 weight-only ``MatMulNBits`` (8 bits, blocks along the input dimension):
  activations are never quantized across rows, so the answers do not depend on the batch, and ONNX
  Runtime and OpenVINO compute the same numbers.
- ``quantize_int4``: int4 weight-only ``MatMulNBits`` with a block size and an algorithm: ``rtn``
  (round to nearest, ORT's default quantizer), ``hqq`` (half-quadratic, data-free), ``gptq``
  (calibrated on task sequences).
- ``int4_qad`` (scheme): int4 whose weights were distilled on the int4 grid first (quantization-aware
  distillation; the training side is ``quantize.fake``, the loop is the pipeline's ``qad`` stage): the
  baked student's export, quantized by ``quantize_int4`` (rtn, symmetric, the trained block size), holds
  exactly the trained integers and scales.

All of them cover every MatMul with a constant weight, the LM head included (tied heads are exported
as their own transposed initializer), and optionally the embedding (``Gather``). Each folder gets
``quantization.json``: scheme, settings, which ops were quantized how, bytes on disk, and, given probe
sequences, how far the variant's next-token distributions are from the source's (``vs_source``: KL,
argmax agreement, largest logit difference; each sequence run alone, as the car runs it).

bitsandbytes remains the tool for low-precision weights during training (``teacher.quantization``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.files import building
from core.onnx_files import ONNX_FILE, TWO_GB, copy_runtime_files, onnx_bytes
from core.schema import choice, non_negative, positive, unit

log = logging.getLogger(__name__)
logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
INT4_ALGORITHMS = ("rtn", "hqq", "gptq")


def _op_counts(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(sorted(Counter(n.op_type for n in model.graph.node).items()))


def _const_matmuls(model) -> list[str]:
    """MatMul nodes whose second input is an initializer: the weight matmuls (LM head included). ``model``:
    a loaded ``ModelProto`` or the path of one."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


class SequenceReader:
    """ONNX Runtime ``CalibrationDataReader`` over token sequences (prompt + answer), fed one at a time
    as full prefill steps with an empty KV cache."""

    def __init__(self, sequences: Sequence[Sequence[int]], meta: dict):
        self.sequences = [list(s) for s in sequences]
        self.meta = meta
        self._it = None

    def _feeds(self) -> Iterable[dict]:
        import numpy as np

        n, kv, hd = self.meta["num_hidden_layers"], self.meta["num_key_value_heads"], self.meta["head_dim"]
        for s in self.sequences:
            ids = np.array([s], dtype=np.int64)
            feed = {
                "input_ids": ids,
                "attention_mask": np.ones_like(ids),
                "position_ids": np.arange(len(s), dtype=np.int64)[None],
            }
            for i in range(n):
                for k in ("key", "value"):
                    feed[f"past_key_values.{i}.{k}"] = np.zeros((1, kv, 0, hd), dtype=np.float32)
            yield feed

    def get_next(self):
        if self._it is None:
            self._it = iter(self._feeds())
        return next(self._it, None)

    def rewind(self):
        self._it = None

    def __iter__(self):
        return iter(self._feeds())

    def __deepcopy__(self, memo):  # ORT's GPTQ path deep-copies the reader
        return SequenceReader(self.sequences, self.meta)


def _meta(src: Path) -> dict:
    return json.loads((src / "onnx_config.json").read_text())


def compare_to_source(src: str | Path, variant: str | Path, sequences: Sequence[Sequence[int]]) -> dict:
    """Next-token distributions of ``variant`` against ``src`` (two exported folders) on ``sequences``, each
    run alone with an empty cache (batch 1): mean KL(src || variant) per token, share of positions whose
    argmax agrees, largest absolute logit difference. ONNX Runtime only: this is what a quantizer changed."""
    import numpy as np
    import onnxruntime as ort

    src, variant = Path(src), Path(variant)
    sessions = [ort.InferenceSession(str(f / ONNX_FILE), providers=["CPUExecutionProvider"]) for f in (src, variant)]
    kl, agree, tokens, diff = 0.0, 0, 0, 0.0
    for feed in SequenceReader(sequences, _meta(src)):
        p, q = (s.run(["logits"], feed)[0][0].astype(np.float64) for s in sessions)
        lp, lq = (x - x.max(-1, keepdims=True) for x in (p, q))
        lp, lq = (x - np.log(np.exp(x).sum(-1, keepdims=True)) for x in (lp, lq))  # log-softmax
        kl += float((np.exp(lp) * (lp - lq)).sum())
        agree += int((p.argmax(-1) == q.argmax(-1)).sum())
        tokens += p.shape[0]
        diff = max(diff, float(np.abs(p - q).max()))
    return {
        "sequences": len(sequences),
        "tokens": tokens,
        "kl": kl / max(tokens, 1),
        "agreement": agree / max(tokens, 1),
        "max_logit_diff": diff,
    }


def _finish(
    src: Path,
    tmp: Path,
    scheme: str,
    settings: dict,
    probe: Sequence[Sequence[int]] = (),
    reference: Path | None = None,
) -> None:
    """Write ``quantization.json``. ``reference``: the fp32 student's export when ``src`` is another float
    model (QAD's fake-quantized student): ``vs_source`` is then measured against the reference (what the
    quantization costs), and ``vs_fake_quant`` against ``src`` (how exactly the file reproduces it)."""
    copy_runtime_files(src, tmp)
    weights, left = _const_matmuls(src / ONNX_FILE), _const_matmuls(tmp / ONNX_FILE)
    info = {
        "scheme": scheme,
        "settings": settings,
        "source": str(src),
        "quantized": {
            "weight_matmuls": len(weights) - len(left),
            "weight_matmuls_left_float": left,
            "lm_head": any("lm_head" in n for n in weights) and not any("lm_head" in n for n in left),
            "embedding": bool(settings.get("embedding")),
        },
        "ops_before": _op_counts(src / ONNX_FILE),
        "ops_after": _op_counts(tmp / ONNX_FILE),
        "bytes": onnx_bytes(tmp),
        "source_bytes": onnx_bytes(src),
    }
    if probe:
        info["vs_source"] = compare_to_source(reference or src, tmp, probe)
        if reference:
            info["vs_fake_quant"] = compare_to_source(src, tmp, probe)
    (tmp / "quantization.json").write_text(json.dumps(info, indent=2))
    vs = info.get("vs_source")
    log.info(
        "quantize %s: %s -> %s bytes (%.2fx)%s",
        scheme,
        info["source_bytes"],
        info["bytes"],
        info["bytes"] / info["source_bytes"],
        f", KL to the source {vs['kl']:.5f}, agreement {vs['agreement']:.4f}" if vs else "",
    )


def _guard(dest: Path, build) -> Path:
    """Build into a temporary sibling folder, renamed onto ``dest`` when complete. ORT's quantizers log
    every node on the root logger at INFO, and advise pre-processing on every call at WARNING (we
    pre-process where it matters: static int8), so the root logger is quietened meanwhile."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with building(dest) as tmp:
            build(tmp)
    finally:
        root.setLevel(level)
    return dest


def quantize_int8_dynamic(
    src: str | Path,
    dest: str | Path,
    *,
    per_channel: bool = True,
    embedding: bool = False,
    probe: Sequence[Sequence[int]] = (),
) -> Path:
    """int8 weights per output channel (symmetric), activations quantized per call (ORT dynamic: one scale
    over the whole input of each MatMul, so a row's numbers depend on the other rows and on padding)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dest = Path(src), Path(dest)

    def build(tmp: Path) -> None:
        quantize_dynamic(
            str(src / ONNX_FILE),
            str(tmp / ONNX_FILE),
            op_types_to_quantize=["MatMul"] + (["Gather"] if embedding else []),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            use_external_data_format=onnx_bytes(src) >= TWO_GB,
            # DefaultTensorType: the fused graph's com.microsoft ops have no ONNX shape inference to type by
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        settings = {"per_channel": per_channel, "weight_type": "int8", "embedding": embedding}
        _finish(src, tmp, "int8_dynamic", settings, probe)

    return _guard(dest, build)


def quantize_int8_static(
    src: str | Path,
    dest: str | Path,
    calibration: Sequence[Sequence[int]],
    *,
    per_channel: bool = True,
    probe: Sequence[Sequence[int]] = (),
) -> Path:
    """int8 QDQ: weights per channel, activation ranges from MinMax calibration on ``calibration`` sequences."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, dest = Path(src), Path(dest)
    if not calibration:
        raise ValueError("static int8 quantization needs calibration sequences")

    def build(tmp: Path) -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre = tmp / "pre.onnx"  # ONNX Runtime's recommended pre-processing: graph optimisation + shapes
        quant_pre_process(str(src / ONNX_FILE), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(tmp / ONNX_FILE),
            SequenceReader(calibration, _meta(src)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=onnx_bytes(src) >= TWO_GB,
            # DefaultTensorType: the fused graph's com.microsoft ops have no ONNX shape inference to type by
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        pre.unlink()
        settings = {"per_channel": per_channel, "calibration_sequences": len(calibration), "calibrate": "minmax"}
        _finish(src, tmp, "int8_static_qdq", settings, probe)

    return _guard(dest, build)


def quantize_int4(
    src: str | Path,
    dest: str | Path,
    *,
    block_size: int = 32,
    algorithm: str = "rtn",
    symmetric: bool = True,
    accuracy_level: int | None = 4,
    embedding: bool = False,
    calibration: Sequence[Sequence[int]] | None = None,
    probe: Sequence[Sequence[int]] = (),
    qad: dict | None = None,
    reference: str | Path | None = None,
    eight_bit: dict | None = None,
) -> Path:
    """int4 weight-only ``MatMulNBits`` (blocks of ``block_size`` along the input dimension).

    ``eight_bit``: a mixed-precision plan (``quantize.mixed.plan``, with ``"nodes"``: the MatMul node names
    of its 8-bit weights): those are quantized at 8 bits first (rtn), the rest at 4; the plan goes into
    ``quantization.json``.

    ``accuracy_level`` 4 lets ONNX Runtime's CPU kernel compute with int8 activations (fastest on x86; the
    activations are quantized per row and block, so rows stay independent); ``embedding`` also stores the
    embedding table as ``GatherBlockQuantized`` (rtn only).

    ``qad``: ``src`` is the export of a student trained on the int4 grid (``quantize.fake``, rtn symmetric
    at this ``block_size``): round to nearest finds that grid again, so the file holds the trained
    integers and scales; ``qad`` (what training did) goes into ``quantization.json`` and ``reference`` is
    the fp32 student's export that ``vs_source`` is measured against.
    """
    if qad is not None and (algorithm != "rtn" or not symmetric):
        raise ValueError("a QAD-trained student is exported with algorithm=rtn, symmetric=true (its training grid)")
    return _weight_only(
        src,
        dest,
        bits=4,
        block_size=block_size,
        algorithm=algorithm,
        symmetric=symmetric,
        accuracy_level=accuracy_level,
        embedding=embedding,
        calibration=calibration,
        probe=probe,
        qad=qad,
        ref=reference,
        eight_bit=eight_bit,
    )


def quantize_int8_weights(
    src: str | Path,
    dest: str | Path,
    *,
    block_size: int = 32,
    symmetric: bool = True,
    accuracy_level: int | None = 4,
    probe: Sequence[Sequence[int]] = (),
) -> Path:
    """int8 weight-only ``MatMulNBits`` (8 bits, round to nearest, blocks of ``block_size`` along the input
    dimension). The embedding stays float (ONNX Runtime quantizes ``Gather`` at 4 bits only).
    ``accuracy_level`` 4: int8 activations per row and block (OpenVINO's CPU plugin computes the same way:
    the two runtimes agree at block 32); 1 keeps float activations through an 8-bit kernel ~16x slower
    on this CPU (SmolLM2 student: 146.6 vs 9.1 ms/token)."""
    return _weight_only(
        src,
        dest,
        bits=8,
        block_size=block_size,
        algorithm="rtn",
        symmetric=symmetric,
        accuracy_level=accuracy_level,
        embedding=False,
        calibration=None,
        probe=probe,
    )


def _weight_only(
    src,
    dest,
    *,
    bits,
    block_size,
    algorithm,
    symmetric,
    accuracy_level,
    embedding,
    calibration,
    probe,
    qad=None,
    ref=None,
    eight_bit=None,
):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    src, dest = Path(src), Path(dest)
    if algorithm not in INT4_ALGORITHMS:
        raise ValueError(f"int4 algorithm must be one of {', '.join(INT4_ALGORITHMS)}, got {algorithm!r}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"int{bits} block_size must be a power of two >= 16, got {block_size}")
    if embedding and algorithm != "rtn":
        raise ValueError("int4 embedding quantization is available with algorithm=rtn only (ONNX Runtime)")
    if algorithm == "gptq" and not calibration:
        raise ValueError("int4 algorithm=gptq needs calibration sequences")
    ops = ("MatMul", "Gather") if embedding else ("MatMul",)
    if algorithm == "rtn":
        algo = mnb.DefaultWeightOnlyQuantConfig(
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            op_types_to_quantize=ops,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            bits=bits,
        )
    elif algorithm == "hqq":
        algo = mnb.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits, op_types_to_quantize=ops)
    else:
        algo = mnb.GPTQWeightOnlyQuantConfig(
            calibration_data_reader=SequenceReader(calibration, _meta(src)),
            block_size=block_size,
            op_types_to_quantize=ops,
        )

    def build(tmp: Path) -> None:
        import onnx

        model = onnx.load(str(src / ONNX_FILE), load_external_data=True)
        tied = _tied_tables(model) if embedding and bits == 4 else set()  # before the quantizer rewrites it
        if eight_bit and eight_bit.get("nodes"):  # the plan's 8-bit weights first; the 4-bit pass skips them
            first = mnb.MatMulNBitsQuantizer(
                model,
                bits=8,
                block_size=block_size,
                is_symmetric=symmetric,
                accuracy_level=accuracy_level,
                nodes_to_exclude=[n for n in _const_matmuls(model) if n not in set(eight_bit["nodes"])],
                algo_config=mnb.DefaultWeightOnlyQuantConfig(
                    block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level, bits=8
                ),
            )
            first.process()
            model = first.model.model
        q = mnb.MatMulNBitsQuantizer(
            model,
            bits=bits,
            block_size=block_size,
            is_symmetric=symmetric,
            accuracy_level=accuracy_level,
            op_types_to_quantize=ops,
            algo_config=algo,
        )
        q.process()
        shared = _share_tied_embedding(q.model.model, tied) if tied else None
        q.model.save_model_to_file(str(tmp / ONNX_FILE), use_external_data_format=onnx_bytes(src) >= TWO_GB)
        settings = {
            "bits": bits,
            "block_size": block_size,
            "algorithm": algorithm,
            "symmetric": symmetric,
            "accuracy_level": accuracy_level,
            "embedding": embedding,
        }
        if calibration and algorithm == "gptq":
            settings["calibration_sequences"] = len(calibration)
        if shared is not None:
            settings["embedding_shared"] = shared
        if eight_bit is not None:
            settings["mixed_precision"] = eight_bit
        if qad is not None:
            settings["qad"] = qad
        name = f"int{bits}_weight_only" + ("_qad" if qad is not None else "")
        _finish(src, tmp, name, settings, probe, Path(ref) if ref else None)

    return _guard(dest, build)


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _tied_tables(model) -> set[tuple[str, str]]:
    """(MatMul weight, Gather table) initializer names of a float graph that hold the same tensor, the
    weight transposed: a tied LM head and embedding."""
    import numpy as np
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    shapes = {name: tuple(inits[name].dims) for name in tables | weights}
    return {
        (w, t)
        for t in tables
        for w in weights
        if shapes[w] == shapes[t][::-1]
        and np.array_equal(numpy_helper.to_array(inits[w]).T, numpy_helper.to_array(inits[t]))
    }


def _share_tied_embedding(model, tied: set[tuple[str, str]]) -> dict | None:
    """Store a tied embedding once (in place): the int4 embedding lookup (``GatherBlockQuantized``, its own
    copy of the table) is rewired to read the LM head's ``MatMulNBits`` integers (as onnxruntime-genai's
    builder does, but as the constant itself, not through a Reshape, which OpenVINO refuses). Only when the
    source graph's embedding table and LM head weight are the same tensor (``tied``, from ``_tied_tables``)
    and both are blocked the same way; the table then takes the head's grid (round-half-away,
    where ORT's embedding quantizer rounds half to even: a few exact ties may move one step;
    ``elements_changed`` counts them, 0 for a QAD-trained grid). Returns what was done, or None."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    gathers = [n for n in g.node if n.op_type == "GatherBlockQuantized" and n.input[0] in inits]
    if len(gathers) != 1 or (len(gathers[0].input) > 3 and gathers[0].input[3]):
        return None
    emb = gathers[0]
    ea = _attrs(emb)
    table = numpy_helper.to_array(inits[emb.input[0]])
    if table.ndim != 2 or ea.get("gather_axis", 0) != 0 or ea.get("quantize_axis", 1) != 1:
        return None
    vocab, hidden = table.shape
    block = ea["block_size"]
    for head in g.node:
        if head.op_type != "MatMulNBits" or head.input[1] not in inits or (len(head.input) > 3 and head.input[3]):
            continue
        ha = _attrs(head)
        if (ha["N"], ha["K"], ha["bits"], ha["block_size"]) != (vocab, hidden, 4, block):
            continue
        # tied in the source: the float embedding table is the LM head weight (stored transposed)
        if (head.input[1].removesuffix("_Q4"), emb.input[0].removesuffix("_Q4")) not in tied:
            continue
        packed = numpy_helper.to_array(inits[head.input[1]])  # (vocab, blocks, block / 2), low nibble first
        q = np.stack([packed & 0x0F, packed >> 4], -1).reshape(vocab, -1)[:, :hidden].astype(np.int16) - 8
        signed = table.astype(np.int16) - (8 if table.min() >= 0 and table.max() > 7 else 0)  # int4 or uint4
        changed = int((q != signed).sum())
        blocks = packed.shape[1]
        # the head's integers as the table itself (a constant, as OpenVINO requires): rows of (blocks, block/2)
        # bytes, one scale per (row, block); the looked-up rows come out (..., blocks, block) and are flattened,
        # then cut back to the hidden size when the blocks pad it. Only the (small) scales are stored twice.
        scales = numpy_helper.to_array(inits[head.input[2]]).reshape(vocab, blocks, 1)
        scales_init = numpy_helper.from_array(scales, f"{head.input[2]}_table")
        flat_shape = numpy_helper.from_array(np.array([0, 0, blocks * block], np.int64), f"{emb.name}_row_shape")
        padded = blocks * block
        looked_up, flat = f"{emb.output[0]}_blocks", emb.output[0] if padded == hidden else f"{emb.output[0]}_padded"
        nodes = [
            helper.make_node(
                "GatherBlockQuantized",
                [head.input[1], emb.input[1], scales_init.name],
                [looked_up],
                name=f"{emb.name}_shared",
                domain="com.microsoft",
                bits=4,
                block_size=block,
                gather_axis=0,
                quantize_axis=2,
            ),
            helper.make_node("Reshape", [looked_up, flat_shape.name], [flat], name=f"{emb.name}_rows"),
        ]
        extra = [scales_init, flat_shape]
        if padded != hidden:  # the head's blocks pad the hidden size: cut the looked-up rows back
            ends = numpy_helper.from_array(np.array([hidden], np.int64), f"{emb.name}_hidden")
            zero = numpy_helper.from_array(np.array([0], np.int64), f"{emb.name}_zero")
            axis = numpy_helper.from_array(np.array([-1], np.int64), f"{emb.name}_last_axis")
            extra += [ends, zero, axis]
            nodes.append(
                helper.make_node(
                    "Slice", [flat, zero.name, ends.name, axis.name], [emb.output[0]], name=f"{emb.name}_cut"
                )
            )
        at = list(g.node).index(emb)
        g.node.remove(emb)
        for k, node in enumerate(nodes):
            g.node.insert(at + k, node)
        used = {i for n in g.node for i in n.input}
        freed = 0
        for name in (emb.input[0], emb.input[2]):
            if name not in used:
                freed += len(inits[name].raw_data) or inits[name].ByteSize()
                g.initializer.remove(inits[name])
        g.initializer.extend(extra)
        return {"with": head.name, "bytes_saved": freed, "elements_changed": changed}
    return None


# ---- the schemes: settings (typed; values in conf/quantize/default.yaml) and how each is built ----


@dataclass
class Int8Settings:
    per_channel: bool
    embedding: bool

    def problems(self, key: str) -> list[str]:
        return []


@dataclass
class Int8StaticSettings:
    per_channel: bool
    calib_examples: int = positive()

    def problems(self, key: str) -> list[str]:
        return []


def _block_problems(key: str, block_size, accuracy_level) -> list[str]:
    out = []
    if isinstance(block_size, int) and (block_size < 16 or block_size & (block_size - 1)):
        out.append(f"{key}.block_size: {block_size} must be a power of two >= 16 (ONNX Runtime MatMulNBits)")
    if accuracy_level is not None and accuracy_level not in (0, 1, 2, 3, 4):
        out.append(f"{key}.accuracy_level: {accuracy_level} must be 0-4 or null")
    return out


@dataclass
class Int8WeightsSettings:
    block_size: int = positive()
    symmetric: bool
    accuracy_level: int | None  # ORT CPU compute type for activations; null = ORT's default

    def problems(self, key: str) -> list[str]:
        return _block_problems(key, self.block_size, self.accuracy_level)


@dataclass
class Int4Settings:
    block_size: int = positive()
    algorithm: str = choice(*INT4_ALGORITHMS)
    symmetric: bool
    accuracy_level: int | None  # ORT CPU compute type for activations; null = ORT's default
    embedding: bool
    calib_examples: int = positive()

    def problems(self, key: str) -> list[str]:
        out = _block_problems(key, self.block_size, self.accuracy_level)
        if self.embedding and self.algorithm != "rtn":
            out.append(f"{key}.embedding: true needs {key}.algorithm=rtn (ONNX Runtime quantizes Gather with RTN only)")
        return out


@dataclass
class Int4QadSettings:
    block_size: int = positive()
    accuracy_level: int | None  # ORT CPU compute type for activations; null = ORT's default
    embedding: bool
    steps: int = positive()
    lr: float = positive()
    warmup_steps: int = non_negative()

    def problems(self, key: str) -> list[str]:
        return _block_problems(key, self.block_size, self.accuracy_level)


@dataclass
class Int4MixedSettings:
    block_size: int = positive()
    accuracy_level: int | None  # ORT CPU compute type for activations; null = ORT's default
    embedding: bool
    budget: float = unit()  # share of the bytes 8 bits everywhere would add: 0 = all int4, 1 = all 8-bit
    examples: int = positive()  # validation sequences the per-weight sensitivity is measured on

    def problems(self, key: str) -> list[str]:
        return _block_problems(key, self.block_size, self.accuracy_level)


def quantize_int4_mixed(
    src: str | Path,
    dest: str | Path,
    *,
    student: str | Path,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    budget: float,
    block_size: int = 32,
    accuracy_level: int | None = 4,
    embedding: bool = False,
    probe: Sequence[Sequence[int]] = (),
) -> Path:
    """Sensitivity-aware 4/8-bit ``MatMulNBits`` (``quantize.mixed``): each weight of the HF ``student`` (the
    model ``src`` was exported from) alone on the int4 grid, KL on the answer positions of ``sequences``
    (from ``starts``); 8 bits for the weights with the most KL per extra byte within ``budget`` (a share of
    what 8 bits everywhere would add); then ONNX Runtime's quantizer, 8-bit nodes first. The plan and every
    weight's sensitivity go into ``quantization.json`` (``settings.mixed_precision``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantize import fake, mixed

    model = AutoModelForCausalLM.from_pretrained(str(student), dtype=torch.float32)
    sens = mixed.sensitivity(model, sequences, starts, bits=4, block=block_size)
    mods = fake.quantized_modules(model)
    shapes = {n: tuple(mods[n].weight.shape) for n in sens}
    p = mixed.budget_plan(sens, shapes, mixed.onnx_nodes(model, Path(src) / ONNX_FILE), budget, block_size)
    p["sensitivity"] = dict(sorted(sens.items(), key=lambda kv: -kv[1]))
    p["sensitivity_sequences"] = len(sequences)
    del model
    return quantize_int4(
        src,
        dest,
        block_size=block_size,
        accuracy_level=accuracy_level,
        embedding=embedding,
        probe=probe,
        eight_bit=p,
    )


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme: its settings type, how to build it from the fp32 export, and whether
    those settings read calibration sequences (task token ids, prompt + answer)."""

    settings: type
    # (fp32 folder, dest, settings, calibration, probe): probe = sequences for quantization.json's vs_source
    build: Callable[[Path, Path, Any, Sequence[Sequence[int]], Sequence[Sequence[int]]], Path]
    calibrated: Callable[[Any], bool]
    summary: str
    # Trained: built from the export of a student distilled on the scheme's grid (quantization-aware
    # distillation, ``quantize.fake``), ``build(..., qad=<training record>, reference=<fp32 folder>)``.
    trained: bool = False
    # Reads the PyTorch student and task sequences with their answer starts:
    # ``build(..., student=<HF folder>, sequences=[...], starts=[...])`` (``settings.examples`` of them).
    needs_student: bool = False

    def calibration(self, settings, sequences: Sequence[Sequence[int]]) -> list:
        """The calibration sequences these settings read (empty when uncalibrated)."""
        return list(sequences[: settings.calib_examples]) if self.calibrated(settings) else []


# The one list of quantization schemes: quantize.variants, gate.variants, the export CLI and the pipeline
# read it; the config schema's QuantizeConfig has one settings field per entry.
SCHEMES: dict[str, Scheme] = {
    "int8": Scheme(
        Int8Settings,
        lambda src, dest, s, cal, probe=(): quantize_int8_dynamic(
            src, dest, per_channel=s.per_channel, embedding=s.embedding, probe=probe
        ),
        lambda s: False,
        "int8 weights per channel, activations quantized per call over the whole batch (dynamic)",
    ),
    "int8_static": Scheme(
        Int8StaticSettings,
        lambda src, dest, s, cal, probe=(): quantize_int8_static(
            src, dest, cal[: s.calib_examples], per_channel=s.per_channel, probe=probe
        ),
        lambda s: True,
        "int8 weights and activations (QDQ), activation ranges calibrated on task data",
    ),
    "int8_wo": Scheme(
        Int8WeightsSettings,
        lambda src, dest, s, cal, probe=(): quantize_int8_weights(
            src, dest, block_size=s.block_size, symmetric=s.symmetric, accuracy_level=s.accuracy_level, probe=probe
        ),
        lambda s: False,
        "int8 weight-only MatMulNBits (blocks): batch-invariant, same numbers in ONNX Runtime and OpenVINO",
    ),
    "int4": Scheme(
        Int4Settings,
        lambda src, dest, s, cal, probe=(): quantize_int4(
            src,
            dest,
            block_size=s.block_size,
            algorithm=s.algorithm,
            symmetric=s.symmetric,
            accuracy_level=s.accuracy_level,
            embedding=s.embedding,
            calibration=cal[: s.calib_examples],
            probe=probe,
        ),
        lambda s: s.algorithm == "gptq",
        "int4 weight-only MatMulNBits (rtn / hqq / gptq)",
    ),
    "int4_qad": Scheme(
        Int4QadSettings,
        lambda src, dest, s, cal, probe=(), qad=None, reference=None: quantize_int4(
            src,
            dest,
            block_size=s.block_size,
            accuracy_level=s.accuracy_level,
            embedding=s.embedding,
            probe=probe,
            qad=qad or {},
            reference=reference,
        ),
        lambda s: False,
        "int4 weight-only MatMulNBits whose weights were distilled on the int4 grid (quantization-aware)",
        trained=True,
    ),
    "int4_mixed": Scheme(
        Int4MixedSettings,
        lambda src, dest, s, cal, probe=(), student=None, sequences=(), starts=(): quantize_int4_mixed(
            src,
            dest,
            student=student,
            sequences=sequences,
            starts=starts,
            budget=s.budget,
            block_size=s.block_size,
            accuracy_level=s.accuracy_level,
            embedding=s.embedding,
            probe=probe,
        ),
        lambda s: False,
        "int4/8-bit MatMulNBits: 8 bits for the weights whose int4 grid moves the answers most, within a size budget",
        needs_student=True,
    ),
}
EXPORTED = ("fp32", "fp16")  # the ONNX folders export writes; every scheme adds one more


def onnx_variants() -> tuple[str, ...]:
    """Every ONNX folder a run can build: export's two, then one per scheme."""
    return (*EXPORTED, *SCHEMES)
