"""Post-training quantization of one exported student, variant by variant, measured as it ships.

For each variant of ``RUN/onnx/fp32`` (the fp32 export of a finished run): bytes on disk; KL(fp32 ||
variant) per token and argmax agreement on validation sequences run alone (``quantize.compare_to_source``);
exact match of greedy answers on the first ``--test`` test examples at batch 1 (the car's batch) and,
for dynamic int8, also at ``--batch`` (the batch dependence); ONNX Runtime vs OpenVINO on the same file
(share of identical greedy answers on ``--ov`` examples, largest logit difference); decode ms/token and
prefill ms at batch 1 (``distill.evaluate.latency``, 2 threads). ``--reference`` also runs the dynamic int8
file under ``onnx.reference`` (the ONNX specification in numpy) on two sequences: which runtime is right.

Run:  python bench/quant_variants.py --run runs/smollm2 --exp car_assistant_smollm2 \\
          --out bench/results/quant_variants_smollm2.json
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


def variants(calibration):
    from quantize import quantize_int4, quantize_int8_dynamic, quantize_int8_weights

    return {
        "int8 dynamic (per channel)": lambda s, d, p: quantize_int8_dynamic(s, d, probe=p),
        "int8_wo b32 acc4": lambda s, d, p: quantize_int8_weights(s, d, block_size=32, accuracy_level=4, probe=p),
        "int8_wo b32 float": lambda s, d, p: quantize_int8_weights(s, d, block_size=32, accuracy_level=1, probe=p),
        "int8_wo b128 acc4": lambda s, d, p: quantize_int8_weights(s, d, block_size=128, accuracy_level=4, probe=p),
        "int4 rtn b32 acc4": lambda s, d, p: quantize_int4(s, d, block_size=32, probe=p),
        "int4 rtn b32 acc4 +emb": lambda s, d, p: quantize_int4(s, d, block_size=32, embedding=True, probe=p),
        "int4 rtn b16 acc4": lambda s, d, p: quantize_int4(s, d, block_size=16, probe=p),
        "int4 hqq b32 acc4": lambda s, d, p: quantize_int4(s, d, block_size=32, algorithm="hqq", probe=p),
        "int4 gptq b32 acc4": lambda s, d, p: quantize_int4(
            s, d, block_size=32, algorithm="gptq", calibration=calibration, probe=p
        ),
    }


def reference_check(folder: Path, seqs) -> dict:
    """Largest |logit| difference of ONNX Runtime and OpenVINO from onnx.reference on ``seqs``."""
    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    from export.runtime import OnnxCausalLM

    ref = ReferenceEvaluator(onnx.load(str(folder / "model.onnx")))
    ort, ov = OnnxCausalLM(folder), OnnxCausalLM(folder, backend="openvino")
    out = {"ort": 0.0, "openvino": 0.0, "ort_argmax": [], "openvino_argmax": []}
    for s in seqs:
        ids = np.array([s], dtype=np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(len(s))[None]}
        for i in range(ort.num_layers):
            for k in ("key", "value"):
                feed[f"past_key_values.{i}.{k}"] = np.zeros((1, ort.kv_heads, 0, ort.head_dim), np.float32)
        r = ref.run(["logits"], feed)[0][0]
        for name, rt in (("ort", ort), ("openvino", ov)):
            x = rt.sequence_logits([s], 1)[0]
            out[name] = max(out[name], float(np.abs(x - r).max()))
            out[f"{name}_argmax"].append(float((x.argmax(-1) == r.argmax(-1)).mean()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (onnx/fp32 inside)")
    ap.add_argument("--exp", default="car_assistant_smollm2", help="the experiment whose data the run used")
    ap.add_argument("--probe", type=int, default=32, help="validation sequences for KL / agreement")
    ap.add_argument("--test", type=int, default=150, help="test examples generated at batch 1")
    ap.add_argument("--batch", type=int, default=32, help="the evaluation batch dynamic int8 is also scored at")
    ap.add_argument("--ov", type=int, default=32, help="test examples generated under OpenVINO too")
    ap.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    ap.add_argument("--reference", action="store_true", help="dynamic int8 under onnx.reference too")
    ap.add_argument("--work", type=Path, default=Path("/tmp/quant_variants"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quant_variants.json")
    a = ap.parse_args(argv)

    import numpy as np
    import torch

    from bench.run_data import encoded_splits
    from distill.evaluate import answer_budget, evaluate_generations, latency, onnx_generate_n
    from export.runtime import OnnxCausalLM

    torch.set_num_threads(2)
    fp32 = a.run / "onnx" / "fp32"
    _, tok, enc = encoded_splits(fp32, a.exp, ("train", "validation", "test"))
    probe = [ex["input_ids"] for ex in enc["validation"][: a.probe]]
    calibration = [ex["input_ids"] for ex in enc["train"][:64]]
    test = enc["test"][: a.test]
    budget = answer_budget(test)
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in test]

    def score(folder: Path, batch: int = 1) -> tuple[dict, list]:
        rt = OnnxCausalLM(folder, threads=2)
        t = time.perf_counter()
        s, answers = evaluate_generations(test, lambda p: rt.generate(p, budget, batch_size=batch), tok)
        s["seconds"] = time.perf_counter() - t
        s.update(latency(onnx_generate_n(rt), prompts[:8], 32))
        return s, answers

    def openvino(folder: Path, answers) -> dict:
        ort = OnnxCausalLM(folder, threads=2)
        try:
            ov = OnnxCausalLM(folder, backend="openvino", threads=2)
        except Exception as err:  # an op OpenVINO's ONNX frontend refuses
            return {"error": str(err).strip().splitlines()[-1][:300]}
        ov_answers = ov.generate(prompts[: a.ov], budget, batch_size=1)
        diff = max(
            float(np.abs(x - y).max())
            for x, y in zip(ort.sequence_logits(probe[:8], 1), ov.sequence_logits(probe[:8], 1), strict=True)
        )
        same = sum(x == y for x, y in zip(answers[: a.ov], ov_answers, strict=True)) / a.ov
        return {"generation_match": same, "max_logit_diff": diff}

    results = json.loads(a.out.read_text()) if a.out.is_file() else {}
    results.setdefault("machine", f"{torch.get_num_threads()} threads")
    base, base_answers = score(fp32)
    results["fp32"] = {"bytes": sum(p.stat().st_size for p in fp32.glob("model.onnx*")), **base}
    results["fp32"]["openvino"] = openvino(fp32, base_answers)
    print("fp32", json.dumps(results["fp32"]), flush=True)
    for name, build in variants(calibration).items():
        if a.only and name not in a.only:
            continue
        dest = a.work / name.replace(" ", "_")
        shutil.rmtree(dest, ignore_errors=True)
        t = time.perf_counter()
        folder = build(fp32, dest, probe)
        build_s = time.perf_counter() - t
        info = json.loads((folder / "quantization.json").read_text())
        s, answers = score(folder)
        row = {"bytes": info["bytes"], "build_seconds": build_s, "vs_fp32": info["vs_source"], **s}
        row["answers_equal_fp32"] = sum(x == y for x, y in zip(answers, base_answers, strict=True)) / len(answers)
        if name.startswith("int8 dynamic"):
            row[f"exact_match_at_batch_{a.batch}"] = score(folder, a.batch)[0]["exact_match"]
            if a.reference:
                row["reference"] = reference_check(folder, probe[:2])
        row["openvino"] = openvino(folder, answers)
        results[name] = row
        print(name, json.dumps(row), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2))
    a.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
