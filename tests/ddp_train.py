"""Run by test_trainer under 1 or 2 processes: distil a tiny student for a few steps, dump the loss curve.

Usage: python tests/ddp_train.py OUT_DIR BATCH_SIZE [fsdp]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from distill.config import compose  # noqa: E402
from distill.data import encode_records, load_records  # noqa: E402
from distill.data.tokenize import train_tokenizer  # noqa: E402
from distill.trainer import gathered_student_state, make_accelerator, make_mode, train  # noqa: E402
from families.hf import build_from_config, save_model_atomically  # noqa: E402


def main(out: Path, batch_size: int) -> None:
    from conftest import tiny_config

    rc = compose(
        [
            "+exp=smoke",
            f"distill.train.batch_size={batch_size}",
            "distill.train.steps=8",
            "distill.train.checkpoint_every=0",
            "distill.train.eval_every=0",
            "distill.train.warmup_steps=0",
            "distill.train.lr=1e-2",
        ]
    )
    acc = make_accelerator("no")
    recs = load_records(rc.data, "train")
    tok = train_tokenizer([m["content"] for r in recs for m in r["messages"]], 400)
    teacher = build_from_config(tiny_config(tok), seed=1)
    student = build_from_config(tiny_config(tok, hidden=32, heads=2, kv=1, inter=64), seed=2)
    data = encode_records(tok, recs, 256)
    result = train(student, tok, data, rc.distill.train, accelerator=acc, mode=make_mode(rc.distill, teacher=teacher))
    state = gathered_student_state(acc, result.module)  # full weights when FSDP sharded them
    if acc.is_main_process:
        save_model_atomically(student, tok, out / "student", state_dict=state)
        (out / "history.json").write_text(json.dumps(result.history))
    # every rank reports what it holds; only rank 0 may have written the student
    local = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in student.state_dict().items()}
    (out / f"rank{acc.process_index}.json").write_text(
        json.dumps(
            {
                "world": acc.num_processes,
                "distributed_type": str(acc.distributed_type),
                "param_sum": float(sum(v.double().sum() for v in local.values())),
            }
        )
    )
    acc.wait_for_everyone()


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), int(sys.argv[2]))
