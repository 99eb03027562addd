"""``run(cfg, run_dir)``: the stages in order, read top to bottom. Hydra-free; callable from notebooks.

Each stage writes one folder with a ``stage.json`` manifest (``distill.stages``); running the same
command again skips every stage whose config, inputs and library versions are unchanged and whose files
are intact, and redoes the rest (a new data hash redoes distillation onward; a new gate threshold redoes
only the gate). ``force=[...]`` reruns named stages. Stage folders under the run folder::

    pruned/      the pruned teacher (student.init=prune), an HF folder
    student/     the distilled student, an HF folder (+ distill_info.json: training history)
    eval/        pytorch/ and onnx_<variant>/ scores
    onnx/        fp32/ (export), fp16/, int8/, int8_static/, int4/ (quantize): plain ONNX folders
    gate/        gate.json: the release verdict
    metrics.json, report.md, plots, manifest.json: rebuilt from the stages on every run

The teacher (bootstrapped), its test answers and its cached top-k signals live in the cache folder
(``teacher.cache_dir``) and are shared by every run and sweep job that uses the same teacher and data.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

from distill.config import ConfigError, RunConfig, to_dict, validate
from distill.report import write_json
from distill.stages import Stages, claim_run_dir, digest, guard
from export.gate import THRESHOLDS as THRESHOLD_KEYS
from export.onnx import onnx_bytes

log = logging.getLogger("distill")
SPLITS = ("train", "validation", "test", "hard")
# TrainConfig knobs that do not change the trained weights: changing them does not redo distillation.
NOT_IN_RESULT = ("log_every", "checkpoint_every", "keep_checkpoints")


def _stage(name: str):
    """Log one line when a step starts and one with its duration when it ends."""

    class _Timer:
        def __enter__(self):
            self.t = time.time()
            log.info("stage %s: start", name)

        def __exit__(self, *exc):
            log.info("stage %s: %s in %.1f s", name, "failed" if exc[0] else "done", time.time() - self.t)

    return _Timer()


def run(cfg, run_dir: str | Path, force: list[str] | tuple[str, ...] | None = None) -> dict:
    """Data -> teacher -> [signals] -> [prune] -> distill -> evaluate -> export -> quantize -> evaluate ONNX
    -> gate -> report; returns the metrics written to metrics.json.

    ``cfg`` is a composed config (DictConfig / dict) or a validated ``RunConfig``. ``force`` (default
    ``cfg.force``) names stages to rerun although their finished output matches.
    """
    rc = cfg if isinstance(cfg, RunConfig) else validate(cfg)
    run_dir = Path(run_dir)

    import torch
    from transformers import AutoTokenizer

    from distill.data import DataError, data_hash, encode_records, load_records
    from distill.models import folder_hash, read_config, vocab_problems
    from distill.report import plot_history, plot_training, plot_variants, render_report
    from distill.teacher import bootstrap_teacher, cache_root
    from distill.trainer import make_accelerator

    claim_run_dir(run_dir, rc.name, is_main=_is_main())
    trackers = list(rc.trackers)
    acc = make_accelerator(rc.distill.train.mixed_precision, run_dir, log_with=trackers or None)
    main = acc.is_main_process
    stages = Stages(force if force is not None else rc.force, is_main=main)
    started = time.time()
    if main:
        (run_dir / "config.yaml").write_text(_yaml(to_dict(rc)))
        _check_space(rc, run_dir)

    with _stage("data"):
        dh = data_hash(rc.data)
        records = {s: load_records(rc.data, s) for s in SPLITS}
        for s in ("train", "test"):
            if not records[s]:
                raise DataError(f"data: the {s} split is empty")
        log.info("data %s: %s", dh, ", ".join(f"{s}={len(records[s])}" for s in SPLITS))

    # ---- teacher: a user's folder (hashed), or the bootstrapped one from the cache ----
    if rc.teacher.path:
        teacher_dir = Path(rc.teacher.path)
        stages.record["teacher"] = {"status": "input", "folder": str(teacher_dir)}
    else:
        from distill.teacher import bootstrap_dir

        dest = bootstrap_dir(rc.teacher, dh)
        st = stages.begin("teacher", dest, dataclasses.asdict(rc.teacher.bootstrap), {"data_hash": dh})
        with guard("teacher", dest):
            teacher_dir = (
                dest
                if st.skipped
                else bootstrap_teacher(
                    rc.teacher,
                    records,
                    dh,
                    rc.eval,
                    accelerator=acc,
                    max_length=rc.data.max_length,
                    force=st.name in stages.force or "all" in stages.force,
                )
            )
            if not st.skipped and main:
                stages.finish(st)
        _sync(acc, st, stages)
    t_cfg = read_config(teacher_dir)
    problems = []
    if rc.student.init == "folder":
        problems += vocab_problems(teacher_dir, rc.student.path, "student.path")
    limit = t_cfg.get("max_position_embeddings")
    if limit and rc.data.max_length > limit:
        problems.append(f"data.max_length={rc.data.max_length} exceeds the teacher's max_position_embeddings={limit}")
    if problems:
        raise ConfigError(problems)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir), trust_remote_code=rc.teacher.trust_remote_code)
    enc = {s: encode_records(tokenizer, records[s], rc.data.max_length, f"data.{s}") for s in SPLITS}
    n_eval = rc.eval.num_test or None
    enc["test"], enc["hard"] = enc["test"][:n_eval], enc["hard"][:n_eval]
    t_hash = folder_hash(teacher_dir)
    stages.record["teacher"]["hash"] = t_hash
    # what the teacher *computes*: its weights, and how they are loaded (8bit / nf4 change its logits)
    t_id = t_hash if rc.teacher.quantization == "none" else f"{t_hash}+{rc.teacher.quantization}"
    teacher = _LazyTeacher(teacher_dir, rc)

    # ---- cached teacher signals (distill.signals=topk), shared by every run on this teacher and data ----
    signals = None
    if rc.distill.signals == "topk":
        signals = _signals_stage(rc, stages, acc, teacher, tokenizer, enc["train"], t_id, dh, cache_root(rc.teacher))

    # ---- prune (student.init=prune) ----
    init_input: dict = {"init": rc.student.init}
    if rc.student.init == "prune":
        st = stages.begin(
            "prune",
            run_dir / "pruned",
            {"prune": dataclasses.asdict(rc.student.prune), "sizes": _student_sizes(rc)},
            {"teacher_hash": t_hash, "data_hash": dh, "max_length": rc.data.max_length},
        )
        if not st.skipped:
            with guard("prune", st.folder):
                _prune_teacher(rc, teacher.get(), teacher_dir, tokenizer, records["train"], run_dir, acc)
                if main:
                    stages.finish(st)
        _sync(acc, st, stages)
        init_input["pruned_hash"] = st.output_hash
    elif rc.student.init == "folder":
        init_input["student_hash"] = folder_hash(rc.student.path)

    # ---- distill ----
    dcfg = dataclasses.asdict(rc.distill)
    for k in NOT_IN_RESULT:
        dcfg["train"].pop(k)
    st = stages.begin(
        "distill",
        run_dir / "student",
        {
            "student": {k: v for k, v in dataclasses.asdict(rc.student).items() if k != "prune"},
            "distill": dcfg,
            "max_length": rc.data.max_length,
            "processes": acc.num_processes,
        },
        {
            "teacher_hash": t_id,
            "data_hash": dh,
            **init_input,
            **({"signals": signals.key} if signals else {}),
        },
    )
    if not st.skipped:
        with guard("distill", st.folder):
            _distill(rc, acc, st, teacher, teacher_dir, tokenizer, enc, run_dir, t_hash, dh, signals)
            if main:
                stages.finish(st)
                import shutil

                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only needed to resume
    _sync(acc, st, stages)
    s_hash = st.output_hash
    info = json.loads((run_dir / "student" / "distill_info.json").read_text())

    metrics: dict = {}
    if main:
        with torch.no_grad():
            scores = _evaluate_stage(rc, stages, run_dir, teacher, tokenizer, enc, t_id, s_hash, dh)
        t_test, s_test = scores["teacher"], scores["student"]
        retention = s_test["exact_match"] / max(t_test["exact_match"], 1e-9)
        t_hard, s_hard = t_test.get("hard", {}), s_test.get("hard", {})
        n_teacher, n_student = t_test["num_params"], s_test["num_params"]
        metrics = {
            "name": rc.name,
            "data_hash": dh,
            "teacher_dir": str(teacher_dir),
            "teacher_hash": t_hash,
            "student_hash": s_hash,
            "teacher": t_test,
            "student": s_test,
            "retention": {
                "exact_match": retention,
                "target": rc.eval.retention_target,
                "met": retention >= rc.eval.retention_target,
                "param_ratio": n_student / n_teacher,
                "hard_exact_match": (s_hard.get("exact_match", 0.0) / max(t_hard.get("exact_match", 0.0), 1e-9))
                if t_hard
                else 0.0,
            },
            "train": {k: v for k, v in info.items() if k != "history"},
        }
        if rc.export.enabled:
            metrics.update(
                ship(rc, stages, run_dir, teacher, tokenizer, enc, t_test, scores["teacher_answers"], s_hash, dh, t_id)
            )
        history = info.get("history", [])
        plots = [
            p.name
            for p in (
                plot_history(history, run_dir / "loss.png", f"{rc.name}: distillation"),
                plot_training(history, run_dir / "training.png", f"{rc.name}: training health"),
            )
            if p
        ]
        if rc.export.enabled:
            plots += [p.name for p in [plot_variants(metrics, run_dir / "variants.png")] if p]
        metrics["stages"] = stages.record
        metrics["seconds"] = time.time() - started
        write_json(run_dir / "metrics.json", metrics)
        (run_dir / "report.md").write_text(render_report(metrics, plots))
        write_json(
            run_dir / "manifest.json",
            {
                "name": rc.name,
                "status": "finished",
                "command": sys.argv,
                "config_hash": digest(to_dict(rc)),
                "data_hash": dh,
                "teacher_dir": str(teacher_dir),
                "teacher_hash": t_hash,
                "student_hash": s_hash,
                "stages": stages.record,
                "versions": stages.versions,
                "processes": acc.num_processes,
                "started": started,
                "finished": time.time(),
            },
        )
        if "gate" in metrics:
            (log.info if metrics["gate"]["passed"] else log.error)("%s", metrics["gate"]["summary"])
        ran = [n for n, r in stages.record.items() if r.get("status") == "ran"]
        log.info(
            "stages run: %s; reused: %s",
            ", ".join(ran) or "none",
            ", ".join(n for n, r in stages.record.items() if r.get("status") == "skipped") or "none",
        )
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


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _sync(acc, st, stages: Stages) -> None:
    """After a stage that the main process finished: every process sees its manifest."""
    acc.wait_for_everyone()
    stages.adopt(st)


class _LazyTeacher:
    """The teacher model, loaded on first use: a rerun whose teacher-using stages are all finished
    never loads its weights."""

    def __init__(self, folder: Path, rc: RunConfig):
        self.folder, self.rc, self.model = folder, rc, None

    def get(self):
        if self.model is None:
            from distill.models import load_causal_lm

            with _stage("load teacher"):
                self.model = load_causal_lm(
                    self.folder, self.rc.teacher.quantization, trust_remote_code=self.rc.teacher.trust_remote_code
                )
        return self.model


def _student_sizes(rc: RunConfig) -> dict:
    s = rc.student
    return {
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


def _check_space(rc: RunConfig, run_dir: Path) -> None:
    """Refuse to start on a disk that cannot hold the run's artifacts (estimated from configs, no weights)."""
    from distill.config import student_plan, teacher_config_dict
    from distill.models import config_param_count, read_config, student_config
    from distill.stages import check_free_space

    t_cfg = teacher_config_dict(rc)
    if t_cfg is None:
        return
    try:
        s = rc.student
        if s.init == "prune":
            sizes = student_plan(rc, t_cfg).shape.as_dict()
        elif s.init == "folder":
            sizes = read_config(s.path)
        else:
            sizes = _student_sizes(rc)
        n = config_param_count(student_config(t_cfg, sizes))
    except Exception as err:  # the estimate is advisory; real problems are reported by their stage
        log.debug("no disk estimate: %s", err)
        return
    copies = (
        1 + (s.init == "prune") + (3 * rc.distill.train.keep_checkpoints if rc.distill.train.checkpoint_every else 0)
    )
    if rc.export.enabled:
        copies += 1 + 0.5 * rc.export.fp16 + 0.3 * len(rc.quantize.variants)
    check_free_space(run_dir, int(n * 4 * copies * 1.2) + (64 << 20), "hydra.run.dir")


