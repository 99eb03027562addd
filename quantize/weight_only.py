"""Weight-only ``MatMulNBits``: int4 (rtn / hqq / gptq, optionally the embedding, a tied embedding stored
once), int8 weight-only, int4 of a QAD-trained student, and sensitivity-aware 4/8-bit mixed precision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.onnx_files import ONNX_FILE, TWO_GB, onnx_bytes
from core.schema import choice, non_negative, positive, unit
from quantize.ort import SequenceReader, const_matmuls, finish, guard, read_meta
from quantize.tied import quantize_embedding_8bit, share_tied_embedding, tied_tables

INT4_ALGORITHMS = ("rtn", "hqq", "gptq")


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
    embedding: bool = False,
    probe: Sequence[Sequence[int]] = (),
) -> Path:
    """int8 weight-only ``MatMulNBits`` (8 bits, round to nearest, blocks of ``block_size`` along the input
    dimension). ``embedding``: the embedding table at 8 bits too, dequantized after the lookup
    (``quantize.tied.quantize_embedding_8bit``; a tied one reads the LM head's bytes and is stored once);
    otherwise it stays float (ONNX Runtime's own quantizer does ``Gather`` at 4 bits only).
    ``accuracy_level`` 4: int8 activations per row and block (OpenVINO's CPU plugin computes the same way
    on CPUs with VNNI / AMX, with other roundings: 289 / 300 heldout answers alike on the SmolLM2 student,
    BENCHMARKS.md section 31; on AVX2 alone it keeps float activations,
    ``export.runtime.openvino_quantizes_activations``); 1 keeps float activations through an 8-bit kernel
    ~16x slower on an AVX512 CPU (SmolLM2 student: 146.6 vs 9.1 ms/token)."""
    return _weight_only(
        src,
        dest,
        bits=8,
        block_size=block_size,
        algorithm="rtn",
        symmetric=symmetric,
        accuracy_level=accuracy_level,
        embedding=embedding,
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
    if embedding and algorithm != "rtn" and bits == 4:
        raise ValueError("int4 embedding quantization is available with algorithm=rtn only (ONNX Runtime)")
    if algorithm == "gptq" and not calibration:
        raise ValueError("int4 algorithm=gptq needs calibration sequences")
    ops = ("MatMul", "Gather") if embedding and bits == 4 else ("MatMul",)  # 8 bits: quantize_embedding_8bit
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
            calibration_data_reader=SequenceReader(calibration, read_meta(src)),
            block_size=block_size,
            op_types_to_quantize=ops,
        )

    def build(tmp: Path) -> None:
        import onnx

        model = onnx.load(str(src / ONNX_FILE), load_external_data=True)
        tied = tied_tables(model) if embedding else set()  # before the quantizer rewrites it
        if eight_bit and eight_bit.get("nodes"):  # the plan's 8-bit weights first; the 4-bit pass skips them
            first = mnb.MatMulNBitsQuantizer(
                model,
                bits=8,
                block_size=block_size,
                is_symmetric=symmetric,
                accuracy_level=accuracy_level,
                nodes_to_exclude=[n for n in const_matmuls(model) if n not in set(eight_bit["nodes"])],
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
        if bits == 4:
            shared = share_tied_embedding(q.model.model, tied) if tied else None
        else:
            shared = quantize_embedding_8bit(q.model.model, tied, block_size) if embedding else None
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
            settings["embedding_shared" if bits == 4 else "embedding_8bit"] = shared
        if eight_bit is not None:
            settings["mixed_precision"] = eight_bit
        if qad is not None:
            settings["qad"] = qad
        name = f"int{bits}_weight_only" + ("_qad" if qad is not None else "")
        finish(src, tmp, name, settings, probe, Path(ref) if ref else None)

    return guard(dest, build)


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


def with_accuracy_level(src: str | Path, dest: str | Path, level: int) -> int:
    """Write ``dest``: the exported folder ``src`` with every ``MatMulNBits`` at ``accuracy_level`` ``level``
    (how ONNX Runtime computes its activations: 4 int8, 0 / 1 float); the weights, scales and every other
    file are copies of ``src``'s (not hard links: onnx refuses to load external data with several links, so
    a link would break ``src`` for as long as the copy lives). Returns the number of nodes changed."""
    import shutil

    import onnx

    src, dest = Path(src), Path(dest)
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    model = onnx.load(str(src / ONNX_FILE), load_external_data=False)  # the weights stay where they are
    changed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*attrs, onnx.helper.make_attribute("accuracy_level", level)])
            changed += 1
    onnx.save(model, str(dest / ONNX_FILE))  # the external data stays where the graph points: dest's copy
    return changed


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
    embedding: bool  # the embedding table at 8 bits too (a tied one stored once, on the LM head's bytes)

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


QAD_TARGETS = ("teacher", "student")  # what the int4 grid is distilled from (quantize.int4_qad.target)


@dataclass
class Int4QadSettings:
    block_size: int = positive()
    accuracy_level: int | None  # ORT CPU compute type for activations; null = ORT's default
    embedding: bool
    steps: int = positive()
    lr: float = positive()
    warmup_steps: int = non_negative()
    # teacher: the distillation's loss and teacher; student: the fp32 student's logits alone
    target: str = choice(*QAD_TARGETS)
    # keep distillation's feature terms (distill.features at projection: channels) on the grid too
    features: bool

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
