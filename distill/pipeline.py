"""``run(cfg, run_dir)``: the stages in order, read top to bottom. Hydra-free; callable from notebooks."""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

from distill.config import ConfigError, RunConfig, to_dict, validate
from export.gate import THRESHOLDS as THRESHOLD_KEYS
from export.onnx import onnx_bytes

log = logging.getLogger("distill")
SPLITS = ("train", "validation", "test", "hard")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "accelerate", "peft", "tokenizers", "bitsandbytes", "onnx", "onnxruntime"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _stage(name: str):
    """Log one line when a stage starts and one with its duration when it ends."""

    class _Timer:
        def __enter__(self):
            self.t = time.time()
            log.info("stage %s: start", name)

        def __exit__(self, *exc):
            log.info("stage %s: %s in %.1f s", name, "failed" if exc[0] else "done", time.time() - self.t)

    return _Timer()


def run(cfg, run_dir: str | Path) -> dict:
    """Teacher -> student -> distillation -> evaluation; returns the metrics written to metrics.json.

    ``cfg`` is a composed config (DictConfig / dict) or a validated ``RunConfig``.
    """
    rc = cfg if isinstance(cfg, RunConfig) else validate(cfg)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import AutoTokenizer

    from distill.data import DataError, data_hash, encode_records, load_records
    from distill.evaluate import evaluate_model
    from distill.models import (
        build_from_config,
        config_param_count,
        folder_hash,
        load_causal_lm,
        read_config,
        save_model_atomically,
        student_config,
        vocab_problems,
    )
    from distill.report import plot_history, plot_variants, render_report, write_json
    from distill.teacher import bootstrap_teacher
    from distill.trainer import apply_lora, gathered_student_state, make_accelerator, merge_lora, train

    acc = make_accelerator(rc.distill.train.mixed_precision, run_dir, log_with="tensorboard")
    started = time.time()
    if acc.is_main_process:
        (run_dir / "config.yaml").write_text(_yaml(to_dict(rc)))

    with _stage("data"):
        dh = data_hash(rc.data)
        records = {s: load_records(rc.data, s) for s in SPLITS}
        for s in ("train", "test"):
            if not records[s]:
                raise DataError(f"data: the {s} split is empty")
        log.info("data %s: %s", dh, ", ".join(f"{s}={len(records[s])}" for s in SPLITS))

    with _stage("teacher"):
        teacher_dir = (
            Path(rc.teacher.path)
            if rc.teacher.path
            else bootstrap_teacher(rc.teacher, records, dh, rc.eval, accelerator=acc, max_length=rc.data.max_length)
        )
        t_cfg = read_config(teacher_dir)
        problems = []
        if rc.student.init == "folder":
            problems += vocab_problems(teacher_dir, rc.student.path, "student.path")
        limit = t_cfg.get("max_position_embeddings")
        if limit and rc.data.max_length > limit:
            problems.append(
                f"data.max_length={rc.data.max_length} exceeds the teacher's max_position_embeddings={limit}"
            )
        if problems:
            raise ConfigError(problems)
        tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
        enc = {s: encode_records(tokenizer, records[s], rc.data.max_length, f"data.{s}") for s in SPLITS}
        n_eval = rc.eval.num_test or None
        enc["test"], enc["hard"] = enc["test"][:n_eval], enc["hard"][:n_eval]
        teacher = load_causal_lm(teacher_dir, rc.teacher.quantization)
        t_hash = folder_hash(teacher_dir)

    with _stage("student"):
        s = rc.student
        if s.init == "folder":
            student = load_causal_lm(s.path)
        elif s.init == "prune":
            student = _prune_teacher(rc, teacher, teacher_dir, tokenizer, records["train"], run_dir, acc)
        else:
            sizes = {
                k: getattr(s, k)
                for k in (
                    "hidden_size",
                    "intermediate_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "tie_word_embeddings",
                )
            }
            student = build_from_config(student_config(t_cfg, sizes), s.seed)
        student.generation_config.pad_token_id = tokenizer.pad_token_id
        student.generation_config.eos_token_id = tokenizer.eos_token_id
        for pair in rc.distill.features.layer_map:
            n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
            if rc.distill.features.weight > 0 and (pair[0] >= n_s or pair[1] >= n_t):
                raise ConfigError(
                    [f"distill.features.layer_map: {pair} is out of range (student {n_s}, teacher {n_t} layers)"]
                )
        trainable = apply_lora(student, s.lora) if s.lora.enabled else student
        n_teacher, n_student = config_param_count(teacher.config), config_param_count(student.config)
        log.info("teacher %d params, student %d params (%.3fx)", n_teacher, n_student, n_student / n_teacher)

    with _stage("distill"):
        acc.init_trackers("tensorboard", config=_flat(to_dict(rc)))
        result = train(
            trainable,
            tokenizer,
            enc["train"],
            rc.distill.train,
            accelerator=acc,
            teacher=teacher,
            dcfg=rc.distill,
            checkpoint_dir=run_dir / "checkpoints",
            val_data=enc["validation"] or None,
            desc="distill",
            log_prefix="distill/",
        )
        student = merge_lora(trainable)
        state = gathered_student_state(acc, result.module)
        if acc.is_main_process:
            save_model_atomically(
                student,
                tokenizer,
                run_dir / "student",
                {
                    "distill_info.json": {
                        "teacher": str(teacher_dir),
                        "teacher_hash": t_hash,
                        "data_hash": dh,
                        "steps": rc.distill.train.steps,
                    }
                },
                state_dict=state,
            )
        acc.wait_for_everyone()
        del result.module, student, trainable

    metrics: dict = {}
    if acc.is_main_process:
        with _stage("evaluate"), torch.no_grad():
            # score the artifact we ship, exactly as a user would load it
            student = load_causal_lm(run_dir / "student")
            ev = dict(max_new_tokens=rc.eval.max_new_tokens, batch_size=rc.eval.batch_size)
            t_test, t_ans = evaluate_model(teacher, tokenizer, enc["test"], **ev)
            t_hard, t_hard_ans = evaluate_model(teacher, tokenizer, enc["hard"], **ev) if enc["hard"] else ({}, None)
            s_test, _ = evaluate_model(student, tokenizer, enc["test"], teacher=teacher, teacher_answers=t_ans, **ev)
            s_hard, _ = (
                evaluate_model(student, tokenizer, enc["hard"], teacher=teacher, teacher_answers=t_hard_ans, **ev)
                if enc["hard"]
                else ({}, None)
            )
        retention = s_test["exact_match"] / max(t_test["exact_match"], 1e-9)
        metrics = {
            "name": rc.name,
            "data_hash": dh,
            "teacher_dir": str(teacher_dir),
            "teacher_hash": t_hash,
            "teacher": {**t_test, "num_params": n_teacher, "hard": t_hard},
            "student": {**s_test, "num_params": n_student, "hard": s_hard},
            "retention": {
                "exact_match": retention,
                "target": rc.eval.retention_target,
                "met": retention >= rc.eval.retention_target,
                "param_ratio": n_student / n_teacher,
                "hard_exact_match": (s_hard.get("exact_match", 0.0) / max(t_hard.get("exact_match", 0.0), 1e-9))
                if t_hard
                else 0.0,
            },
            "train": {
                "steps": rc.distill.train.steps,
                "seconds": result.seconds,
                "skipped_steps": result.skipped_steps,
                "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
                "final_loss": result.history[-1]["loss"] if result.history else None,
            },
            "seconds": time.time() - started,
        }
        if rc.export.enabled:
            shipped = ship(rc, run_dir, teacher, teacher_dir, tokenizer, enc, t_test, t_ans, records["train"])
            for who in ("teacher", "student"):
                metrics[who].update(shipped.pop(who))  # bytes on disk and PyTorch latency
            metrics.update(shipped)
        plots = [p.name for p in [plot_history(result.history, run_dir / "loss.png", f"{rc.name}: distillation")] if p]
        if rc.export.enabled:
            plots += [p.name for p in [plot_variants(metrics, run_dir / "variants.png")] if p]
        write_json(run_dir / "metrics.json", metrics)
        write_json(
            run_dir / "manifest.json",
            {
                "name": rc.name,
                "command": sys.argv,
                "data_hash": dh,
                "teacher_dir": str(teacher_dir),
                "teacher_hash": t_hash,
                "student_hash": folder_hash(run_dir / "student"),
                "versions": _versions(),
                "processes": acc.num_processes,
                "started": started,
                "finished": time.time(),
            },
        )
        (run_dir / "report.md").write_text(render_report(metrics, plots))
        if "gate" in metrics:
            (log.info if metrics["gate"]["passed"] else log.error)("%s", metrics["gate"]["summary"])
        log.info(
            "student keeps %.1f%% of the teacher's test exact match (%.3f vs %.3f) at %.3fx the parameters; report: %s",
            100 * retention,
            s_test["exact_match"],
            t_test["exact_match"],
            n_student / n_teacher,
            run_dir / "report.md",
        )
    acc.wait_for_everyone()
    acc.end_training()  # also tears down the process group: nothing collective after this
    return metrics


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def build_onnx_variants(
    rc: RunConfig, student_dir: Path, onnx_dir: Path, calibration: list[list[int]]
) -> dict[str, Path]:
    """Export the student (fp32, optionally fp16) and quantize it: variant name -> folder under ``onnx_dir``."""
    from export.onnx import export_onnx, to_float16
    from quantize import quantize_int4, quantize_int8_dynamic, quantize_int8_static

    q = rc.quantize
    out = {}
    with _stage("export"):
        out["fp32"] = export_onnx(
            student_dir,
            onnx_dir / "fp32",
            opset=rc.export.opset,
            verify_atol=rc.export.verify_atol,
            exporter=rc.export.exporter,
        )
        if rc.export.fp16:
            out["fp16"] = to_float16(out["fp32"], onnx_dir / "fp16")
    with _stage("quantize"):
        for v in q.variants:
            dest = onnx_dir / v
            if v == "int8":
                out[v] = quantize_int8_dynamic(
                    out["fp32"], dest, per_channel=q.int8.per_channel, embedding=q.int8.embedding
                )
            elif v == "int8_static":
                out[v] = quantize_int8_static(
                    out["fp32"],
                    dest,
                    calibration[: q.int8_static.calib_examples],
                    per_channel=q.int8_static.per_channel,
                )
            elif v == "int4":
                c = q.int4
                out[v] = quantize_int4(
                    out["fp32"],
                    dest,
                    block_size=c.block_size,
                    algorithm=c.algorithm,
                    symmetric=c.symmetric,
                    accuracy_level=c.accuracy_level,
                    embedding=c.embedding,
                    calibration=calibration[: c.calib_examples],
                )
    return out


