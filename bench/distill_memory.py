"""Distillation step: peak memory and throughput of our chunked KD loss vs the usual full-logits loop.

Same teacher, same student, same batch, measured in one run; each variant runs in its own fresh
subprocess so peak RSS is its own. The reference computes full-vocabulary logits of teacher and
student for the whole batch (``model(...).logits``), then forward KL + CE, as most KD code does.

Run: python bench/distill_memory.py [--vocab 32000 --seq 1024 --batch 2 --steps 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.memory import peak_mb, rss_mb  # noqa: E402


def worker(mode: str, vocab: int, seq: int, batch: int, steps: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from distill.losses import forward_kl
    from distill.train import DistillModule, teacher_signals

    torch.manual_seed(0)
    torch.set_num_threads(2)

    def cfg(h, layers, heads, kv, inter):
        return Qwen2Config(
            vocab_size=vocab,
            hidden_size=h,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=seq,
            tie_word_embeddings=True,
        )

    teacher = Qwen2ForCausalLM(cfg(256, 2, 8, 2, 704)).eval()
    student = Qwen2ForCausalLM(cfg(128, 2, 4, 1, 352))
    for p in teacher.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, vocab, (batch, seq))
    labels = ids.clone()
    labels[:, :8] = -100  # a short prompt; the rest is answer
    mask = torch.ones_like(ids)
    batch_d = {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class _DC:  # the slice of DistillConfig DistillModule reads
        divergence, temperature, kd_weight, beta, skew_alpha, chunk_size = "forward_kl", 1.0, 0.5, 0.5, 0.1, chunk

        class features:
            weight, layer_map, kind, attention = 0.0, [], "cosine", False

    module = DistillModule(student, _DC, None, vocab, _DC.chunk_size)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step():
        if mode == "reference":
            with torch.no_grad():
                lt = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
            ls = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
            sel = labels[:, 1:] != -100
            kd = forward_kl(ls[sel], lt[sel]).sum()
            ce = F.cross_entropy(ls[sel], labels[:, 1:][sel], reduction="sum")
            n = int(sel.sum())
        else:
            sig = teacher_signals(teacher, batch_d, [], False)
            out = module(ids, mask, labels, sig, 0.5, 0.5)
            loss = out["logit"] / int(out["tokens"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)
        loss = (0.5 * kd + 0.5 * ce) / n
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    base = rss_mb()
    losses = [step()]  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    dt = time.perf_counter() - t0
    return {
        "mode": mode,
        "peak_mb_over_baseline": peak_mb() - base,
        "baseline_mb": base,
        "tokens_per_s": batch * seq * steps / dt,
        "s_per_step": dt / steps,
        "first_loss": losses[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=128, help="tokens per chunk (conf/distill/default.yaml)")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.vocab, a.seq, a.batch, a.steps, a.chunk)))
        return
    rows = {}
    for mode in ("reference", "chunked"):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            mode,
            "--vocab",
            str(a.vocab),
            "--seq",
            str(a.seq),
            "--batch",
            str(a.batch),
            "--steps",
            str(a.steps),
            "--chunk",
            str(a.chunk),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows[mode] = json.loads(out)
    ref, ch = rows["reference"], rows["chunked"]
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''} 2 threads".strip(),
        "settings": vars(a) | {"worker": None},
        "reference": ref,
        "chunked": ch,
        "memory_ratio": ch["peak_mb_over_baseline"] / ref["peak_mb_over_baseline"],
        "throughput_ratio": ch["tokens_per_s"] / ref["tokens_per_s"],
        "same_first_loss": abs(ch["first_loss"] - ref["first_loss"]) < 1e-3 * abs(ref["first_loss"]),
    }
    print(f"{'variant':<10} {'peak MB over baseline':>22} {'tokens/s':>10} {'s/step':>8} {'first loss':>11}")
    for r in (ref, ch):
        print(
            f"{r['mode']:<10} {r['peak_mb_over_baseline']:>22.0f} {r['tokens_per_s']:>10.0f} "
            f"{r['s_per_step']:>8.2f} {r['first_loss']:>11.5f}"
        )
    print(
        f"chunked / reference: memory {result['memory_ratio']:.3f}x, throughput {result['throughput_ratio']:.2f}x, "
        f"same loss: {result['same_first_loss']}"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
