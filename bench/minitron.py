"""Minitron in miniature: does pruning + distillation beat the alternatives at the same size and tokens?

Variants, all with the same student parameter budget and the same number of training steps/tokens:
  (a) width-pruned teacher + distillation            (the default recipe)
  (b) random init, same shape as (a), + distillation
  (c) width-pruned teacher + ordinary fine-tuning (cross-entropy only, no teacher signal)
  (d) depth-pruned teacher (same budget) + distillation

Run: python bench/minitron.py --steps 1000 --out bench/minitron.json
(uses the cached bootstrapped teacher of the default experiment; bootstraps it first if missing)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--work", default="runs/bench_minitron")
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="abcd")
    ap.add_argument("--depth-fraction", type=float, default=0.4, help="budget for the depth-vs-width pair (d)")
    a = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from distill.config import compose
    from distill.pipeline import run
    from families.hf import build_from_config, read_config, save_model_atomically

    work = Path(a.work)
    common = [
        "+exp=car_assistant",
        f"distill.train.steps={a.steps}",
        "distill.train.checkpoint_every=0",
        "distill.train.eval_every=0",
        f"student.prune.fraction={a.fraction}",
    ]
    # Depth pruning cannot reach 25% of this teacher (one layer plus embeddings is ~37%), so (d) compares
    # depth and width at the depth plan's own parameter count.
    from distill.config import student_plan

    probe = compose(
        common + ["student=pruned", "student.prune.strategy=depth", f"student.prune.fraction={a.depth_fraction}"]
    )
    teacher_dir = _teacher_dir(probe)
    depth_plan = student_plan(probe, read_config(teacher_dir))
    same = depth_plan.params / depth_plan.teacher_params
    variants = {
        "a": ("pruned (width) + distill", common + ["student=pruned"]),
        "c": ("pruned (width) + fine-tune (CE only)", common + ["student=pruned", "distill.kd_weight=0.0"]),
        "d_depth": (
            "pruned (depth) + distill",
            common + ["student=pruned", "student.prune.strategy=depth", f"student.prune.fraction={a.depth_fraction}"],
        ),
        "d_width": (
            "pruned (width, same params as d_depth) + distill",
            common + ["student=pruned", f"student.prune.fraction={same + 1e-6}"],
        ),
    }
    results = {}
    for key in ("a", "c", "d_depth", "d_width"):
        if key[0] not in a.only:
            continue
        name, overrides = variants[key]
        t0 = time.time()
        m = run(compose(overrides), work / key)
        results[key] = _row(
            name, m, time.time() - t0, json.loads((work / key / "pruned" / "prune_report.json").read_text())
        )
    if "b" in a.only:
        # same architecture as (a), random weights
        from transformers import AutoConfig, AutoTokenizer

        cfg = read_config(work / "a" / "pruned")
        model_type = cfg.pop("model_type")
        for k in ("architectures", "transformers_version"):
            cfg.pop(k, None)
        model = build_from_config(AutoConfig.for_model(model_type, **cfg), seed=0)
        rnd = save_model_atomically(model, AutoTokenizer.from_pretrained(str(work / "a" / "pruned")), work / "b_init")
        t0 = time.time()
        m = run(compose(common + ["student=folder", f"student.path={rnd}"]), work / "b")
        results["b"] = _row("random init (same shape) + distill", m, time.time() - t0, None)
    out = {"steps": a.steps, "fraction": a.fraction, "results": dict(sorted(results.items()))}
    print(f"{'':9} {'variant':48} {'params':>9} {'test EM':>8} {'heldout':>8} {'ppl':>7} {'KL':>7} {'s':>6}")
    for k, r in sorted(results.items()):
        print(
            f"({k}) {r['name']:40} {r['params']:>9,} {r['test_em']:>8.3f} {r['heldout_em']:>8.3f} {r['ppl']:>7.3f} "
            f"{r['kl']:>7.4f} {r['seconds']:>6.0f}"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))


def _teacher_dir(rc):
    """The cached bootstrapped teacher (bootstrapping it if needed), as the pipeline would find it."""
    from distill.data import data_hash, load_records
    from distill.teacher import bootstrap_teacher
    from distill.train import make_accelerator

    if rc.teacher.path:
        return Path(rc.teacher.path)
    records = {s: load_records(rc.data, s) for s in ("train", "test")}
    return bootstrap_teacher(
        rc.teacher,
        records,
        data_hash(rc.data),
        rc.eval,
        accelerator=make_accelerator("no"),
        max_length=rc.data.max_length,
    )


def _row(name, m, seconds, report):
    s = m["student"]
    return {
        "name": name,
        "params": s["num_params"],
        "teacher_params": m["teacher"]["num_params"],
        "test_em": s["exact_match"],
        "heldout_em": s["heldout"]["exact_match"],
        "ppl": s["perplexity"],
        "kl": s["kl"],
        "teacher_test_em": m["teacher"]["exact_match"],
        "teacher_heldout_em": m["teacher"]["heldout"]["exact_match"],
        "seconds": seconds,
        "shape": report["shape"] if report else None,
    }


if __name__ == "__main__":
    main()