def ship(
    rc: RunConfig, run_dir: Path, teacher, teacher_dir: Path, tokenizer, enc: dict, t_test: dict, t_ans, train_records
) -> dict:
    """Export -> quantize -> evaluate every ONNX variant under ONNX Runtime -> release gate.

    Returns the ``metrics.json`` entries: ``onnx_<variant>`` objects (task metrics against the teacher,
    ``bytes``, ``ms_per_token``, ``prefill_ms``, quantization settings, OpenVINO agreement), latency of the
    PyTorch teacher and student, and ``gate``."""
    import importlib.util

    import torch

    from distill.evaluate import evaluate_onnx, hf_generate_n, latency, onnx_generate_n
    from distill.models import load_causal_lm
    from distill.report import write_json
    from export.gate import evaluate_gate
    from export.runtime import OnnxCausalLM

    ev = dict(max_new_tokens=rc.eval.max_new_tokens, batch_size=rc.eval.batch_size)
    calibration = [ex["input_ids"] for ex in _calibration_examples(rc, tokenizer, train_records)]
    variants = build_onnx_variants(rc, run_dir / "student", run_dir / "onnx", calibration)
    timed = [ex["input_ids"][: ex["prompt_len"]] for ex in enc["test"][: rc.export.latency_prompts]]
    n_tok = rc.export.latency_tokens
    use_ov = rc.export.openvino is True or (rc.export.openvino == "auto" and importlib.util.find_spec("openvino"))
    out: dict = {}
    with _stage("evaluate onnx"), torch.no_grad():
        student = load_causal_lm(run_dir / "student")
        for who, model, folder in (("teacher", teacher, teacher_dir), ("student", student, run_dir / "student")):
            out[who] = {
                "bytes": safetensors_bytes(folder),
                **latency(hf_generate_n(model, tokenizer.pad_token_id), timed, n_tok),
            }
        for v, folder in variants.items():
            runner = OnnxCausalLM(folder)
            scores, answers = evaluate_onnx(
                runner, tokenizer, enc["test"], teacher=teacher, teacher_answers=t_ans, **ev
            )
            scores.update(latency(onnx_generate_n(runner), timed, n_tok))
            scores["bytes"] = onnx_bytes(folder)
            qinfo = folder / "quantization.json"
            if qinfo.is_file():
                scores["quantization"] = json.loads(qinfo.read_text())["settings"]
            if use_ov:
                scores["openvino"] = cross_runtime(
                    folder, runner, answers, enc["test"], rc.eval.max_new_tokens, rc.eval.batch_size
                )
            out[f"onnx_{v}"] = scores
            write_json(folder / "metrics.json", scores)  # the artifact carries its own numbers
            log.info(
                "onnx %s: exact match %.3f, agreement %.4f, KL %.4f, %.0f bytes, %.2f ms/token",
                v,
                scores["exact_match"],
                scores["agreement"],
                scores["kl"],
                scores["bytes"],
                scores["ms_per_token"],
            )
    with _stage("gate"):
        g = rc.gate
        thresholds = {k: getattr(g, k) for k in THRESHOLD_KEYS}
        result = evaluate_gate(t_test, {f"onnx_{v}": out[f"onnx_{v}"] for v in g.variants}, thresholds)
        out["gate"] = result.to_dict()
    return out


