"""``python -m prune SRC DEST --fraction 0.25``: prune any local HF folder into a standard HF folder.

Calibration batches (for activation importance) come from the built-in car-assistant training split,
or from ``--data file.jsonl`` (chat ``messages`` or ``prompt``/``completion`` lines).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

log = logging.getLogger("prune")


def calibration_batches(
    tokenizer, records: list[dict], n_examples: int, batch_size: int = 16, max_length: int = 256
) -> list[dict]:
    """Padded batches of the first ``n_examples`` records (prompt + answer), for activation statistics."""
    from distill.data.tokenize import collate, encode

    enc = [encode(tokenizer, r["messages"]) for r in records[:n_examples]]
    enc = [e for e in enc if len(e["input_ids"]) <= max_length]
    out = []
    for i in range(0, len(enc), batch_size):
        b = collate(enc[i : i + batch_size], tokenizer.pad_token_id)
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
    return out


def prune_folder(
    src,
    dest,
    *,
    sizes: dict | None = None,
    fraction: float | None = None,
    bytes_: int | None = None,
    strategy: str = "width",
    method: str = "activation",
    align: int = 8,
    prune_heads: bool = True,
    calib_examples: int = 256,
    records: list[dict] | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Prune the model in folder ``src`` and save a standard HF folder at ``dest``; returns the report.

    The plan (and every problem with it) is settled from config.json before any weights load.
    """
    from transformers import AutoTokenizer

    from distill.models import folder_hash, folder_problems, load_causal_lm, read_config, save_model_atomically
    from prune import PlanError, make_plan, prune_model

    problems = folder_problems(src, "src", allow_pickle=allow_pickle)
    if problems:
        raise PlanError(problems)
    plan = make_plan(
        read_config(src),
        sizes=sizes,
        fraction=fraction,
        bytes_=bytes_,
        strategy=strategy,
        align=align,
        prune_heads=prune_heads,
    )
    for r in plan.reasons:
        log.info("plan: %s", r)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    model = load_causal_lm(src)
    batches = None
    if method == "activation":
        if records is None:
            from distill.data.car_assistant import GeneratorSettings, generate

            records = [e.to_record() for e in generate("train", GeneratorSettings(num_train=max(calib_examples, 64)))]
        batches = calibration_batches(tokenizer, records, calib_examples)
    pruned, report = prune_model(model, batches, method=method, sizes=plan.shape.as_dict(), align=align)
    report.update(
        source=str(src),
        source_hash=folder_hash(src),
        reasons=plan.reasons,
        strategy=strategy,
        calib_examples=calib_examples if method == "activation" else 0,
    )
    save_model_atomically(pruned, tokenizer, dest, {"prune_report.json": report})
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("src", help="local Hugging Face model folder (Llama / Qwen2 / Qwen3 / Mistral)")
    ap.add_argument("dest", help="output folder (written atomically)")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--fraction", type=float, help="parameter budget as a fraction of the source model")
    budget.add_argument("--bytes", dest="bytes_", type=int, help="budget in bytes at --bytes-per-param")
    for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"):
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, help="explicit target size")
    ap.add_argument("--strategy", choices=("width", "depth"), default="width", help="for budgets (default width)")
    ap.add_argument("--method", choices=("activation", "magnitude"), default="activation")
    ap.add_argument("--align", type=int, default=8, help="hidden / MLP sizes are multiples of this")
    ap.add_argument("--keep-heads", action="store_true", help="budget pruning leaves attention heads alone")
    ap.add_argument("--calib-examples", type=int, default=256)
    ap.add_argument("--data", help="JSONL calibration data (default: built-in car-assistant data)")
    ap.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (pickle) weights")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from prune import PlanError

    sizes = {
        k: getattr(a, k)
        for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")
        if getattr(a, k) is not None
    }
    try:
        records = None
        if a.data:
            from distill.data.jsonl import read_jsonl

            records = read_jsonl(a.data, key="--data")
        report = prune_folder(
            a.src,
            a.dest,
            sizes=sizes,
            fraction=a.fraction,
            bytes_=a.bytes_,
            strategy=a.strategy,
            method=a.method,
            align=a.align,
            prune_heads=not a.keep_heads,
            calib_examples=a.calib_examples,
            records=records,
            allow_pickle=a.allow_pickle,
        )
    except (PlanError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("shape", "params", "teacher_params", "fraction")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
