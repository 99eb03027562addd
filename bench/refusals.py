"""Refusals kept, counted over every refusal request of the validation, test and heldout splits (the gate sees
only those among the first ``eval.num_test`` test lines: 17 in the tools experiment). Each model folder answers
greedily in PyTorch; a refusal is kept when the answer calls no function and attempts none.

Run: python bench/refusals.py RUN_DIR MODEL_DIR [MODEL_DIR ...] [--out bench/results/x.json]
(RUN_DIR: a finished run of the built-in data, whose config.yaml says how the lines were written)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SPLITS = ("validation", "test", "heldout")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from core.toolcalls import parse
    from distill.config import validate
    from distill.data import encode_records, encoding, load_records, prepare_tokenizer
    from distill.evaluate import by_length, hf_generate_fn
    from distill.metrics import attempts_call
    from families.hf import load_causal_lm

    rc = validate(OmegaConf.load(Path(a.run) / "config.yaml"))
    out: dict = {}
    for folder in a.models:
        tok = AutoTokenizer.from_pretrained(folder)
        model = load_causal_lm(Path(folder)).eval()
        rows = {}
        for split in SPLITS:
            records = [r for r in load_records(rc.data, split) if r.get("intent") == "refuse"]
            prepare_tokenizer(tok, rc.data, records, "data")
            enc = encode_records(tok, records, rc.data.max_length, **encoding(rc.data))
            prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in enc]
            answers = by_length(prompts, hf_generate_fn(model, tok, a.max_new_tokens, 32))
            texts = [tok.decode(x, skip_special_tokens=True) for x in answers]
            rows[split] = [
                {
                    "request": ex["request"],
                    "lang": r["lang"],
                    "answer": t,
                    "kept": not attempts_call(parse(t, ex["format"])),
                }
                for ex, r, t in zip(enc, records, texts, strict=True)
            ]
        kept = {s: sum(x["kept"] for x in rows[s]) for s in SPLITS}
        total = sum(len(rows[s]) for s in SPLITS)
        print(folder, " ".join(f"{s} {kept[s]}/{len(rows[s])}" for s in SPLITS), f"all {sum(kept.values())}/{total}")
        out[folder] = {"kept": kept, "total": total, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(out, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