def _signals_stage(rc, stages, acc, teacher, tokenizer, train_enc, t_hash, dh, cache: Path):
    from distill.models import building
    from distill.signals import TopKSignals, compute_topk, save_signals, signals_key

    d = rc.distill
    key = signals_key(t_hash, dh, rc.data.max_length, d.topk, d.temperature, len(tokenizer))
    folder = cache / "signals" / digest(key)
    st = stages.begin("signals", folder, {"k": d.topk, "temperature": d.temperature}, key)
    if not st.skipped:
        if acc.is_main_process:
            with guard("signals", folder):
                tensors = compute_topk(
                    teacher.get(), train_enc, tokenizer.pad_token_id, len(tokenizer), d.topk, d.temperature
                )
                with building(folder) as tmp:
                    save_signals(tensors, tmp, key)
                stages.finish(st, {"tokens": int(tensors["offsets"][-1]), "examples": len(train_enc)})
        _sync(acc, st, stages)
    signals = TopKSignals(folder)
    signals.key = st.output_hash
    if len(signals) != len(train_enc):
        raise RuntimeError(f"{folder}: cached signals cover {len(signals)} examples, the data has {len(train_enc)}")
    log.info("teacher signals: top-%d of %d tokens from %s", signals.k, signals.tokens, folder)
    return signals