def cross_runtime(folder: Path, runner, answers, data: list[dict], max_new_tokens: int, batch_size: int) -> dict:
    """The same ONNX file under OpenVINO (CPU, f32 precision hint): share of greedy answers identical to
    ONNX Runtime's, argmax agreement and largest logit difference on the reference sequences."""
    import numpy as np

    from export.runtime import OnnxCausalLM

    try:
        ov = OnnxCausalLM(folder, backend="openvino")
    except Exception as err:  # an op OpenVINO's ONNX frontend lacks: report, do not fail the run
        log.warning("openvino could not load %s: %s", folder, err)
        return {"error": str(err).splitlines()[0][:300]}
    prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in data]
    ov_answers = ov.generate(prompts, max_new_tokens, batch_size=batch_size)
    seqs = [ex["input_ids"] for ex in data]
    a, b = runner.sequence_logits(seqs, batch_size), ov.sequence_logits(seqs, batch_size)
    agree = np.mean(np.concatenate([x.argmax(-1) == y.argmax(-1) for x, y in zip(a, b, strict=True)]))
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))
    return {
        "generation_match": sum(x == y for x, y in zip(answers, ov_answers, strict=True)) / max(len(answers), 1),
        "argmax_agreement": float(agree),
        "max_logit_diff": diff,
    }


