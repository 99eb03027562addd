"""Memory per process of distillation: 1 process vs 2 data-parallel processes (DDP) vs 2 FSDP2 processes.

A ~113M-parameter teacher and a ~42M student (Qwen2 shapes, built from config), live logit KD through
``distill.train.train`` with AdamW, on CPU processes (gloo). Each variant runs in fresh processes;
every process reports its resident memory after the models are built, its peak during training
(``ru_maxrss``, which includes building the models whole before they are sharded), its peak during
training alone (VmHWM reset after the models are built) and its resident memory at the last step, next
to what its tensors should take by arithmetic. glibc's mmap threshold is fixed at 64 KB so that freed
tensors leave RSS.

Run: python bench/fsdp_memory.py [--steps 6 --batch 4 --seq 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memory import peak_mb, rss_mb  # noqa: E402

TEACHER = {"hidden_size": 768, "num_hidden_layers": 16, "num_attention_heads": 12, "num_key_value_heads": 4,
           "intermediate_size": 2048}  # fmt: skip
STUDENT = {"hidden_size": 512, "num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 2,
           "intermediate_size": 1408}  # fmt: skip
VOCAB = 16384


class _Tok:  # what train() reads from a tokenizer
    pad_token_id = 0

    def __len__(self):
        return VOCAB


def _hwm_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(out: Path, sharding: str, steps: int, batch: int, seq: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill.config import compose
    from distill.train import make_accelerator, make_mode, train

    torch.set_num_threads(1 if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 2)
    acc = make_accelerator("no")
    world = acc.num_processes
    base = rss_mb()

    def build(shape, seed):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=VOCAB, max_position_embeddings=seq, tie_word_embeddings=True, **shape)
        return Qwen2ForCausalLM(cfg)

    teacher, student = build(TEACHER, 1), build(STUDENT, 2)
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    built = rss_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM): from here on it is training's
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(batch * world * steps):
        ids = torch.randint(1, VOCAB, (seq,), generator=g).tolist()
        data.append({"input_ids": ids, "labels": [-100] * 16 + ids[16:]})
    rc = compose(
        [
            "+exp=smoke",
            f"distill.train.steps={steps}",
            f"distill.train.batch_size={batch}",
            "distill.train.eval_every=0",
            "distill.train.checkpoint_every=0",
            "distill.train.warmup_steps=0",
            f"distill.train.sharding={sharding}",
            "distill.chunk_size=1024",
        ]
    )
    result = train(
        student, _Tok(), data, rc.distill.train, accelerator=acc, mode=make_mode(rc.distill, teacher=teacher)
    )
    shards = world if result.sharded else 1
    expect = (n_t * 4 + n_s * 4 * 4) / shards / 2**20  # fp32 teacher + student weights, grads, AdamW m and v
    row = {
        "sharding": sharding,
        "processes": world,
        "rank": acc.process_index,
        "teacher_params": n_t,
        "student_params": n_s,
        "rss_after_import_mb": base,
        "rss_models_built_mb": built,
        "rss_last_step_mb": result.history[-1]["memory_mb"] if result.history else rss_mb(),
        "peak_mb": peak_mb(),  # the whole process, building the models whole included
        "training_peak_mb": _hwm_mb(),
        "tensors_by_arithmetic_mb": expect,
        "s_per_step": result.seconds / steps,
        "final_loss": result.history[-1]["loss"] if result.history else None,
    }
    (out / f"{sharding}-{world}-rank{acc.process_index}.json").write_text(json.dumps(row))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="per process; 1 process runs the same global batch")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp_memory.json"))
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # internal: OUT_DIR SHARDING
    a = ap.parse_args()
    if a.worker:
        worker(Path(a.worker[0]), a.worker[1], a.steps, a.batch, a.seq)
        return
    import tempfile

    # glibc keeps freed blocks below its (self-raising) mmap threshold mapped: RSS would not show what
    # sharding frees. A fixed threshold returns every block >= 64 KB to the OS when freed.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    tmp = Path(tempfile.mkdtemp())
    common = ["--steps", str(a.steps), "--seq", str(a.seq)]
    runs = [
        ([sys.executable], "none", 2 * a.batch),
        ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "none", a.batch),
        ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "fsdp", a.batch),
    ]
    for launcher, sharding, batch in runs:
        cmd = [*launcher, __file__, "--worker", str(tmp), sharding, "--batch", str(batch), *common]
        subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "2" if len(launcher) == 1 else "1"}, check=True)
    rows = [json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "steps": a.steps,
        "global_batch": 2 * a.batch,
        "seq": a.seq,
        "rows": rows,
    }
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(
        f"{'variant':<22}{'rank':>5}{'built':>9}{'peak':>9}{'train peak':>11}{'last step':>11}{'tensors':>9}"
        f"{'s/step':>8}{'loss':>9}"
    )
    for r in rows:
        name = f"{r['processes']} proc, {r['sharding']}"
        print(
            f"{name:<22}{r['rank']:>5}{r['rss_models_built_mb']:>9.0f}{r['peak_mb']:>9.0f}{r['training_peak_mb']:>11.0f}"
            f"{r['rss_last_step_mb']:>11.0f}{r['tensors_by_arithmetic_mb']:>9.0f}{r['s_per_step']:>8.2f}"
            f"{r['final_loss']:>9.4f}"
        )


if __name__ == "__main__":
    main()
