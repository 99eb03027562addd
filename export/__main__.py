"""``python -m export SRC DEST``: export any local HF causal-LM folder to ONNX with KV cache, and quantize it.

    python -m export runs/x/student onnx_out                      # onnx_out/fp32
    python -m export runs/x/student onnx_out --fp16 --quantize int8 int4 --block-size 32 --algorithm hqq

Writes DEST/<variant>/ (model.onnx, onnx_config.json, tokenizer files; quantization.json for quantized
variants). Exit code 2 on bad input, 3 when the exported graph does not reproduce PyTorch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="local Hugging Face model folder (Llama / Qwen2 / Qwen3 / Mistral)")
    ap.add_argument("dest", type=Path, help="output folder; each variant goes to DEST/<variant>/")
    ap.add_argument("--fp16", action="store_true", help="also write DEST/fp16")
    ap.add_argument("--quantize", nargs="*", default=[], choices=["int8", "int8_static", "int4"])
    ap.add_argument("--block-size", type=int, default=32, help="int4 block size (power of two >= 16)")
    ap.add_argument("--algorithm", default="rtn", choices=["rtn", "hqq", "gptq"], help="int4 algorithm")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from families.hf import folder_problems

    problems = folder_problems(a.src, "src")
    if a.quantize and {"int8_static"} & set(a.quantize) or a.algorithm == "gptq" and "int4" in a.quantize:
        problems.append(
            "int8_static and int4 --algorithm gptq need calibration data: use the pipeline (python -m distill)"
        )
    if a.block_size < 16 or a.block_size & (a.block_size - 1):
        problems.append(f"--block-size {a.block_size}: must be a power of two >= 16")
    if problems:
        print("cannot export:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2

    from export.onnx import ExportError, export_onnx, to_float16
    from quantize import quantize_int4, quantize_int8_dynamic

    try:
        fp32 = export_onnx(a.src, a.dest / "fp32", opset=a.opset, exporter=a.exporter)
    except ExportError as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 3
    if a.fp16:
        to_float16(fp32, a.dest / "fp16")
    if "int8" in a.quantize:
        quantize_int8_dynamic(fp32, a.dest / "int8")
    if "int4" in a.quantize:
        quantize_int4(fp32, a.dest / "int4", block_size=a.block_size, algorithm=a.algorithm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