def _calibration_examples(rc: RunConfig, tokenizer, train_records) -> list[dict]:
    from distill.data import encode_records

    n = max(rc.quantize.int8_static.calib_examples, rc.quantize.int4.calib_examples)
    return encode_records(tokenizer, train_records[:n], rc.data.max_length, "data.train")


def _prune_teacher(rc: RunConfig, teacher, teacher_dir: Path, tokenizer, train_records, run_dir: Path, acc):
    """Prune the teacher to the student's plan (importance from training examples); the pruned model is
    also saved as ``DIR/pruned/`` (a plain HF folder) before recovery distillation."""
    from distill.config import student_plan
    from distill.models import load_causal_lm, save_model_atomically
    from prune import prune_model
    from prune.__main__ import calibration_batches

    p = rc.student.prune
    plan = student_plan(rc, teacher.config.to_dict())
    for r in plan.reasons:
        log.info("prune plan: %s", r)
    source = teacher if rc.teacher.quantization == "none" else load_causal_lm(teacher_dir)  # full precision
    batches = calibration_batches(tokenizer, train_records, p.calib_examples, max_length=rc.data.max_length)
    pruned, report = prune_model(
        source,
        batches if p.method == "activation" else None,
        method=p.method,
        sizes=plan.shape.as_dict(),
        align=p.align,
    )
    report["reasons"] = plan.reasons
    if acc.is_main_process:
        save_model_atomically(pruned, tokenizer, run_dir / "pruned", {"prune_report.json": report})
    acc.wait_for_everyone()
    return pruned


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, int | float | str | bool):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


def _yaml(d: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(d))
