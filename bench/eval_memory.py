"""Evaluation (teacher-forced perplexity, KL and agreement of a student against its teacher): peak memory
of our chunked logits vs the full-logits way (``model(...).logits`` for the whole batch, as evaluation
code usually does and as ours did), at a Qwen2.5-size vocabulary.

Each variant runs in its own fresh subprocess so its peak RSS is its own. The models are tiny except for
the vocabulary (hidden 64), so the logits dominate, as they do for a 0.5B model at batch 64. The full
way at batch 64 needs ~2 x 20 GB and is not run on a 24 GB machine: it is measured at smaller batches,
where it grows linearly, and that line is reported for 64.

Run: python bench/eval_memory.py [--vocab 152064 --seq 512 --batch 64 --answer 64 --full-batches 2,4,8]
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


def worker(mode: str, vocab: int, seq: int, batch: int, answer: int, chunk: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from core.chat import IGNORE
    from distill.evaluate import teacher_forced

    torch.manual_seed(0)
    torch.set_num_threads(2)

    def model(seed):
        torch.manual_seed(seed)
        cfg = Qwen2Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=seq,
            tie_word_embeddings=True,
        )
        return Qwen2ForCausalLM(cfg).eval()

    teacher, student = model(0), model(1)
    data = []
    for _ in range(batch):
        ids = torch.randint(0, vocab, (seq,)).tolist()
        labels = [IGNORE] * (seq - answer) + ids[seq - answer :]
        data.append({"input_ids": ids, "labels": labels, "prompt_len": seq - answer})

    class Tok:  # what teacher_forced reads of a tokenizer
        pad_token_id = 0

        def __len__(self):
            return vocab

    base = rss_mb()
    t0 = time.perf_counter()
    with torch.no_grad():
        if mode == "chunked":
            out = teacher_forced(student, data, Tok(), batch, teacher, chunk)
        else:  # the full-logits way: (batch, seq, vocab) logits of both models
            ids = torch.tensor([d["input_ids"] for d in data])
            labels = torch.tensor([d["labels"] for d in data])
            mask = torch.ones_like(ids)
            sel = labels[:, 1:] != IGNORE
            ls = student(input_ids=ids, attention_mask=mask).logits[:, :-1][sel].float()
            lt = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][sel].float()
            nll = float(F.cross_entropy(ls, labels[:, 1:][sel], reduction="sum"))
            a, b = F.log_softmax(lt, -1), F.log_softmax(ls, -1)
            n = int(sel.sum())
            out = {
                "perplexity": float(torch.exp(torch.tensor(nll / n))),
                "kl": float((a.exp() * (a - b)).sum()) / n,
                "agreement": float((lt.argmax(-1) == ls.argmax(-1)).float().mean()),
            }
    return {
        "mode": mode,
        "batch": batch,
        "peak_mb_over_baseline": round(peak_mb() - base, 1),
        "seconds": round(time.perf_counter() - t0, 2),
        **{k: round(v, 6) for k, v in out.items()},
    }


def run(mode, a, batch) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--vocab", str(a.vocab), "--seq", str(a.seq)]
    cmd += ["--batch", str(batch), "--answer", str(a.answer), "--chunk", str(a.chunk)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=152064)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--answer", type=int, default=64, help="answer tokens per sequence")
    ap.add_argument("--chunk", type=int, default=512, help="eval.chunk_size")
    ap.add_argument("--full-batches", default="2,4,8")
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "eval_memory.json"))
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.vocab, a.seq, a.batch, a.answer, a.chunk)))
        return
    rows = [run("chunked", a, a.batch)]
    small = [int(b) for b in a.full_batches.split(",")]
    for b in small:
        rows.append(run("chunked", a, b))
        rows.append(run("full", a, b))
    for r in rows:
        print(json.dumps(r), flush=True)
    full = [r for r in rows if r["mode"] == "full"]
    # least-squares line through the full-logits peaks, evaluated at the target batch
    xs, ys = [r["batch"] for r in full], [r["peak_mb_over_baseline"] for r in full]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    full_at = my + slope * (a.batch - mx)
    same = [(c, f) for c in rows if c["mode"] == "chunked" for f in full if f["batch"] == c["batch"]]
    summary = {
        "machine": platform.processor() or platform.machine(),
        "vocab": a.vocab,
        "seq": a.seq,
        "batch": a.batch,
        "answer_tokens": a.answer,
        "chunk_size": a.chunk,
        "chunked_peak_mb_at_batch": rows[0]["peak_mb_over_baseline"],
        "full_peak_mb_at_batch_extrapolated": round(full_at, 1),
        "full_mb_per_example": round(slope, 1),
        "ratio_full_over_chunked": round(full_at / max(rows[0]["peak_mb_over_baseline"], 1e-9), 1),
        "max_metric_diff_same_batch": max(
            abs(c[k] - f[k]) / max(abs(f[k]), 1e-9) for c, f in same for k in ("perplexity", "kl", "agreement")
        ),
        "rows": rows,
    }
    Path(a.out).write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))


if __name__ == "__main__":
    main()