def _distill(rc, acc, st, teacher, teacher_dir, tokenizer, enc, run_dir, t_hash, dh, signals) -> None:
    from transformers import AutoConfig

    from distill.models import (
        build_from_config,
        config_param_count,
        load_causal_lm,
        read_config,
        save_model_atomically,
        student_config,
    )
    from distill.trainer import apply_lora, gathered_student_state, merge_lora, train

    s = rc.student
    if s.init == "folder":
        student = load_causal_lm(s.path)
    elif s.init == "prune":
        student = load_causal_lm(run_dir / "pruned")
    else:
        student = build_from_config(student_config(read_config(teacher_dir), _student_sizes(rc)), s.seed)
    student.generation_config.pad_token_id = tokenizer.pad_token_id
    student.generation_config.eos_token_id = tokenizer.eos_token_id
    live = signals is None or rc.distill.features.weight > 0 or rc.distill.on_policy.fraction > 0
    t_model = teacher.get() if live else None
    if t_model is not None:
        for pair in rc.distill.features.layer_map:
            n_s, n_t = student.config.num_hidden_layers, t_model.config.num_hidden_layers
            if rc.distill.features.weight > 0 and (pair[0] >= n_s or pair[1] >= n_t):
                raise ConfigError(
                    [f"distill.features.layer_map: {pair} is out of range (student {n_s}, teacher {n_t} layers)"]
                )
    trainable = apply_lora(student, s.lora) if s.lora.enabled else student
    n_teacher = config_param_count(AutoConfig.from_pretrained(str(teacher_dir)))
    n_student = config_param_count(student.config)
    log.info("teacher %d params, student %d params (%.3fx)", n_teacher, n_student, n_student / n_teacher)
    if rc.trackers:
        # "tensorboard" names the folder under the run folder (and MLflow's experiment); the run is rc.name
        acc.init_trackers("tensorboard", config=_flat(to_dict(rc)), init_kwargs={"mlflow": {"run_name": rc.name}})
    result = train(
        trainable,
        tokenizer,
        enc["train"],
        rc.distill.train,
        accelerator=acc,
        teacher=t_model,
        dcfg=rc.distill,
        checkpoint_dir=run_dir / "checkpoints",
        checkpoint_key=st.key,
        val_data=enc["validation"] or None,
        desc="distill",
        log_prefix="distill/",
        signals=None if live else signals,
    )
    student = merge_lora(trainable)
    state = gathered_student_state(acc, result.module)
    if acc.is_main_process:
        save_model_atomically(
            student,
            tokenizer,
            st.folder,
            {
                "distill_info.json": {
                    "teacher": str(teacher_dir),
                    "teacher_hash": t_hash,
                    "data_hash": dh,
                    "steps": rc.distill.train.steps,
                    "signals": rc.distill.signals,
                    "seconds": result.seconds,
                    "skipped_steps": result.skipped_steps,
                    "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
                    "final_loss": result.history[-1]["loss"] if result.history else None,
                    "history": result.history,
                }
            },
            state_dict=state,
        )
    acc.wait_for_everyone()


