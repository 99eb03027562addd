"""``python -m export SRC DEST``: export any local HF causal-LM folder to ONNX with KV cache, and quantize it.

    python -m export runs/x/student onnx_out                      # onnx_out/fp32
    python -m export runs/x/student onnx_out --fp16 --quantize int8 int4 --block-size 32 --algorithm hqq
    python -m export runs/x/student onnx_out --keep-tokens runs/x/onnx/fp32/token_map.json  # a trimmed vocabulary

Writes DEST/<variant>/ (model.onnx, onnx_config.json, tokenizer files; quantization.json for quantized
variants). Schemes come from ``quantize.SCHEMES``, their settings from conf/quantize/default.yaml (the
pipeline's values) with the flags below on top; schemes that need calibration data are refused here (the
pipeline has the data). Exit code 2 on bad input, 3 when the exported graph does not reproduce PyTorch.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

CONF = Path(__file__).resolve().parent.parent / "conf"


def _conf(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF / name / "default.yaml"))


def main(argv: list[str] | None = None) -> int:
    from export.onnx import EXPORTERS
    from quantize import INT4_ALGORITHMS, SCHEMES, Build

    q, e = _conf("quantize"), _conf("export")
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path, help="local Hugging Face model folder (any family in families.FAMILIES)")
    ap.add_argument("dest", type=Path, help="output folder; each variant goes to DEST/<variant>/")
    ap.add_argument("--fp16", action="store_true", help="also write DEST/fp16")
    ap.add_argument("--quantize", nargs="*", default=[], choices=list(SCHEMES))
    ap.add_argument(
        "--block-size", type=int, default=q["int4"]["block_size"], help="int4 block size (power of two >= 16)"
    )
    ap.add_argument("--algorithm", default=q["int4"]["algorithm"], choices=INT4_ALGORITHMS, help="int4 algorithm")
    ap.add_argument("--opset", type=int, default=e["opset"])
    ap.add_argument("--exporter", default=e["exporter"], choices=EXPORTERS)
    ap.add_argument(
        "--keep-tokens",
        type=Path,
        help="trim the vocabulary to these token ids (a JSON list, e.g. a trimmed run's token_map.json; "
        "see export/vocab.py); the special tokens are always kept",
    )
    ap.add_argument("--vocab-top", type=int, default=0, help="with --keep-tokens: also keep the first N ids")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from families.hf import folder_problems

    q["int4"].update(block_size=a.block_size, algorithm=a.algorithm)
    settings = {v: SCHEMES[v].settings(**q[v]) for v in a.quantize}
    problems = folder_problems(a.src, "src")
    for v, s in settings.items():
        problems += s.problems(f"quantize.{v}")
        if SCHEMES[v].calibrated(s):
            problems.append(f"{v} with these settings needs calibration data: use the pipeline (python -m distill)")
        if SCHEMES[v].trained or SCHEMES[v].needs_student:
            why = "a student trained on its grid" if SCHEMES[v].trained else "task sequences to measure sensitivity on"
            problems.append(f"{v} needs {why}: use the pipeline (python -m distill quantize.variants=[{v}])")
    keep = None
    if a.vocab_top and a.keep_tokens is None:
        problems.append("--vocab-top trims the vocabulary with --keep-tokens: give both (or neither)")
    if a.keep_tokens is not None and not problems:
        keep, problem = _kept_tokens(a.src, a.keep_tokens, a.vocab_top)
        problems += [problem] if problem else []
    if problems:
        print("cannot export:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        return 2

    from export.onnx import ExportError, export_onnx, to_float16

    try:
        fp32 = export_onnx(
            a.src,
            a.dest / "fp32",
            opset=a.opset,
            exporter=a.exporter,
            verify_atol=e["verify_atol"],
            verify_rtol=e["verify_rtol"],
            keep_tokens=keep,
        )
    except ExportError as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 3
    if a.fp16:
        to_float16(fp32, a.dest / "fp16")
    for v, s in settings.items():
        SCHEMES[v].build(Build(fp32, a.dest / v, s))
        logging.getLogger("export").info("%s: %s", v, dataclasses.asdict(s))
    return 0


def _kept_tokens(src: Path, path: Path, top: int) -> tuple[list[int] | None, str | None]:
    """(the kept ids, None) or (None, the problem with ``--keep-tokens``), from config.json and the tokenizer files
    only (no weights load)."""
    import json

    from export.vocab import TrimError, choose_tokens, special_tokens
    from families.hf import read_config

    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"--keep-tokens: cannot read {path} as JSON ({err})"
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        return None, f"--keep-tokens: {path} must hold a non-empty JSON list of token ids"
    if top < 0:
        return None, f"--vocab-top must be >= 0, got {top}"
    from transformers import AutoTokenizer

    special = special_tokens(AutoTokenizer.from_pretrained(str(src)))
    try:
        return choose_tokens([ids], read_config(src)["vocab_size"], top=top, always=special), None
    except TrimError as err:
        return None, f"--keep-tokens: {path}: {err}"


if __name__ == "__main__":
    sys.exit(main())
