"""Two evaluation passes on a finished run's student, as the code runs them now against before, alternately on
the same machine, checking that both give the same numbers:

- one distillation probe (``distill.train.eval_every`` with ``eval_generate``): the validation loss on every
  validation example and greedy exact match on ``eval_generate`` validation and heldout examples. Now: validation
  batches formed by length, exact match from generation alone. Before: batches in data order, exact match through
  ``evaluate_model``, which also computes a teacher-forced perplexity nobody reads there.
- the teacher-forced pass of every evaluation (``distill.evaluate.teacher_forced``: perplexity here) on the first
  ``--test`` test lines. Now: batches formed by length. Before: data order.

Run: python bench/eval_passes.py RUN_DIR [--repeats 2] [--test 300] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from core.chat import IGNORE, collate
    from distill.config import validate
    from distill.data import encode_records, encoding, load_records, prepare_tokenizer
    from distill.evaluate import answer_logits, evaluate_model, teacher_forced
    from distill.train import generated_exact_match
    from distill.train.loop import validation_loss
    from families.hf import load_causal_lm

    run = Path(a.run)
    rc = validate(OmegaConf.load(run / "config.yaml"))
    tc = rc.distill.train
    tok = AutoTokenizer.from_pretrained(str(run / "student"))
    enc = {}
    for split in ("validation", "heldout", "test"):
        records = load_records(rc.data, split)
        prepare_tokenizer(tok, rc.data, records, "data")
        enc[split] = encode_records(tok, records, rc.data.max_length, **encoding(rc.data))
    model = load_causal_lm(run / "student").eval()
    n = tc.eval_generate or 100

    @torch.no_grad()
    def data_order_nll(data, bs: int, chunk: int) -> float:
        """Mean cross-entropy per answer token, batches in data order (each as long as its longest example)."""
        total, count = 0.0, 0
        for i in range(0, len(data), bs):
            b = collate(data[i : i + bs], tok.pad_token_id)
            targets, start = b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE], 0
            for logits in answer_logits(model, b, len(tok), chunk):
                k = logits.shape[0]
                total += float(F.cross_entropy(logits, targets[start : start + k], reduction="sum"))
                start, count = start + k, count + k
        return total / count

    @torch.no_grad()
    def before() -> dict:
        val_loss = data_order_nll(enc["validation"], tc.batch_size * 4, rc.distill.chunk_size)
        em = [
            evaluate_model(model, tok, enc[s][:n], max_new_tokens=None, batch_size=tc.batch_size * 2)[0]["exact_match"]
            for s in ("validation", "heldout")
        ]
        return {"val_loss": val_loss, "exact_match": em}

    def after() -> dict:
        probe_tc = dataclasses.replace(tc, eval_generate=n)
        return {
            "val_loss": validation_loss(model, tok, enc["validation"], tc.batch_size * 4, rc.distill.chunk_size),
            "exact_match": [generated_exact_match(model, tok, enc[s], probe_tc) for s in ("validation", "heldout")],
        }

    test = enc["test"][: a.test]

    def perplexity_before() -> dict:
        return {"perplexity": math.exp(data_order_nll(test, rc.eval.batch_size, rc.eval.chunk_size))}

    def perplexity_after() -> dict:
        return {
            "perplexity": teacher_forced(model, test, tok, rc.eval.batch_size, chunk_size=rc.eval.chunk_size)[
                "perplexity"
            ]
        }

    rows = []
    for r in range(a.repeats):
        for name, fn in (
            ("before", before),
            ("after", after),
            ("teacher_forced_before", perplexity_before),
            ("teacher_forced_after", perplexity_after),
        ):
            t0 = time.perf_counter()
            got = fn()
            rows.append({"repeat": r, "probe": name, "seconds": time.perf_counter() - t0, **got})
            print(json.dumps(rows[-1]), flush=True)
    probes = [x for x in rows if "val_loss" in x]
    assert all(x["exact_match"] == probes[0]["exact_match"] for x in probes), "the two probes disagree on exact match"
    assert all(abs(x["val_loss"] - probes[0]["val_loss"]) < 1e-4 for x in probes), "the two probes disagree on the loss"
    ppl = [x["perplexity"] for x in rows if "perplexity" in x]
    assert max(ppl) - min(ppl) < 1e-5, "the two teacher-forced passes disagree"
    out = {"run": str(run), "validation": len(enc["validation"]), "generated": n, "test": len(test), "rows": rows}
    for what, label in (("", "probe"), ("teacher_forced_", f"teacher-forced, {len(test)} test lines")):
        before_s = min(x["seconds"] for x in rows if x["probe"] == f"{what}before")
        after_s = min(x["seconds"] for x in rows if x["probe"] == f"{what}after")
        out[f"{what}before_s"], out[f"{what}after_s"] = before_s, after_s
        print(f"{label}: {before_s:.1f} s before, {after_s:.1f} s now ({after_s / before_s:.2f}x)")
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
