"""Seconds per step of the demo's teacher bootstrap with each batch run whole, split into N micro-batches
sorted by length (``train.split_by_length``) or packed into shared rows (``train.pack``; variant
``PRECISION:pack``), in float32 and bf16 autocast. Same batches, same gradient; only padding and per-call
overhead differ. Also prints how much each way pads.

Run: python bench/split_by_length.py --teacher ~/.cache/distill/teachers/<bootstrapped> [--steps 120]
(any bootstrapped teacher folder: its tokenizer encodes the data, its config is the model trained)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--variants", default="no:1,no:2,no:4,bf16:1,bf16:2,bf16:4")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "split_by_length.json"))
    a = ap.parse_args()

    from accelerate.state import AcceleratorState
    from transformers import AutoTokenizer

    from distill.config import compose
    from distill.data import encode_records, load_records
    from distill.train import CrossEntropy, make_accelerator, train
    from families.hf import build_from_config, read_config

    tok = AutoTokenizer.from_pretrained(a.teacher)
    rc = compose(["+exp=car_assistant"])
    enc = encode_records(tok, load_records(rc.data, "train")[:20000], rc.data.max_length)
    lengths, bs = [len(e["input_ids"]) for e in enc], rc.teacher.bootstrap.train.batch_size
    rng, padding = random.Random(0), {}
    for n in (1, 2, 4, 8):
        real = padded = 0
        for _ in range(2000):
            b = sorted(rng.sample(lengths, bs))
            real += sum(b)
            padded += sum(len(b[i : i + bs // n]) * max(b[i : i + bs // n]) for i in range(0, bs, bs // n))
        padding[n] = round(padded / real, 3)
    from core.chat import collate_packed

    real = padded = 0
    for _ in range(2000):
        b = rng.sample(enc, bs)
        real += sum(len(e["input_ids"]) for e in b)
        padded += collate_packed(b, 0)["input_ids"].numel()
    padding["pack"] = round(padded / real, 3)
    print("padded / real tokens by split:", padding, flush=True)
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**read_config(a.teacher))
    rows = []
    for spec in a.variants.split(","):
        precision, split = spec.split(":")
        tc = copy.deepcopy(rc.teacher.bootstrap.train)
        tc.steps, tc.log_every = a.steps, 10_000
        tc.split_by_length, tc.pack = (1, True) if split == "pack" else (int(split), False)
        model = build_from_config(cfg, 0)
        AcceleratorState._reset_state(True)
        acc = make_accelerator(precision)
        t = time.time()
        res = train(model, tok, enc, tc, accelerator=acc, mode=CrossEntropy(1024), desc=spec)
        sec = time.time() - t
        rows.append(
            {
                "precision": precision,
                "split_by_length": split,
                "s_per_step": round(sec / a.steps, 4),
                "tokens_per_s": round(res.tokens / sec),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["s_per_step"]
    for r in rows:
        r["speedup_vs_first"] = round(base / r["s_per_step"], 2)
    Path(a.out).write_text(json.dumps({"padding": padding, "rows": rows}, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
