"""Run by test_trainer / test_sharding under 1 or 2 processes: distil a tiny student, dump the loss curve.

Usage: python tests/ddp_train.py OUT_DIR BATCH_SIZE [--fsdp] [--lora] [--features] [--accum N] [--steps N]
       [--checkpoint-every N] [--kill-at STEP] [--plant-outside-read]

``--kill-at``: rank 0 SIGKILLs itself after optimizer step STEP (a crash, nothing cleaned up); a rerun
with the same OUT_DIR resumes from its checkpoints. ``--plant-outside-read``: the sharded teacher's
signals are computed outside the FSDP root's forward (the bug sharding must not allow).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import distill.train as trainer  # noqa: E402
from distill.config import compose  # noqa: E402
from distill.data import encode_records, load_records  # noqa: E402
from distill.data.tokenize import train_tokenizer  # noqa: E402
from distill.train import apply_lora, final_model, make_accelerator, make_mode, train  # noqa: E402
from families.hf import build_from_config, save_model_atomically  # noqa: E402


def main(a) -> None:
    from conftest import tiny_config

    out = Path(a.out)
    rc = compose(
        [
            "+exp=smoke",
            f"distill.train.batch_size={a.batch}",
            f"distill.train.grad_accum={a.accum}",
            f"distill.train.steps={a.steps}",
            f"distill.train.checkpoint_every={a.checkpoint_every}",
            "distill.train.eval_every=0",
            "distill.train.warmup_steps=0",
            "distill.train.lr=1e-2",
            f"distill.train.sharding={'fsdp' if a.fsdp else 'none'}",
            *(["distill.features.weight=0.5", "distill.features.layer_map=[[0,0],[1,1]]"] if a.features else []),
        ]
    )
    acc = make_accelerator("no")
    recs = load_records(rc.data, "train")
    tok = train_tokenizer([m["content"] for r in recs for m in r["messages"]], 400)
    teacher = build_from_config(tiny_config(tok), seed=1)
    student = build_from_config(tiny_config(tok, hidden=32, heads=2, kv=1, inter=64), seed=2)
    trainable = student
    if a.lora:
        rc.student.lora.target_modules = ["q_proj", "v_proj", "down_proj"]
        trainable = apply_lora(student, rc.student.lora)
    data = encode_records(tok, recs, 256)
    mode = make_mode(rc.distill, teacher=teacher)
    if a.plant_outside_read:
        mode.signals = lambda batch, idx, device, layer_map: trainer.teacher_signals(teacher, batch, layer_map, False)
    if a.kill_at:
        done, steps = trainer.SpikeGuard.step_done, [0]

        def step_done(self):
            done(self)
            steps[0] += 1
            if acc.is_main_process and steps[0] == a.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.SpikeGuard.step_done = step_done
    result = train(
        trainable,
        tok,
        data,
        rc.distill.train,
        accelerator=acc,
        mode=mode,
        checkpoint_dir=out / "checkpoints" if a.checkpoint_every else None,
        checkpoint_key="test",
    )
    model = final_model(acc, trainable, result)  # gathered to rank 0 when sharded
    if acc.is_main_process:
        save_model_atomically(model, tok, out / "student")
        (out / "history.json").write_text(json.dumps(result.history))
    # every rank reports what it holds; only rank 0 may have written the student
    local = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in trainable.state_dict().items()}
    (out / f"rank{acc.process_index}.json").write_text(
        json.dumps(
            {
                "world": acc.num_processes,
                "sharded": result.sharded,
                "local_numel": int(sum(v.numel() for v in local.values())),
                "param_sum": float(sum(v.double().sum() for v in local.values())),
            }
        )
    )
    acc.wait_for_everyone()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("batch", type=int)
    ap.add_argument("--fsdp", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--features", action="store_true")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--plant-outside-read", action="store_true")
    main(ap.parse_args())
