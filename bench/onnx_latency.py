"""Decode and prefill latency: PyTorch eager (HF ``generate`` with KV cache) vs ONNX Runtime fp32, int8, int4.

For each model: batch 1, greedy, exactly ``--tokens`` new tokens per prompt (``distill.evaluate.latency``:
prefill = time to the first token; per-token decode = (T(n) - T(1)) / (n - 1); medians over the prompts).
The physical bound per decode token = bytes of weights read per token / the memory read bandwidth
measured in the same run with 2 threads (a ``sum`` over a 1 GiB tensor, best of 5). Weights read per
token: every weight matrix and the LM head; the embedding table (one row read per token) is left out.

Models: the default experiment's student (``--student DIR``, e.g. runs/.../student) and a larger student
built from config (Qwen2, 768 wide, 12 layers, GQA 12/4, ~105M parameters with the default tokenizer),
whose weights do not fit the L3 cache, so every decode step streams them from memory.

Run:  python bench/onnx_latency.py --student runs/default/student --out bench/results/onnx_latency.json
      (--exporter torchscript for the legacy exporter's graphs)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LARGE = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4
)


def bandwidth_gbs(threads: int = 2, gib: float = 1.0) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def weight_bytes_read_onnx(path: Path) -> int:
    """Initializer bytes read per decode token: all but tables only gathered from (the embedding)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path / "model.onnx"), load_external_data=True)
    users: dict[str, set[str]] = {}
    for n in m.graph.node:
        for i in n.input:
            users.setdefault(i, set()).add(n.op_type)
    total = 0
    for init in m.graph.initializer:
        ops = users.get(init.name, set())
        if ops and ops <= {"Gather", "GatherBlockQuantized"}:
            continue
        total += numpy_helper.to_array(init).nbytes
    return total


def weight_bytes_read_torch(model) -> int:
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (p is emb and not tied):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def bench_model(
    name: str, hf_dir: Path, work: Path, prompts: list[list[int]], tokens: int, bw: float, threads: int, exporter: str
) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from core.onnx_files import onnx_bytes
    from distill.evaluate import hf_generate_n, latency, onnx_generate_n
    from export.onnx import export_onnx
    from export.runtime import OnnxCausalLM
    from families.hf import param_count
    from quantize import quantize_int4, quantize_int8_dynamic

    torch.set_num_threads(threads)
    rows = []
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    pad = model.generation_config.pad_token_id or 0
    n_params = param_count(model)
    read = weight_bytes_read_torch(model)
    lat = latency(hf_generate_n(model, pad), prompts, tokens)
    rows.append({"model": name, "params": n_params, "variant": "pytorch eager", "weight_bytes_read": read, **lat})
    print(rows[-1], flush=True)
    del model
    fp32 = export_onnx(hf_dir, work / f"{name}_{exporter}_fp32", exporter=exporter)
    variants = {
        "onnx fp32": fp32,
        "onnx int8": quantize_int8_dynamic(fp32, work / f"{name}_{exporter}_int8"),
        "onnx int4": quantize_int4(fp32, work / f"{name}_{exporter}_int4", block_size=32),
    }
    for v, folder in variants.items():
        rt = OnnxCausalLM(folder, threads=threads)
        lat = latency(onnx_generate_n(rt), prompts, tokens)
        rows.append(
            {
                "model": name,
                "params": n_params,
                "variant": v,
                "bytes_on_disk": onnx_bytes(folder),
                "weight_bytes_read": weight_bytes_read_onnx(folder),
                **lat,
            }
        )
        print(rows[-1], flush=True)
    eager = rows[0]["ms_per_token"]
    for r in rows:
        r["bound_ms_per_token"] = r["weight_bytes_read"] / (bw * 1e9) * 1000
        r["x_vs_bound"] = r["ms_per_token"] / r["bound_ms_per_token"]
        r["speedup_vs_eager"] = eager / r["ms_per_token"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", type=Path, help="the default experiment's student folder (HF)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompts", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_onnx")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--large-layers", type=int, default=LARGE["num_hidden_layers"])
    ap.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    a = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    from families.hf import build_from_config, read_config, save_model_atomically, student_config

    a.work.mkdir(parents=True, exist_ok=True)
    bw = bandwidth_gbs(a.threads)
    print(f"memory read bandwidth, {a.threads} threads: {bw:.1f} GB/s", flush=True)
    results = {"bandwidth_gbs": bw, "threads": a.threads, "tokens": a.tokens, "exporter": a.exporter, "rows": []}
    if a.student:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(a.student))
        prompts = _prompts(tok, a.prompts)
        results["rows"] += bench_model(
            "default student", a.student, a.work, prompts, a.tokens, bw, a.threads, a.exporter
        )
        large_dir = a.work / "large_hf"
        if not (large_dir / "config.json").is_file():
            cfg = student_config(read_config(a.student), {**LARGE, "num_hidden_layers": a.large_layers, "head_dim": 64})
            model = build_from_config(cfg, seed=0)
            model.generation_config.pad_token_id = tok.pad_token_id
            model.generation_config.eos_token_id = tok.eos_token_id
            save_model_atomically(model, tok, large_dir)
            del model
        results["rows"] += bench_model("large student", large_dir, a.work, prompts, a.tokens, bw, a.threads, a.exporter)
    print()
    print(table(results))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2))


def _prompts(tok, n: int) -> list[list[int]]:
    from core.chat import prompt_text
    from distill.data.car_assistant import GeneratorSettings, generate

    exs = generate("test", GeneratorSettings())[:n]
    return [tok(prompt_text(tok, e.to_record()["messages"]), add_special_tokens=False)["input_ids"] for e in exs]


def table(results: dict) -> str:
    lines = [
        "| model | params | variant | MB on disk | MB read / token | prefill ms | decode ms/token | bound ms/token | x bound | speed-up vs eager |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        disk = f"{r['bytes_on_disk'] / 1e6:.1f}" if "bytes_on_disk" in r else "-"
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['variant']} | {disk} | {r['weight_bytes_read'] / 1e6:.1f} "
            f"| {r['prefill_ms']:.2f} | {r['ms_per_token']:.2f} | {r['bound_ms_per_token']:.2f} | {r['x_vs_bound']:.2f} "
            f"| {r['speedup_vs_eager']:.2f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
