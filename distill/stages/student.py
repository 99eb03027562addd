"""The student: pruned from the teacher (``student.init=prune``), distilled, and trained on each trained
quantization scheme's grid (quantization-aware distillation).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from pathlib import Path

from core.hashing import flatten
from distill.config import ConfigError, key_settings, student_sizes, to_dict
from distill.manifest import Stage
from distill.stages.run import NOT_IN_RESULT, Run, Student

log = logging.getLogger("distill")


# ---- prune (student.init=prune) ----


def prune(r: Run) -> Stage:
    """Prune the teacher to the plan (importance from training examples) into ``DIR/pruned/``, a plain HF
    folder that distillation starts from."""
    rc = r.rc
    p = rc.student.prune

    def work(st: Stage) -> None:
        from families.hf import load_causal_lm, save_model_atomically
        from prune import prune_model
        from prune.calibration import calibration_batches, sequence_batches

        model = r.teacher.model.get()
        source = model if rc.teacher.quantization == "none" else load_causal_lm(r.teacher.dir)  # full precision
        batches = calibration_batches(
            r.teacher.tokenizer, r.data.records["train"], p.calib_examples, max_length=rc.data.max_length
        )
        batches += sequence_batches(r.teacher.tokenizer.pad_token_id, r.pools.general_sequences[: p.calib_general])
        pruned, report = prune_model(
            source, batches if p.method == "activation" else None, method=p.method, plan=r.plan
        )
        if r.main:
            save_model_atomically(pruned, r.teacher.tokenizer, st.folder, {"prune_report.json": report})
        r.acc.wait_for_everyone()

    return r.stage(
        "prune",
        r.dir / "pruned",
        {"prune": _prune_key(p), "sizes": student_sizes(rc)},
        {
            "teacher_hash": r.teacher.hash,
            "data_hash": r.data.hash,
            "max_length": rc.data.max_length,
            **({"general": r.pools.hashes["general"]} if p.calib_general else {}),
        },
        work,
    )


# ---- distill ----


def distill(r: Run, init_input: dict) -> Student:
    rc = r.rc
    dcfg = key_settings(dataclasses.asdict(rc.distill))
    for k in NOT_IN_RESULT:
        dcfg["train"].pop(k, None)  # (eval_generate at 0 is gone already: key_settings drops neutral knobs)
    config = {
        "student": {k: v for k, v in dataclasses.asdict(rc.student).items() if k != "prune"},
        "distill": dcfg,
        "max_length": rc.data.max_length,
        "processes": r.acc.num_processes,
    }
    inputs = {
        "teacher_hash": r.teacher.id,
        "data_hash": r.data.hash,
        **init_input,
        **({"signals": r.signals.key} if r.signals else {}),
        **{f"{k}_hash": v for k, v in r.pools.hashes.items()},
    }

    def work(st: Stage) -> None:
        _train_student(r, st)

    st = r.stage("distill", r.dir / "student", config, inputs, work)
    if r.main and not st.skipped:
        shutil.rmtree(r.dir / "checkpoints", ignore_errors=True)  # only needed to resume
    return Student(st.folder, st.output_hash)


def kept_channels(pruned: Path) -> list[int]:
    """The teacher's residual channels the pruned student in folder ``pruned`` kept (its prune report)."""
    path = pruned / "prune_report.json"
    kept = json.loads(path.read_text()).get("kept_hidden")
    if kept is None:
        raise ConfigError(
            [
                f"distill.features.projection=channels: {path} has no kept_hidden (pruned by an earlier version); "
                f"delete {path.parent} to prune again, or use projection=learned"
            ]
        )
    return kept


