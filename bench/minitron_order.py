"""The Minitron order for a fine-tuned teacher: prune the *pretrained base* (not the fine-tuned teacher),
recover the pruned model by distillation from the base on general text the base writes itself (data-free),
and only then distil on the task from the fine-tuned teacher (the pipeline, ``student=folder``).

    python bench/minitron_order.py --exp car_assistant_smollm2 --out runs/recipes/minitron_init \\
        --general 2000 --recover-steps 120
    python bench/heldout_recipes.py ... --recipe minitron=student=folder,student.path=runs/recipes/minitron_init

Writes a plain HF folder (the recovered student) with ``recover_info.json`` (seconds per step of this
preparation, counted by ``heldout_recipes.py`` in the recipe's minutes). Needs the base converted already
(any run of the experiment converts the GGUF file into the cache first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def base_folder(rc) -> Path:
    """``teacher.path`` as the folder the pipeline reads: itself, or its cached GGUF conversion."""
    from distill.teacher import gguf_dir
    from families.gguf import file_sha256, is_gguf

    src = Path(rc.teacher.path)
    if not is_gguf(src):
        return src
    folder = gguf_dir(rc.teacher, file_sha256(src))
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} is not converted yet: run the experiment once (its gguf stage converts it)")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", default="car_assistant_smollm2")
    ap.add_argument("--out", required=True, help="the recovered student's folder")
    ap.add_argument("--general", type=int, default=2000, help="general-text sequences the base writes")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--recover-steps", type=int, default=120)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--calib-general", type=int, default=256, help="general sequences in the pruning calibration")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from transformers import AutoTokenizer

    from core.chat import ensure_pad
    from distill.config import compose, student_plan
    from distill.data import load_records
    from distill.general import as_examples, sample_general
    from distill.train import final_model, make_accelerator, make_mode, train
    from families.hf import load_causal_lm, read_config, save_model_atomically
    from prune import prune_model
    from prune.calibration import calibration_batches, sequence_batches

    rc = compose([f"+exp={a.exp}", *a.overrides])
    base = base_folder(rc)
    tok = AutoTokenizer.from_pretrained(str(base))
    ensure_pad(tok)
    model = load_causal_lm(base)
    seconds: dict[str, float] = {}
    t = time.time()
    seqs = sample_general(model, tok, a.general, a.length, 1.0, 0, 32)
    seconds["general"] = time.time() - t

    t = time.time()
    plan = student_plan(rc, read_config(base))
    records = load_records(rc.data, "train")
    batches = calibration_batches(tok, records, rc.student.prune.calib_examples, max_length=rc.data.max_length)
    batches += sequence_batches(tok.pad_token_id, seqs[: a.calib_general])
    pruned, report = prune_model(model, batches, method=rc.student.prune.method, plan=plan)
    seconds["prune"] = time.time() - t

    t = time.time()
    tc = dataclasses.replace(
        rc.distill.train,
        steps=a.recover_steps,
        lr=a.lr,
        warmup_steps=min(10, a.recover_steps // 10),
        eval_every=0,
        checkpoint_every=0,
        eval_generate=0,
        group_by_length=False,
    )
    dcfg = dataclasses.replace(rc.distill, kd_weight=1.0, features=dataclasses.replace(rc.distill.features, weight=0.0))
    acc = make_accelerator(tc.mixed_precision)
    result = train(
        pruned, tok, as_examples(seqs), tc, accelerator=acc, mode=make_mode(dcfg, teacher=model), desc="recover"
    )
    student = final_model(acc, pruned, result)
    seconds["recover"] = time.time() - t
    info = {
        "base": str(base),
        "general": a.general,
        "length": a.length,
        "recover_steps": a.recover_steps,
        "lr": a.lr,
        "seconds": seconds,
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "prune": report,
    }
    with torch.no_grad():
        save_model_atomically(student, tok, Path(a.out), {"recover_info.json": info})
    print(json.dumps({k: round(v, 1) for k, v in seconds.items()}))


if __name__ == "__main__":
    main()
