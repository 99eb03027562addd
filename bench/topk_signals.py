"""What cached top-k teacher signals cost and save, on the default experiment's teacher.

Measures, in one process on one machine:
  1. the one-time cost of the cache: teacher top-k over N training examples (seconds, tokens, bytes/token);
  2. distillation steps against the live teacher vs against the cache (same student, same seed):
     seconds per step and the ratio;
  3. the break-even: how many sweep jobs of S steps amortise the cache.

Needs the default experiment's bootstrapped teacher in the cache (run `python -m distill +exp=car_assistant`
once). Run on a quiet machine:

    python bench/topk_signals.py --examples 4000 --steps 40 --out bench/results/topk_signals.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=4000, help="training examples whose signals are cached")
    ap.add_argument("--steps", type=int, default=40, help="distillation steps timed per mode")
    ap.add_argument("--job-steps", type=int, default=3000, help="steps of one sweep job (the default experiment)")
    ap.add_argument("--out", default="bench/results/topk_signals.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from distill.config import compose, student_sizes
    from distill.data import data_hash, encode_records, load_records
    from distill.signals import TopKSignals, compute_topk, save_signals
    from distill.teacher import bootstrap_dir
    from distill.train import make_accelerator, make_mode, train
    from families.hf import build_from_config, load_causal_lm, read_config, student_config

    torch.set_num_threads(torch.get_num_threads())
    rc = compose(["+exp=car_assistant", "student=small"])
    tdir = bootstrap_dir(rc.teacher, data_hash(rc.data))
    if not (tdir / "config.json").is_file():
        sys.exit(f"no cached teacher at {tdir}: run `python -m distill +exp=car_assistant` first")
    tok = AutoTokenizer.from_pretrained(str(tdir))
    data = encode_records(tok, load_records(rc.data, "train")[: args.examples], rc.data.max_length)
    teacher = load_causal_lm(tdir)
    d = rc.distill
    t0 = time.perf_counter()
    tensors = compute_topk(teacher, data, tok.pad_token_id, len(tok), d.topk, d.temperature, d.chunk_size)
    cache_s = time.perf_counter() - t0
    folder = Path(tempfile.mkdtemp())
    save_signals(tensors, folder, {})
    nbytes = (folder / "topk.safetensors").stat().st_size
    tokens = int(tensors["offsets"][-1])
    signals = TopKSignals(folder)

    tc = rc.distill.train
    tc.steps, tc.checkpoint_every, tc.eval_every, tc.warmup_steps = args.steps, 0, 0, 5
    acc = make_accelerator("no")
    cfg = student_config(read_config(tdir), student_sizes(rc))
    timings = {}
    for mode in ("live", "topk", "live"):  # live twice: the first warms caches; the second is reported
        student = build_from_config(cfg, rc.student.seed)
        t0 = time.perf_counter()
        if mode == "live":
            r = train(student, tok, data, tc, accelerator=acc, mode=make_mode(d, teacher=teacher))
        else:
            r = train(student, tok, data, tc, accelerator=acc, mode=make_mode(d, signals=signals))
        timings[mode] = {"s_per_step": (time.perf_counter() - t0) / args.steps, "final_loss": r.history[-1]["loss"]}
    saved = timings["live"]["s_per_step"] - timings["topk"]["s_per_step"]
    full_cache_s = cache_s * rc.data.num_train / args.examples
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "teacher": str(tdir),
        "k": d.topk,
        "temperature": d.temperature,
        "examples": args.examples,
        "tokens": tokens,
        "cache_seconds": cache_s,
        "cache_bytes": nbytes,
        "bytes_per_token": nbytes / tokens,
        "live": timings["live"],
        "topk": timings["topk"],
        "step_speedup": timings["live"]["s_per_step"] / timings["topk"]["s_per_step"],
        "cache_seconds_full_train_split": full_cache_s,
        "break_even_jobs": (full_cache_s / (saved * args.job_steps)) if saved > 0 else None,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
