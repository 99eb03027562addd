"""Decode and prefill latency at batch 1 of several exported ONNX folders, measured in one process in
interleaved rounds (folder A, B, ..., then again), so a shared machine's noise falls on all of them alike;
the medians over rounds, and each as a ratio to the first folder (the baseline).

    python bench/folder_latency.py --exp car_assistant_smollm2_int4 --threads 1 2 \\
        runs/b32/onnx/int4_qad runs/b16/onnx/int4_qad --out bench/results/int4_block_latency.json

Prompts: the first ``--prompts`` test requests of the experiment's data (``bench.run_data``), rendered with
the first folder's tokenizer; ``--tokens`` new tokens each (``distill.evaluate.latency``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", type=Path, nargs="+", help="exported ONNX folders; the first is the baseline")
    ap.add_argument("--exp", default="car_assistant_smollm2_int4", help="the experiment whose test prompts to use")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "folder_latency.json")
    a = ap.parse_args(argv)

    from bench.run_data import encoded_splits
    from distill.evaluate import latency, onnx_generate_n
    from export.runtime import OnnxCausalLM

    _, _, enc = encoded_splits(a.folders[0], a.exp, ("test",))
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in enc["test"][: a.prompts]]
    out: dict = {"folders": [str(f) for f in a.folders], "prompts": len(prompts), "tokens": a.tokens, "rows": {}}
    for threads in a.threads:
        runners = [OnnxCausalLM(f, threads=threads) for f in a.folders]
        seen: dict = {str(f): [] for f in a.folders}
        for _ in range(a.rounds):
            for f, rt in zip(a.folders, runners, strict=True):
                seen[str(f)].append(latency(onnx_generate_n(rt), prompts, a.tokens))
        rows = {
            f: {k: statistics.median(r[k] for r in got) for k in ("ms_per_token", "prefill_ms")}
            for f, got in seen.items()
        }
        base = rows[str(a.folders[0])]
        for row in rows.values():
            row.update({f"{k}_ratio": row[k] / base[k] for k in ("ms_per_token", "prefill_ms")})
        out["rows"][f"{threads} threads"] = rows
        print(threads, "threads", json.dumps(rows, indent=1), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