def _train_student(r: Run, st: Stage) -> None:
    from transformers import AutoConfig

    from core.chat import stop_ids
    from distill.train import apply_lora, final_model, make_mode, train
    from families.hf import build_from_config, config_param_count, load_causal_lm, save_model_atomically, student_config

    rc, tok = r.rc, r.teacher.tokenizer
    s, fe = rc.student, rc.distill.features
    channels = kept_channels(r.dir / "pruned") if fe.weight > 0 and fe.projection == "channels" else None
    if s.init == "folder":
        student = load_causal_lm(s.path)
    elif s.init == "prune":
        student = load_causal_lm(r.dir / "pruned")
    else:
        from families.hf import read_config

        student = build_from_config(student_config(read_config(r.teacher.dir), student_sizes(rc)), s.seed)
    student.generation_config.pad_token_id = tok.pad_token_id
    stops = stop_ids(tok)  # the template's end-of-turn token first: what the student learned to end with
    student.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    live = r.signals is None or rc.distill.features.weight > 0 or rc.distill.on_policy.fraction > 0
    t_model = r.teacher.model.get() if live else None
    if t_model is not None:
        for pair in rc.distill.features.layer_map:
            n_s, n_t = student.config.num_hidden_layers, t_model.config.num_hidden_layers
            if rc.distill.features.weight > 0 and (pair[0] >= n_s or pair[1] >= n_t):
                raise ConfigError(
                    [f"distill.features.layer_map: {pair} is out of range (student {n_s}, teacher {n_t} layers)"]
                )
    trainable = apply_lora(student, s.lora) if s.lora.enabled else student
    teacher_val = teacher_held = None
    tc = rc.distill.train
    if tc.eval_generate and tc.eval_every and r.teacher.enc["validation"]:
        from distill.train import generated_exact_match

        # the teacher on the same validation (and heldout) examples: the reference of the retention curves
        teacher_val = generated_exact_match(r.teacher.model.get(), tok, r.teacher.enc["validation"], tc)
        log.info("teacher exact match on the %d probed validation examples: %.3f", tc.eval_generate, teacher_val)
        if r.teacher.enc["heldout"]:
            teacher_held = generated_exact_match(r.teacher.model.get(), tok, r.teacher.enc["heldout"], tc)
            log.info("teacher exact match on the %d probed heldout examples: %.3f", tc.eval_generate, teacher_held)
    n_teacher = config_param_count(AutoConfig.from_pretrained(str(r.teacher.dir)))
    n_student = config_param_count(student.config)
    log.info("teacher %d params, student %d params (%.3fx)", n_teacher, n_student, n_student / n_teacher)
    if rc.trackers:
        # "tensorboard" names the folder under the run folder (and MLflow's experiment); the run is rc.name
        r.acc.init_trackers("tensorboard", config=_flat(to_dict(rc)), init_kwargs={"mlflow": {"run_name": rc.name}})
    result = train(
        trainable,
        tok,
        r.train_data(),
        rc.distill.train,
        accelerator=r.acc,
        mode=make_mode(rc.distill, teacher=t_model, signals=None if live else r.signals, teacher_channels=channels),
        checkpoint_dir=r.dir / "checkpoints",
        checkpoint_key=st.key,
        val_data=r.teacher.enc["validation"] or None,
        heldout_data=r.teacher.enc["heldout"] or None,
        desc="distill",
        log_prefix="distill/",
    )
    student = final_model(r.acc, trainable, result)  # gathered to the main process when sharded
    if result.sharded:
        r.teacher.model.forget()  # its weights were sharded in place; a later stage reloads it whole
    if r.main:
        info = {
            "teacher": str(r.teacher.dir),
            "teacher_hash": r.teacher.hash,
            "data_hash": r.data.hash,
            "steps": rc.distill.train.steps,
            "signals": rc.distill.signals,
            "seconds": result.seconds,
            "skipped_steps": result.skipped_steps,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
            "final_loss": result.history[-1]["loss"] if result.history else None,
            "teacher_val_exact_match": teacher_val,
            "teacher_heldout_exact_match": teacher_held,
            "history": result.history,
        }
        save_model_atomically(student, tok, st.folder, {"distill_info.json": info})
    r.acc.wait_for_everyone()


def _flat(d: dict) -> dict:
    """Nested config -> flat scalar dict for trackers (lists and None as JSON)."""
    return {k: v if isinstance(v, int | float | str | bool) else json.dumps(v) for k, v in flatten(d).items()}


def quantization_aware(r: Run) -> dict[str, Stage]:
    """The QAD stage of every trained scheme in ``quantize.variants``: scheme -> its finished student. Every
    process trains, so this runs before the main-process-only export section (which reads ``r.qad``)."""
    from quantize import SCHEMES

    return {v: qad(r, v, getattr(r.rc.quantize, v)) for v in r.rc.quantize.variants if SCHEMES[v].trained}


