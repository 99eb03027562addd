"""The one list of quantization schemes (``SCHEMES``) and the one way each is built: ``scheme.build(Build)``.

``quantize.variants``, ``gate.variants``, the export CLI, the config schema (one settings field per scheme)
and the pipeline read it; adding a scheme is one entry here, its settings class and its builder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantize.int8 import Int8Settings, Int8StaticSettings, quantize_int8_dynamic, quantize_int8_static
from quantize.weight_only import (
    Int4MixedSettings,
    Int4QadSettings,
    Int4Settings,
    Int8WeightsSettings,
    quantize_int4,
    quantize_int4_mixed,
    quantize_int8_weights,
)


@dataclass(frozen=True)
class Build:
    """Everything a scheme's builder may read. Callers fill what they have; each builder reads its own
    fields (the registry's flags say which: ``calibrated``, ``trained``, ``needs_student``)."""

    src: Path  # the fp32 export (for a trained scheme: the export of the student trained on its grid)
    dest: Path
    settings: Any  # the scheme's settings object
    calibration: Sequence[Sequence[int]] = ()  # task sequences (prompt + answer) it reads: Scheme.calibration(...)
    probe: Sequence[Sequence[int]] = ()  # sequences for quantization.json's vs_source
    student: Path | None = None  # the PyTorch student (HF folder) ``src`` was exported from
    sequences: Sequence[Sequence[int]] = ()  # validation sequences with their answer starts (sensitivity)
    starts: Sequence[int] = ()
    qad: dict | None = None  # a trained scheme: what quantization-aware distillation did
    reference: Path | None = None  # a trained scheme: the fp32 student's export vs_source compares with


def _int8(b: Build) -> Path:
    s = b.settings
    return quantize_int8_dynamic(b.src, b.dest, per_channel=s.per_channel, embedding=s.embedding, probe=b.probe)


def _int8_static(b: Build) -> Path:
    s = b.settings
    return quantize_int8_static(b.src, b.dest, b.calibration, per_channel=s.per_channel, probe=b.probe)


def _int8_wo(b: Build) -> Path:
    s = b.settings
    return quantize_int8_weights(
        b.src,
        b.dest,
        block_size=s.block_size,
        symmetric=s.symmetric,
        accuracy_level=s.accuracy_level,
        embedding=s.embedding,
        probe=b.probe,
    )


def _int4(b: Build) -> Path:
    s = b.settings
    return quantize_int4(
        b.src,
        b.dest,
        block_size=s.block_size,
        algorithm=s.algorithm,
        symmetric=s.symmetric,
        accuracy_level=s.accuracy_level,
        embedding=s.embedding,
        calibration=b.calibration,
        probe=b.probe,
    )


def _int4_qad(b: Build) -> Path:
    s = b.settings
    return quantize_int4(
        b.src,
        b.dest,
        block_size=s.block_size,
        accuracy_level=s.accuracy_level,
        embedding=s.embedding,
        probe=b.probe,
        qad=b.qad or {},
        reference=b.reference,
    )


def _int4_mixed(b: Build) -> Path:
    s = b.settings
    if b.student is None:
        raise ValueError("int4_mixed measures per-weight sensitivity on the PyTorch student: Build.student is unset")
    return quantize_int4_mixed(
        b.src,
        b.dest,
        student=b.student,
        sequences=b.sequences,
        starts=b.starts,
        budget=s.budget,
        block_size=s.block_size,
        accuracy_level=s.accuracy_level,
        embedding=s.embedding,
        probe=b.probe,
    )


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme: its settings type, its builder, and what the builder reads beyond the fp32
    export: calibration sequences (``calibrated(settings)``), the export of a student trained on the
    scheme's grid (``trained``: quantization-aware distillation, ``quantize.fake``), or the PyTorch student
    with validation sequences and answer starts (``needs_student``: ``settings.examples`` of them)."""

    settings: type
    build: Callable[[Build], Path]
    calibrated: Callable[[Any], bool]
    summary: str
    trained: bool = False
    needs_student: bool = False

    def calibration(self, settings, sequences: Sequence[Sequence[int]]) -> list:
        """The calibration sequences these settings read (empty when uncalibrated)."""
        return list(sequences[: settings.calib_examples]) if self.calibrated(settings) else []


def _never(settings) -> bool:
    return False


def _always(settings) -> bool:
    return True


SCHEMES: dict[str, Scheme] = {
    "int8": Scheme(
        Int8Settings,
        _int8,
        _never,
        "int8 weights per channel, activations quantized per call over the whole batch (dynamic)",
    ),
    "int8_static": Scheme(
        Int8StaticSettings,
        _int8_static,
        _always,
        "int8 weights and activations (QDQ), activation ranges calibrated on task data",
    ),
    "int8_wo": Scheme(
        Int8WeightsSettings,
        _int8_wo,
        _never,
        "int8 weight-only MatMulNBits (blocks): batch-invariant, same numbers in ONNX Runtime and OpenVINO",
    ),
    "int4": Scheme(
        Int4Settings,
        _int4,
        lambda s: s.algorithm == "gptq",
        "int4 weight-only MatMulNBits (rtn / hqq / gptq)",
    ),
    "int4_qad": Scheme(
        Int4QadSettings,
        _int4_qad,
        _never,
        "int4 weight-only MatMulNBits whose weights were distilled on the int4 grid (quantization-aware)",
        trained=True,
    ),
    "int4_mixed": Scheme(
        Int4MixedSettings,
        _int4_mixed,
        _never,
        "int4/8-bit MatMulNBits: 8 bits for the weights whose int4 grid moves the answers most, within a size budget",
        needs_student=True,
    ),
}
EXPORTED = ("fp32", "fp16")  # the ONNX folders export writes; every scheme adds one more


def onnx_variants() -> tuple[str, ...]:
    """Every ONNX folder a run can build: export's two, then one per scheme."""
    return (*EXPORTED, *SCHEMES)
