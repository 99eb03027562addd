"""Retention against distillation minutes and tokens, from a finished run: the pruned student (step 0),
each checkpoint kept under ``--checkpoints`` and the final student, scored on the run's test split
against the teacher's test exact match (metrics.json). Runs with ``distill.train.eval_generate`` draw
this curve themselves (``retention.png``, on validation examples); this script measures it on the test
split for runs that did not, or at more points.

Minutes and tokens of a checkpoint come from the run's training history: tokens(step) is the step's
share of the run's tokens, minutes = tokens / the running tokens/s logged at that step.

Run: python bench/retention_curve.py RUN_DIR [--checkpoints DIR] [--out bench/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument(
        "--checkpoints", default=None, help="folders step-XXXXXXXX (accelerate state); default RUN/checkpoints"
    )
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from distill.config import validate
    from distill.data import encode_records, load_records
    from distill.evaluate import evaluate_model
    from families.hf import load_causal_lm

    run = Path(a.run)
    rc = validate(OmegaConf.load(run / "config.yaml"))
    metrics = json.loads((run / "metrics.json").read_text())
    info = json.loads((run / "student" / "distill_info.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(run / "student"))
    test = encode_records(tok, load_records(rc.data, "test"), rc.data.max_length)[: rc.eval.num_test or None]
    teacher_em = metrics["teacher"]["exact_match"]
    hist = {r["step"]: r for r in info["history"]}
    steps = info["steps"]
    total_tokens = info["tokens_per_s"] * info["seconds"]
    ev = dict(max_new_tokens=rc.eval.max_new_tokens, batch_size=rc.eval.batch_size, chunk_size=rc.eval.chunk_size)

    def point(step: int, model) -> dict:
        with torch.no_grad():
            scores, _ = evaluate_model(model, tok, test, **ev)
        tokens = total_tokens * step / steps
        tps = hist.get(step, {}).get("tokens_per_s") or info["tokens_per_s"]
        row = {
            "step": step,
            "minutes": round(tokens / tps / 60, 2) if step else 0.0,
            "tokens": int(tokens),
            "exact_match": scores["exact_match"],
            "retention": round(scores["exact_match"] / teacher_em, 4),
        }
        print(json.dumps(row), flush=True)
        return row

    rows = [point(0, load_causal_lm(run / "pruned"))]
    ckpts = Path(a.checkpoints) if a.checkpoints else run / "checkpoints"
    for d in sorted(ckpts.glob("step-*")):
        step = int(d.name.split("-")[1])
        if step >= steps:
            continue
        model = load_causal_lm(run / "pruned")
        state = load_file(str(d / "model.safetensors"))
        own = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
        missing, unexpected = model.load_state_dict(own, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
        model.tie_weights()
        rows.append(point(step, model))
    final = {
        "step": steps,
        "minutes": round(info["seconds"] / 60, 2),
        "tokens": int(total_tokens),
        "exact_match": metrics["student"]["exact_match"],
        "retention": round(metrics["student"]["exact_match"] / teacher_em, 4),
    }
    rows.append(final)
    print(json.dumps(final))
    out = {"run": str(run), "teacher_test_exact_match": teacher_em, "n_test": len(test), "points": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=2))
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.6))
        x1, x2 = fig.subplots(1, 2, sharey=True)
        x1.plot([r["minutes"] for r in rows], [r["retention"] for r in rows], "o-")
        x2.plot([r["tokens"] / 1e6 for r in rows], [r["retention"] for r in rows], "o-", color="C1")
        x1.set_xlabel("distillation minutes (2 CPU cores)")
        x2.set_xlabel("training tokens (millions)")
        x1.set_ylabel("test exact match / teacher's")
        for ax in (x1, x2):
            ax.grid(alpha=0.3)
        fig.suptitle(f"{rc.name}: retention against distillation compute")
        fig.tight_layout()
        fig.savefig(Path(a.out).with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    main()
