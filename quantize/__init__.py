"""ONNX Runtime quantization of an exported decoder folder (``export.onnx``): each writes a new folder.

- ``quantize_int8_dynamic``: int8 weights (per output channel), activations quantized on the fly.
- ``quantize_int8_static``: int8 weights and activations in QDQ format, activation ranges calibrated on
  task sequences.
- ``quantize_int8_weights``: int8 weight-only ``MatMulNBits`` (8 bits, blocks along the input dimension):
  activations are never quantized across rows, so the answers do not depend on the batch, and ONNX
  Runtime and OpenVINO compute the same numbers; optionally the embedding at 8 bits too (``tied``).
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

Modules: ``ort`` (ONNX Runtime plumbing, ``quantization.json``), ``int8`` (dynamic, static), ``weight_only``
(int4, int8 weight-only, QAD int4, 4/8-bit mixed), ``tied`` (a tied embedding stored once), ``schemes`` (the
registry, one build signature: ``SCHEMES[name].build(Build(...))``); ``fake`` and ``mixed`` are the torch
side (the int4 grid in training, per-weight sensitivity). This package imports no torch.

bitsandbytes remains the tool for low-precision weights during training (``teacher.quantization``).
"""

from quantize.int8 import Int8Settings, Int8StaticSettings, quantize_int8_dynamic, quantize_int8_static
from quantize.ort import SequenceReader, compare_to_source
from quantize.schemes import EXPORTED, SCHEMES, Build, Scheme, onnx_variants
from quantize.weight_only import (
    INT4_ALGORITHMS,
    Int4MixedSettings,
    Int4QadSettings,
    Int4Settings,
    Int8WeightsSettings,
    quantize_int4,
    quantize_int4_mixed,
    quantize_int8_weights,
    with_accuracy_level,
)

__all__ = [
    "EXPORTED",
    "INT4_ALGORITHMS",
    "SCHEMES",
    "Build",
    "Int4MixedSettings",
    "Int4QadSettings",
    "Int4Settings",
    "Int8Settings",
    "Int8StaticSettings",
    "Int8WeightsSettings",
    "Scheme",
    "SequenceReader",
    "compare_to_source",
    "onnx_variants",
    "quantize_int4",
    "quantize_int4_mixed",
    "quantize_int8_dynamic",
    "quantize_int8_static",
    "quantize_int8_weights",
    "with_accuracy_level",
]
