"""Sensitivity-aware mixed precision on a finished run's student: KL and exact match against file size.

Measures each weight's int4 sensitivity on ``--probe`` validation examples (``quantize.mixed.sensitivity``:
KL on the answer positions, one weight on the grid at a time, in PyTorch), then builds one file per
budget (the share of the all-8-bit extra bytes spent on the most KL-per-byte weights; 0 = all int4,
1 = all 8 bits) with ONNX Runtime's quantizer, and measures each: bytes, KL(fp32 || file) and argmax
agreement on the probe sequences (``quantize.compare_to_source``), exact match on ``--test`` test
examples at batch 1. Writes the numbers and a plot (KL and exact match against MB).

Run:  python bench/mixed_precision.py --run runs/smollm2 --exp car_assistant_smollm2 \\
          --out bench/results/mixed_precision_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (student/, onnx/fp32)")
    ap.add_argument("--exp", default="car_assistant_smollm2")
    ap.add_argument("--probe", type=int, default=32, help="validation examples for sensitivity and KL")
    ap.add_argument("--test", type=int, default=150, help="test examples generated at batch 1")
    ap.add_argument("--budgets", type=float, nargs="*", default=[0.0, 0.05, 0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--embedding", action="store_true", help="int4 embedding (tied: stored once)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mixed_precision"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mixed_precision.json")
    a = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from bench.run_data import encoded_splits
    from distill.evaluate import answer_budget, evaluate_generations
    from export.runtime import OnnxCausalLM
    from quantize import compare_to_source, mixed, quantize_int4

    torch.set_num_threads(2)
    fp32 = a.run / "onnx" / "fp32"
    _, tok, enc = encoded_splits(fp32, a.exp, ("validation", "test"))
    val, test = enc["validation"][: a.probe], enc["test"][: a.test]
    probe = [ex["input_ids"] for ex in val]
    model = AutoModelForCausalLM.from_pretrained(str(a.run / "student"), dtype=torch.float32)
    t = time.perf_counter()
    sens = mixed.sensitivity(model, probe, [ex["prompt_len"] - 1 for ex in val], 4, a.block)
    sens_s = time.perf_counter() - t
    mods = dict(model.named_modules())
    shapes = {n: tuple(mods[n].weight.shape) for n in sens}
    nodes = mixed.onnx_nodes(model, fp32 / "model.onnx")
    results = {
        "machine": "2 threads, batch 1",
        "sensitivity_seconds": sens_s,
        "sensitivity_top": sorted(sens.items(), key=lambda x: -x[1])[:20],
        "rows": [],
    }
    budget_tokens = answer_budget(test)
    for share in a.budgets:
        p = mixed.budget_plan(sens, shapes, nodes, share, a.block)  # (the fused graph's packed q/k/v: one choice)
        dest = a.work / f"mixed_{share:g}"
        shutil.rmtree(dest, ignore_errors=True)
        folder = quantize_int4(fp32, dest, block_size=a.block, embedding=a.embedding, eight_bit=p)
        info = json.loads((folder / "quantization.json").read_text())
        vs = compare_to_source(fp32, folder, probe)
        rt = OnnxCausalLM(folder, threads=2)
        s, _ = evaluate_generations(test, lambda x, rt=rt: rt.generate(x, budget_tokens, batch_size=1), tok)
        row = {
            "share": share,
            "eight_bit_weights": len(p["eight_bit"]),
            "lm_head_8bit": "lm_head" in p["eight_bit"],
            "bytes": info["bytes"],
            "predicted_kl_sum": p["predicted_kl"],
            "kl": vs["kl"],
            "agreement": vs["agreement"],
            "exact_match": s["exact_match"],
        }
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    mb = [r["bytes"] / 1e6 for r in results["rows"]]
    ax.plot(mb, [r["kl"] for r in results["rows"]], "o-", label="KL(fp32 || file), probe")
    ax.set_xlabel("file MB")
    ax.set_ylabel("KL per token")
    ax2 = ax.twinx()
    ax2.plot(mb, [r["exact_match"] for r in results["rows"]], "s--", color="tab:orange", label="exact match")
    ax2.set_ylabel("test exact match (batch 1)")
    for r, x in zip(results["rows"], mb, strict=True):
        ax.annotate(f"{r['share']:g}", (x, r["kl"]), fontsize=7)
    fig.legend(loc="upper right", fontsize=8)
    ax.set_title("mixed 4/8-bit plans: share of the 8-bit budget spent")
    fig.tight_layout()
    fig.savefig(a.out.with_suffix(".png"), dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