def _teacher_eval(rc, teacher, tokenizer, enc, t_hash, dh) -> dict:
    """The teacher's test / hard scores and greedy answers, cached per (teacher, data, eval settings):
    every student of a sweep is compared with the same answers without regenerating them."""
    from distill.evaluate import evaluate_model
    from distill.models import building, config_param_count
    from distill.teacher import cache_root

    ev = dict(max_new_tokens=rc.eval.max_new_tokens, batch_size=rc.eval.batch_size)
    key = {"teacher_hash": t_hash, "data_hash": dh, "eval": ev, "n": [len(enc["test"]), len(enc["hard"])]}
    folder = cache_root(rc.teacher) / "teacher_eval" / digest(key)
    path = folder / "scores.json"
    if path.is_file():
        log.info("teacher test answers: reusing %s", folder)
        return json.loads(path.read_text())
    model = teacher.get()
    t_test, t_ans = evaluate_model(model, tokenizer, enc["test"], **ev)
    t_hard, t_hard_ans = evaluate_model(model, tokenizer, enc["hard"], **ev) if enc["hard"] else ({}, None)
    out = {
        "key": key,
        "test": {**t_test, "num_params": config_param_count(model.config), "hard": t_hard},
        "answers": t_ans,
        "hard_answers": t_hard_ans,
    }
    with guard("evaluate", folder):
        with building(folder) as tmp:
            write_json(tmp / "scores.json", out)
    return out


