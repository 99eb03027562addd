"""What ONNX Runtime's int8 activations (``MatMulNBits`` ``accuracy_level: 4``) cost a shipped weight-only file,
and which runtime they make it disagree with: the same file at accuracy_level 4 (as shipped) and 0 (float
activations: a copy with only that attribute changed) under ONNX Runtime, and under OpenVINO as it compiles
the file on this CPU and with its dynamic activation quantization off (float activations), on the first
``--num`` test and heldout examples of the run's experiment (the float rows on the first ``--float-num``). Per split and heldout part: exact match, the
share of answers identical between each pair, and decode ms/token / prefill ms at batch 1.

    python bench/activation_precision.py --run runs/smollm2_int4 --exp car_assistant_smollm2_int4 \\
        --variant int4_qad --num 200 --out bench/results/activation_precision_smollm2.json

Whether OpenVINO quantizes activations depends on the CPU (BENCHMARKS.md section 20): compare rows measured on
one machine only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder with onnx/<variant>")
    ap.add_argument("--exp", default="car_assistant_smollm2_int4", help="the experiment the run was made with")
    ap.add_argument("--variant", default="int4_qad")
    ap.add_argument("--num", type=int, default=200, help="first N examples of test and of heldout")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--float-num",
        type=int,
        default=None,
        help="first N of each split for the float-activation rows (ONNX Runtime's 8-bit float kernel is ~20x slower)",
    )
    ap.add_argument("--work", type=Path, default=Path("/tmp/activation_precision"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "activation_precision.json")
    a = ap.parse_args(argv)

    import torch

    from bench.run_data import encoded_splits
    from distill.evaluate import answer_budget, evaluate_generations, latency, onnx_generate_n
    from export.runtime import OnnxCausalLM
    from quantize import with_accuracy_level

    torch.set_num_threads(a.threads)
    shipped = a.run / "onnx" / a.variant
    _, tok, enc = encoded_splits(shipped, a.exp, ("test", "heldout"))
    float_acts = a.work / f"{a.variant}_accuracy_level_0"
    changed = with_accuracy_level(shipped, float_acts, 0)
    runtimes = {
        "ort_level4": lambda: OnnxCausalLM(shipped, threads=a.threads),
        "ort_level0": lambda: OnnxCausalLM(float_acts, threads=a.threads),
        "openvino": lambda: OnnxCausalLM(shipped, backend="openvino", threads=a.threads),
        # OpenVINO with its dynamic activation quantization off: float activations on VNNI / AMX CPUs too
        "openvino_float": lambda: OnnxCausalLM(
            shipped, backend="openvino", threads=a.threads, openvino_config={"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
        ),
    }
    floats = {"ort_level0", "openvino_float"}
    out: dict = {"run": str(a.run), "variant": a.variant, "nodes": changed, "threads": a.threads, "rows": {}}
    answers: dict = {}
    for name, make in runtimes.items():
        rt = make()
        row: dict = {}
        for split in ("test", "heldout"):
            data = enc[split][: a.float_num or a.num if name in floats else a.num]
            budget = answer_budget(enc[split])
            t = time.perf_counter()
            s, answers[name, split] = evaluate_generations(
                data, lambda p, rt=rt, budget=budget: rt.generate(p, budget, batch_size=1), tok
            )
            row[split] = {
                "exact_match": s["exact_match"],
                "tool_accuracy": s["tool_accuracy"],
                "parts": {p: v["exact_match"] for p, v in s.get("slices", {}).get("part", {}).items()},
                "seconds": time.perf_counter() - t,
            }
        prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in enc["test"][:8]]
        row.update(latency(onnx_generate_n(rt), prompts, 32))
        out["rows"][name] = row
        print(name, json.dumps(row), flush=True)
    names = list(runtimes)
    out["identical_answers"] = {
        f"{x} vs {y}": {
            split: sum(p == q for p, q in zip(answers[x, split], answers[y, split], strict=False))
            / min(len(answers[x, split]), len(answers[y, split]))
            for split in ("test", "heldout")
        }
        for i, x in enumerate(names)
        for y in names[i + 1 :]
    }
    print(json.dumps(out["identical_answers"]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
