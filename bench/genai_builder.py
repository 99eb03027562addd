"""Our ONNX artifacts against onnxruntime-genai's model builder on the same student, as the car runs them.

The builder (``python -m onnxruntime_genai.models.builder -p int4 -e cpu``, the reference LLM exporter for
ONNX Runtime: GroupQueryAttention, a preallocated KV cache, int4 ``MatMulNBits`` with the tied embedding
stored once) converts ``RUN/student`` (the distilled HF folder); its files run under onnxruntime-genai's own
runtime. Ours are the run's ``onnx/<variant>`` folders under our torch-free runner. For each: MB on disk,
exact match of greedy answers on the first ``--test`` test examples at batch 1, answers identical to our
fp32's, decode ms/token and prefill ms at batch 1 (``distill.evaluate.latency``: the same method for both
runtimes), all on ``--threads`` threads.

Run:  pip install -e ".[bench]"
      python bench/genai_builder.py --run runs/smollm2 --exp car_assistant_smollm2 \\
          --variants fp32 int8_wo int4_qad --out bench/results/genai_builder_smollm2.json

``qad/int4_qad/student`` (a run with ``int4_qad``) is the QAD student baked onto the int4 grid: the
builder's own int4 quantizer (symmetric round to nearest, block 32) finds that grid again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build(student: Path, dest: Path, precision: str, extra: str | None) -> float:
    """Run the builder; returns its seconds."""
    shutil.rmtree(dest, ignore_errors=True)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(student), "-o", str(dest)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(dest.parent / "builder_cache")]
    if extra:
        cmd += ["--extra_options", *extra.split()]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


class GenaiRunner:
    """Greedy generation through onnxruntime-genai's runtime, one prompt at a time (batch 1)."""

    def __init__(self, folder: Path, threads: int):
        import onnxruntime_genai as og

        cfg = json.loads((folder / "genai_config.json").read_text())
        opts = cfg["model"]["decoder"].setdefault("session_options", {})
        opts["intra_op_num_threads"], opts["inter_op_num_threads"] = threads, 1
        (folder / "genai_config.json").write_text(json.dumps(cfg, indent=2))
        self.og, self.model = og, og.Model(str(folder))

    def generate_one(self, prompt, max_new: int, min_new: int = 0) -> list[int]:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            do_sample=False, max_length=len(prompt) + max_new, min_length=len(prompt) + min_new, batch_size=1
        )
        gen = og.Generator(self.model, params)
        gen.append_tokens(list(prompt))
        out = []
        while not gen.is_done() and len(out) < max_new:
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    def generate(self, prompts, max_new: int, stops: set[int]) -> list[list[int]]:
        answers = []
        for p in prompts:
            toks = self.generate_one(p, max_new)
            cut = next((i for i, t in enumerate(toks) if t in stops), len(toks))
            answers.append(toks[:cut])
        return answers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="a finished run folder (student/ and onnx/ inside)")
    ap.add_argument("--exp", default="car_assistant_smollm2", help="the experiment whose data the run used")
    ap.add_argument("--variants", nargs="*", default=["fp32", "int8_wo", "int4_qad"], help="our onnx/<variant>")
    ap.add_argument(
        "--builds",
        nargs="*",
        default=["student:int4", "student:fp32", "qad/int4_qad/student:int4"],
        help="FOLDER:PRECISION pairs the builder converts (FOLDER relative to the run)",
    )
    ap.add_argument("--extra", default=None, help="builder --extra_options, space separated k=v")
    ap.add_argument("--test", type=int, default=150, help="test examples generated at batch 1")
    ap.add_argument("--latency-prompts", type=int, default=8)
    ap.add_argument("--latency-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="then time every row again this many rounds, interleaved (a shared machine drifts; medians compare)",
    )
    ap.add_argument("--label", default="", help="suffix for our rows' names (e.g. the run's settings)")
    ap.add_argument("--genai-runtime", action="store_true", help="also run our files under onnxruntime-genai")
    ap.add_argument("--work", type=Path, default=Path("/tmp/genai_builder"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "genai_builder.json")
    a = ap.parse_args(argv)

    import torch

    from bench.run_data import encoded_splits
    from core.chat import stop_ids
    from core.onnx_files import onnx_bytes
    from distill.evaluate import answer_budget, evaluate_generations, latency, onnx_generate_n
    from export.runtime import OnnxCausalLM

    torch.set_num_threads(a.threads)
    _, tok, enc = encoded_splits(a.run / "student", a.exp, ("test",))
    test = enc["test"][: a.test]
    budget = answer_budget(test)
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in test]
    stops = set(stop_ids(tok))
    results: dict = {"machine": f"{a.threads} threads, batch 1", "test_examples": len(test), "rows": {}}
    if a.out.is_file():  # rows of earlier invocations (other runs, other labels) are kept
        results["rows"] = json.loads(a.out.read_text()).get("rows", {})
    base_answers = None
    timers: dict = {}  # row name -> generate_n function, for the interleaved rounds

    def openvino_loads(model_file: Path) -> bool | str:
        try:
            import openvino

            openvino.Core().read_model(str(model_file))
            return True
        except ImportError:
            return "openvino not installed"
        except Exception as err:  # the frontend's reason, e.g. an op input that must be a constant
            return next((x for x in str(err).splitlines() if "must be" in x or "Conversion" in x), str(err)[:200])

    def record(name: str, row: dict, answers) -> None:
        nonlocal base_answers
        if base_answers is None:
            base_answers = answers
        row["answers_equal_our_fp32"] = sum(x == y for x, y in zip(answers, base_answers, strict=True)) / len(answers)
        results["rows"][name] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "metrics"}), flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=2))

    for v in a.variants:
        folder = a.run / "onnx" / v
        rt = OnnxCausalLM(folder, threads=a.threads)
        t = time.perf_counter()
        s, answers = evaluate_generations(test, lambda p, rt=rt: rt.generate(p, budget, batch_size=1), tok)
        row = {"bytes": onnx_bytes(folder), "exact_match": s["exact_match"], "eval_seconds": time.perf_counter() - t}
        timers[f"ours {v}{a.label}"] = onnx_generate_n(rt)
        row.update(latency(timers[f"ours {v}{a.label}"], prompts[: a.latency_prompts], a.latency_tokens))
        row["openvino_loads"] = openvino_loads(folder / "model.onnx")
        record(f"ours {v}{a.label}", row, answers)
        if a.genai_runtime:  # the same file under onnxruntime-genai's runtime: graph cost vs runner cost
            if not (folder / "genai_config.json").is_file():  # exported before export wrote it
                from transformers import AutoConfig

                from export.onnx import genai_config

                meta = json.loads((folder / "onnx_config.json").read_text())
                cfg = genai_config(meta, AutoConfig.from_pretrained(str(a.run / "student")))
                (folder / "genai_config.json").write_text(json.dumps(cfg, indent=2))
            g = GenaiRunner(folder, a.threads)
            t = time.perf_counter()
            s, answers = evaluate_generations(test, lambda p, g=g: g.generate(p, budget, stops), tok)
            row = {
                "bytes": onnx_bytes(folder),
                "exact_match": s["exact_match"],
                "eval_seconds": time.perf_counter() - t,
            }
            timers[f"ours {v}{a.label} under onnxruntime-genai"] = lambda p, n, g=g: g.generate_one(p, n, n)
            row.update(
                latency(lambda p, n, g=g: g.generate_one(p, n, n), prompts[: a.latency_prompts], a.latency_tokens)
            )
            record(f"ours {v}{a.label} under onnxruntime-genai", row, answers)
    for spec in a.builds:
        source, precision = spec.rsplit(":", 1)
        dest = a.work / f"builder_{source.replace('/', '_')}_{precision}"
        seconds = build(a.run / source, dest, precision, a.extra)
        rt = GenaiRunner(dest, a.threads)
        t = time.perf_counter()
        s, answers = evaluate_generations(test, lambda p, rt=rt: rt.generate(p, budget, stops), tok)
        size = sum(f.stat().st_size for f in dest.glob("*.onnx*"))
        row = {"bytes": size, "exact_match": s["exact_match"], "eval_seconds": time.perf_counter() - t}
        row["build_seconds"] = seconds
        row.update(
            latency(lambda p, n, rt=rt: rt.generate_one(p, n, n), prompts[: a.latency_prompts], a.latency_tokens)
        )
        row["openvino_loads"] = openvino_loads(dest / "model.onnx")
        timers[f"builder {precision} of {source}"] = lambda p, n, rt=rt: rt.generate_one(p, n, n)
        record(f"builder {precision} of {source}", row, answers)
    if a.rounds:
        import statistics

        times: dict = {name: [] for name in timers}
        for _ in range(a.rounds):
            for name, fn in timers.items():
                times[name].append(latency(fn, prompts[: a.latency_prompts], a.latency_tokens)["ms_per_token"])
        for name, ts in times.items():
            results["rows"][name]["interleaved"] = {"rounds": ts, "median": statistics.median(ts), "min": min(ts)}
            print(f"{name:70s} decode ms/token median {statistics.median(ts):.2f}  min {min(ts):.2f}", flush=True)
        a.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