def _evaluate_stage(rc, stages, run_dir, teacher, tokenizer, enc, t_hash, s_hash, dh) -> dict:
    """Teacher and student scores on test / hard (and PyTorch bytes and latency when exporting)."""
    from distill.evaluate import evaluate_model, hf_generate_n, latency
    from distill.models import building, config_param_count, load_causal_lm

    e = rc.export
    st = stages.begin(
        "evaluate",
        run_dir / "eval" / "pytorch",
        {
            "eval": dataclasses.asdict(rc.eval),
            "latency": [e.latency_prompts, e.latency_tokens] if e.enabled else None,
        },
        {"teacher_hash": t_hash, "student_hash": s_hash, "data_hash": dh},
    )
    if st.skipped:
        return json.loads((st.folder / "scores.json").read_text())
    ev = dict(max_new_tokens=rc.eval.max_new_tokens, batch_size=rc.eval.batch_size)
    t = _teacher_eval(rc, teacher, tokenizer, enc, t_hash, dh)
    model = teacher.get()
    # score the artifact we ship, exactly as a user would load it
    student = load_causal_lm(run_dir / "student")
    s_test, _ = evaluate_model(student, tokenizer, enc["test"], teacher=model, teacher_answers=t["answers"], **ev)
    s_hard, _ = (
        evaluate_model(student, tokenizer, enc["hard"], teacher=model, teacher_answers=t["hard_answers"], **ev)
        if enc["hard"]
        else ({}, None)
    )
    scores = {
        "teacher": dict(t["test"]),
        "student": {**s_test, "num_params": config_param_count(student.config), "hard": s_hard},
        "teacher_answers": t["answers"],
    }
    if e.enabled:
        timed = [ex["input_ids"][: ex["prompt_len"]] for ex in enc["test"][: e.latency_prompts]]
        for who, m, folder in (("teacher", model, teacher.folder), ("student", student, run_dir / "student")):
            scores[who].update(
                {
                    "bytes": safetensors_bytes(folder),
                    **latency(hf_generate_n(m, tokenizer.pad_token_id), timed, e.latency_tokens),
                }
            )
    with guard("evaluate", st.folder):
        with building(st.folder) as tmp:
            write_json(tmp / "scores.json", scores)
        stages.finish(st)
    return scores


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _variant_settings(rc: RunConfig, v: str) -> dict:
    q = rc.quantize
    return {
        "int8": dataclasses.asdict(q.int8),
        "int8_static": dataclasses.asdict(q.int8_static),
        "int4": dataclasses.asdict(q.int4),
    }[v]


