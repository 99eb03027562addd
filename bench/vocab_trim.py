"""Vocabulary trimming (``export.vocab``) measured as it ships: size on disk and exact match on the test and the
held-out split (unseen names, places, phrasings) of one distilled student, untrimmed against trimmed.

For each kept set (none = the untrimmed export; ``top`` N = the special tokens, every token of the rendered
train / validation data and of the run's extra pools, and the first N ids, as the pipeline chooses them):
export the student (``export.onnx``, verified against PyTorch on the kept tokens), quantize it into each
variant, and generate greedy answers on the first ``--test`` test and ``--heldout`` held-out examples
(weight-only variants answer the same at any batch, so they are scored at ``--batch``). Retention is the
variant's exact match over the teacher's, from the run's ``metrics.json``.

Run:  python bench/vocab_trim.py --run runs/recipes/mix --exp car_assistant_smollm2 \\
          --out bench/results/vocab_trim_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "int8_wo": lambda s, d: __import__("quantize").quantize_int8_weights(s, d, block_size=32, accuracy_level=4),
    "int4+emb": lambda s, d: __import__("quantize").quantize_int4(s, d, block_size=32, embedding=True),
    "int8_wo+emb": lambda s, d: __import__("quantize").quantize_int8_weights(
        s, d, block_size=32, accuracy_level=4, embedding=True
    ),
}


def pool_sequences(run: Path, tok, max_length: int) -> list[list[int]]:
    """The token sequences of the run's extra pools (augmented requests, general text), from the cache folders
    its manifest names."""
    from core.jsonl import read_jsonl
    from distill.data import encode_records

    stages = json.loads((run / "manifest.json").read_text())["stages"]
    seqs = []
    if "augment" in stages:
        records = read_jsonl(Path(stages["augment"]["folder"]) / "records.jsonl", key="augment")
        seqs += [ex["input_ids"] for ex in encode_records(tok, records, max_length, "augment")]
    if "general" in stages:
        seqs += json.loads((Path(stages["general"]["folder"]) / "sequences.json").read_text())
    return seqs


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for i, v in enumerate(sorted({r["variant"] for r in results["rows"]})):
        rows = [r for r in results["rows"] if r["variant"] == v]
        for j, split in enumerate(("test", "heldout")):
            ax[j].plot(
                [r["bytes"] / 1e6 for r in rows],
                [r[split]["retention"] for r in rows],
                "o-",
                color=f"C{i}",
                label=v,
            )
            for r in rows if split == "heldout" else ():  # in-distribution points coincide: labelled once
                ax[j].annotate(r["kept_label"], (r["bytes"] / 1e6, r[split]["retention"]), fontsize=7)
            ax[j].set_title(f"{split}: retention of the teacher's exact match")
            ax[j].set_xlabel("ONNX file size (MB)")
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (student/ inside)")
    ap.add_argument("--exp", default="car_assistant_smollm2", help="the experiment whose data the run used")
    ap.add_argument("--tops", default="none,32768,16384,8192,0", help="kept sets: none (untrimmed) or the first N ids")
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", default="int8_wo,int4+emb", help=f"any of {', '.join(VARIANTS)}")
    ap.add_argument("--latency-only", action="store_true", help="bytes and decode latency, no answers scored")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vocab_trim"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vocab_trim.json")
    a = ap.parse_args(argv)

    import torch

    from bench.run_data import encoded_splits
    from distill import metrics
    from distill.evaluate import answer_budget, evaluate_generations, latency, onnx_generate_n, scoring
    from export.onnx import export_onnx
    from export.runtime import OnnxCausalLM
    from export.vocab import choose_tokens, special_tokens

    torch.set_num_threads(2)
    student = a.run / "student"
    rc, tok, enc = encoded_splits(student, a.exp, ("train", "validation", "test", "heldout"))
    teacher = json.loads((a.run / "metrics.json").read_text())["teacher"]
    t_em = {"test": teacher["exact_match"], "heldout": teacher["heldout"]["exact_match"]}
    splits = {"test": enc["test"][: a.test], "heldout": enc["heldout"][: a.heldout]}
    vocab = json.loads((student / "config.json").read_text())["vocab_size"]
    data = [ex["input_ids"] for s in ("train", "validation") for ex in enc[s]]
    pools = pool_sequences(a.run, tok, rc.data.max_length)
    always = special_tokens(tok)
    results = {
        "machine": f"{torch.get_num_threads()} threads",
        "run": str(a.run),
        "vocab_size": vocab,
        "teacher": t_em,
        "data_tokens": len({t for s in data for t in s}),
        "pool_tokens": len({t for s in pools for t in s}),
        "rows": [],
    }
    for top in a.tops.split(","):
        keep = None if top == "none" else choose_tokens([*data, *pools], vocab, top=int(top), always=always)
        label = "untrimmed" if keep is None else f"top {top}: {len(keep)} kept"
        fp32 = a.work / f"fp32_{top}"
        shutil.rmtree(fp32, ignore_errors=True)
        t = time.perf_counter()
        export_onnx(student, fp32, exporter="fused", keep_tokens=keep)
        export_s = time.perf_counter() - t
        for name in a.variants.split(","):
            build = VARIANTS[name]
            dest = a.work / f"{name}_{top}"
            shutil.rmtree(dest, ignore_errors=True)
            build(fp32, dest)
            rt = OnnxCausalLM(dest, threads=2)
            row = {
                "kept": len(keep) if keep else vocab,
                "kept_label": label,
                "top": top,
                "variant": name,
                "export_seconds": export_s,
                "bytes": json.loads((dest / "quantization.json").read_text())["bytes"],
            }
            kept = set(keep) if keep else set(range(vocab))
            for split, examples in ({} if a.latency_only else splits).items():
                budget = answer_budget(examples)
                t = time.perf_counter()
                s, answers = evaluate_generations(
                    examples, lambda p, rt=rt, b=budget: rt.generate(p, b, batch_size=a.batch), tok
                )
                # the examples whose reference answer needs a trimmed token (it cannot be written as the tokenizer
                # writes it), and the exact match on the others
                needs = [bool(set(ex["input_ids"][ex["prompt_len"] :]) - kept) for ex in examples]
                rest = [i for i, n in enumerate(needs) if not n]
                texts = [tok.decode(answers[i], skip_special_tokens=True) for i in rest]
                sub = [examples[i] for i in rest]
                rest_em = metrics.score(texts, [ex["answer"] for ex in sub], **scoring(sub, tok))["exact_match"]
                row[split] = {
                    "exact_match": s["exact_match"],
                    "retention": s["exact_match"] / t_em[split],
                    "slices": {k: v.get("exact_match") for k, v in s.get("slices", {}).get("part", {}).items()},
                    "answers_needing_trimmed_tokens": sum(needs) / len(needs),
                    "exact_match_on_the_rest": rest_em,
                    "seconds": time.perf_counter() - t,
                }
            prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in splits["test"][:8]]
            latency(onnx_generate_n(rt), prompts[:2], 8)  # warm-up
            row.update(latency(onnx_generate_n(rt), prompts, 32))
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(results, indent=2))
            shutil.rmtree(dest)
        shutil.rmtree(fp32)
    if not a.latency_only:
        plot(results, a.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