def qad(r: Run, name: str, s) -> Stage:
    """Quantization-aware distillation for scheme ``name``: the distilled student, its weights on the
    scheme's int4 grid in every forward (``quantize.fake``: ONNX Runtime's round-to-nearest blocks, straight-
    through gradients), trained ``s.steps`` more steps, then baked onto the grid: ``DIR/qad/<name>/student``,
    a plain HF folder whose float weights are exactly what the int4 file will hold.

    ``s.target``: ``teacher`` trains against the teacher with the distillation's loss (its labels and
    ``kd_weight``); ``student`` against the fp32 student's logits alone (``kd_weight`` 1, no labels: the
    grid learns to be the model it quantizes, as Model Optimizer's QAD does), on the same batches."""
    rc = r.rc
    tc = dataclasses.replace(
        rc.distill.train, steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, eval_every=0, checkpoint_every=0
    )
    # the logit loss (and with ``s.features`` distillation's feature terms at the kept channels, which need no
    # projection; a learned one was not kept); no on-policy sampling: it is slow
    dcfg = dataclasses.replace(
        rc.distill,
        features=rc.distill.features if s.features else dataclasses.replace(rc.distill.features, weight=0.0),
        on_policy=dataclasses.replace(rc.distill.on_policy, fraction=0.0),
        train=tc,
        **({"kd_weight": 1.0} if s.target == "student" else {}),
    )
    tied = json.loads((r.dir / "student" / "config.json").read_text()).get("tie_word_embeddings", False)
    config = {  # a tied embedding trains on the grid either way: ``embedding`` changes training only when untied
        "grid": {"bits": 4, "block_size": s.block_size, "symmetric": True, "embedding": s.embedding and not tied},
        "train": key_settings(dataclasses.asdict(dcfg)),
        **({"target": s.target} if s.target != "teacher" else {}),  # (earlier QAD stages keep their key)
        "max_length": rc.data.max_length,
        "processes": r.acc.num_processes,
    }
    inputs = {
        "student_hash": r.student.hash,
        "teacher_hash": r.teacher.id,
        "data_hash": r.data.hash,
        **{f"{k}_hash": v for k, v in r.pools.hashes.items()},
    }

    def work(st: Stage) -> None:
        from distill.train import final_model, make_mode, train
        from families.hf import load_causal_lm, save_model_atomically
        from quantize import fake

        student = load_causal_lm(r.dir / "student")
        if s.target == "student":  # the fp32 student it starts from, frozen, is the one signal
            mode = make_mode(dcfg, teacher=copy.deepcopy(student).eval().requires_grad_(False))
        elif r.signals is None or s.features:
            channels = kept_channels(r.dir / "pruned") if s.features else None
            mode = make_mode(dcfg, teacher=r.teacher.model.get(), teacher_channels=channels)
        else:
            mode = make_mode(dcfg, signals=r.signals)
        names = fake.attach(student, bits=4, block=s.block_size, embedding=s.embedding)
        result = train(
            student,
            r.teacher.tokenizer,
            r.train_data(),
            tc,
            accelerator=r.acc,
            mode=mode,
            desc=f"qad:{name}",
            log_prefix=f"qad_{name}/",
        )
        student = final_model(r.acc, student, result)
        if r.main:
            written = fake.bake(student)
            summary = {
                "steps": tc.steps,
                "lr": tc.lr,
                "seconds": result.seconds,
                "tokens": result.tokens,
                "modules": len(names),
                "tensors": written,
                "final_loss": result.history[-1]["loss"] if result.history else None,
            }
            info = {"summary": summary, "grid": config["grid"], "modules": names, "history": result.history}
            save_model_atomically(student, r.teacher.tokenizer, st.folder, {"qad_info.json": info})
            log.info(
                "QAD %s: %d steps in %.0f s, %d weight tensors on the int4 grid",
                name,
                tc.steps,
                result.seconds,
                written,
            )
        r.acc.wait_for_everyone()

    return r.stage(f"qad:{name}", r.dir / "qad" / name / "student", config, inputs, work)


def _prune_key(p) -> dict:
    """The prune settings a stage key hashes: ``depth`` and ``hidden_fraction`` at null are left out, so runs
    pruned before those knobs existed keep their keys (``key_settings`` would also drop ``calib_general: 0``,
    which their keys hold)."""
    d = dataclasses.asdict(p)
    for knob in ("depth", "hidden_fraction"):
        if d.get(knob) is None:
            d.pop(knob, None)
    return d