def build_onnx_variants(
    rc: RunConfig,
    student_dir: Path,
    onnx_dir: Path,
    calibration: list[list[int]],
    stages: Stages,
    inputs: dict,
) -> dict:
    """Export the student (fp32, optionally fp16) and quantize it: variant name -> its finished ``Stage``
    (folder ``onnx_dir/<variant>``, ``output_hash``). Each folder is a stage (``export``, ``export:fp16``,
    ``quantize:<variant>``), skipped when its manifest matches; ``inputs`` identify the student."""
    from export.onnx import export_onnx, to_float16
    from quantize import quantize_int4, quantize_int8_dynamic, quantize_int8_static

    q, e = rc.quantize, rc.export
    out = {}

    def step(name, folder, config, inp, make):
        st = stages.begin(name, folder, config, inp)
        if not st.skipped:
            with guard(name, folder):
                make()
                stages.finish(st)
        return st

    fp32 = step(
        "export",
        onnx_dir / "fp32",
        {"exporter": e.exporter, "opset": e.opset, "verify_atol": e.verify_atol},
        inputs,
        lambda: export_onnx(
            student_dir, onnx_dir / "fp32", opset=e.opset, verify_atol=e.verify_atol, exporter=e.exporter
        ),
    )
    out["fp32"] = fp32
    src = {"fp32_hash": fp32.output_hash}
    if e.fp16:
        out["fp16"] = step(
            "export:fp16", onnx_dir / "fp16", {}, src, lambda: to_float16(fp32.folder, onnx_dir / "fp16")
        )

    def quantize(v: str, dest: Path) -> Path:
        if v == "int8":
            return quantize_int8_dynamic(fp32.folder, dest, per_channel=q.int8.per_channel, embedding=q.int8.embedding)
        if v == "int8_static":
            c = q.int8_static
            return quantize_int8_static(fp32.folder, dest, calibration[: c.calib_examples], per_channel=c.per_channel)
        c = q.int4
        return quantize_int4(
            fp32.folder,
            dest,
            block_size=c.block_size,
            algorithm=c.algorithm,
            symmetric=c.symmetric,
            accuracy_level=c.accuracy_level,
            embedding=c.embedding,
            calibration=calibration[: c.calib_examples],
        )

    for v in q.variants:
        dest = onnx_dir / v
        cfg = _variant_settings(rc, v)
        calibrated = v == "int8_static" or (v == "int4" and q.int4.algorithm == "gptq")
        inp = {**src, **({"calibration": digest(calibration[: cfg["calib_examples"]])} if calibrated else {})}
        out[v] = step(f"quantize:{v}", dest, cfg, inp, lambda v=v, dest=dest: quantize(v, dest))
    return out


def ship(
    rc: RunConfig,
    stages: Stages,
    run_dir: Path,
    teacher,
    tokenizer,
    enc: dict,
    t_test: dict,
    t_ans: list,
    s_hash: str,
    dh: str,
    t_id: str,
) -> dict:
    """Export -> quantize -> evaluate every ONNX variant under ONNX Runtime -> release gate.

    Returns the ``metrics.json`` entries: ``onnx_<variant>`` objects (task metrics against the teacher,
    ``bytes``, ``ms_per_token``, ``prefill_ms``, quantization settings, OpenVINO agreement) and ``gate``."""
    import importlib.util

    import torch

    from distill.evaluate import evaluate_onnx, latency, onnx_generate_n
    from distill.models import building
    from export.gate import evaluate_gate
    from export.runtime import OnnxCausalLM

    ev = dict(max_new_tokens=rc.eval.max_new_tokens, batch_size=rc.eval.batch_size)
    n_calib = max(rc.quantize.int8_static.calib_examples, rc.quantize.int4.calib_examples)
    calibration = [ex["input_ids"] for ex in enc["train"][:n_calib]]
    variants = build_onnx_variants(
        rc, run_dir / "student", run_dir / "onnx", calibration, stages, {"student_hash": s_hash}
    )
    timed = [ex["input_ids"][: ex["prompt_len"]] for ex in enc["test"][: rc.export.latency_prompts]]
    n_tok = rc.export.latency_tokens
    use_ov = bool(rc.export.openvino is True or (rc.export.openvino == "auto" and importlib.util.find_spec("openvino")))
    out: dict = {}
    for v, made in variants.items():
        name, folder = f"onnx_{v}", made.folder
        st = stages.begin(
            f"evaluate:{name}",
            run_dir / "eval" / name,
            {"eval": dataclasses.asdict(rc.eval), "latency": [rc.export.latency_prompts, n_tok], "openvino": use_ov},
            {
                "model_hash": made.output_hash,
                "teacher_hash": t_id,
                "teacher_answers": digest(t_ans),
                "data_hash": dh,
            },
        )
        if st.skipped:
            out[name] = json.loads((st.folder / "scores.json").read_text())
            continue
        with torch.no_grad():
            runner = OnnxCausalLM(folder)
            scores, answers = evaluate_onnx(
                runner, tokenizer, enc["test"], teacher=teacher.get(), teacher_answers=t_ans, **ev
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
        with guard(st.name, st.folder):
            with building(st.folder) as tmp:
                write_json(tmp / "scores.json", scores)
            write_json(folder / "metrics.json", scores)  # the artifact carries its own numbers
            stages.finish(st)
        out[name] = scores
        log.info(
            "onnx %s: exact match %.3f, agreement %.4f, KL %.4f, %.0f bytes, %.2f ms/token",
            v,
            scores["exact_match"],
            scores["agreement"],
            scores["kl"],
            scores["bytes"],
            scores["ms_per_token"],
        )
    g = rc.gate
    thresholds = {k: getattr(g, k) for k in THRESHOLD_KEYS}
    judged = {f"onnx_{v}": out[f"onnx_{v}"] for v in g.variants}
    st = stages.begin(
        "gate",
        run_dir / "gate",
        {"thresholds": thresholds, "variants": list(g.variants)},
        {"teacher": digest(t_test), **{k: digest(v) for k, v in judged.items()}},
    )
    if st.skipped:
        out["gate"] = json.loads((st.folder / "gate.json").read_text())
    else:
        out["gate"] = evaluate_gate(t_test, judged, thresholds).to_dict()
        with guard("gate", st.folder):
            with building(st.folder) as tmp:
                write_json(tmp / "gate.json", out["gate"])
            stages.finish(st)
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
