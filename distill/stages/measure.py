"""Evaluation (main process only): teacher and student on the test and heldout splits, the students'
misses beside the teacher's answers, and the retention metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from core.files import building, write_json
from core.hashing import digest
from distill.config import RunConfig
from distill.manifest import Stage, guard
from distill.stages.run import EVAL_SPLITS, Run

log = logging.getLogger("distill")


# ---- evaluate (main process only from here on) ----


def eval_settings(rc: RunConfig) -> dict:
    from distill.evaluate import eval_settings

    return eval_settings(rc.eval)


def _teacher_own_eval(r: Run, split: str):
    """(scores, answers) the teacher stage measured on exactly these ``split`` examples with these eval
    settings (a bootstrapped or fine-tuned teacher's folder carries its test evaluation), or None."""
    from safetensors.torch import load_file

    from distill.evaluate import OWN_EVAL, OWN_TOPK, TopK, split_key

    own = r.teacher.dir / OWN_EVAL
    if split != "test" or r.teacher.id != r.teacher.hash or not own.is_file():
        return None  # measured on the float weights: a teacher loaded in 8bit / nf4 is evaluated again
    saved = json.loads(own.read_text())
    if saved.get("key") != split_key(r.teacher.enc[split], r.rc.eval):
        return None
    scores = dict(saved["scores"])
    if r.rc.eval.kl_topk:
        scores["signals"] = TopK(**load_file(str(r.teacher.dir / OWN_TOPK)))
    log.info("teacher %s answers: measured by the teacher stage (%s)", split, own)
    return scores, saved["answers"]


def teacher_answers(r: Run) -> dict:
    """The teacher's test / heldout scores and greedy answers, and with ``eval.kl_topk`` its top-k log-probs
    at every answer position (``TopK``, under ``signals``), cached per (teacher, data, eval settings):
    every student of a sweep, and every ONNX variant, is compared with them without another teacher pass."""
    from core.cache import claimed
    from distill.evaluate import topk_key
    from distill.teacher import cache_root

    ev, enc, k = eval_settings(r.rc), r.teacher.enc, r.rc.eval.kl_topk
    key = {
        "teacher_hash": r.teacher.id,
        "data_hash": r.data.hash,
        "eval": ev,
        "n": [len(enc["test"]), len(enc["heldout"])],
        **topk_key(k),
    }
    folder = cache_root(r.rc.teacher) / "teacher_eval" / digest(key)
    with claimed(folder, "teacher test answers"):  # one job of a sweep computes them, the others wait
        return _teacher_answers(r, key, folder)


def _teacher_answers(r: Run, key: dict, folder: Path) -> dict:
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from distill.evaluate import TopK, evaluate_model
    from families.hf import config_param_count

    ev, enc, k = eval_settings(r.rc), r.teacher.enc, r.rc.eval.kl_topk
    path = folder / "scores.json"
    splits = [s for s in EVAL_SPLITS if enc[s]]
    if path.is_file():
        log.info("teacher test answers: reusing %s", folder)
        out = json.loads(path.read_text())
        if k:
            out["signals"] = {s: TopK(**load_file(str(folder / f"topk_{s}.safetensors"))) for s in splits}
        return out
    res = {
        s: _teacher_own_eval(r, s)
        or evaluate_model(r.teacher.model.get(), r.teacher.tokenizer, enc[s], keep_topk=k, **ev)
        for s in splits
    }
    signals = {s: res[s][0].pop("signals", None) for s in splits}
    t_test, t_ans = res["test"]
    t_held, t_held_ans = res.get("heldout", ({}, None))
    out = {
        "key": key,
        "test": {
            **t_test,
            "num_params": config_param_count(
                AutoConfig.from_pretrained(str(r.teacher.dir), trust_remote_code=r.rc.teacher.trust_remote_code)
            ),
            "heldout": t_held,
        },
        "answers": t_ans,
        "heldout_answers": t_held_ans,
    }
    with guard("evaluate", folder):
        with building(folder) as tmp:
            write_json(tmp / "scores.json", out)
            for s in splits if k else ():
                save_file(signals[s].tensors(), str(tmp / f"topk_{s}.safetensors"))
    return {**out, "signals": signals} if k else out


def teacher_reference(r: Run, t: dict, split: str):
    """What a model is compared with on ``split``: the teacher's cached ``TopK`` signals (``eval.kl_topk``)
    or, with ``eval.kl_topk: 0``, the teacher model itself (exact KL, one teacher pass per model)."""
    return t["signals"][split] if r.rc.eval.kl_topk else r.teacher.model.get()


def evaluate(r: Run) -> dict:
    """Teacher and student scores on test / heldout (and PyTorch bytes and latency when exporting: stage
    ``evaluate:latency`` of its own, so a run exported after an export-off run keeps its evaluation); the student's
    misses beside the teacher's answers in ``misses.json``."""
    e = r.rc.export
    scores: dict = {}

    def work(st: Stage) -> None:
        got, missed = _evaluate_student(r)
        scores.update(got)
        with building(st.folder) as tmp:
            write_json(tmp / "scores.json", scores)
            write_json(tmp / MISSES, missed)

    st = r.stage(
        "evaluate",
        r.dir / "eval" / "pytorch",
        {"eval": dataclasses.asdict(r.rc.eval), "latency": None},  # None: the key export-off runs had before
        {"teacher_hash": r.teacher.id, "student_hash": r.student.hash, "data_hash": r.data.hash},
        work,
        on="main-only",
    )
    scores = scores or json.loads((st.folder / "scores.json").read_text())
    if e.enabled:
        for who, got in pytorch_latency(r).items():
            scores[who].update(got)
    return scores


def pytorch_latency(r: Run) -> dict:
    """Teacher and student under PyTorch at batch 1: bytes of weights, prefill and per-token decode times on
    the first ``export.latency_prompts`` test prompts (the baseline the ONNX files are compared with)."""
    e, out = r.rc.export, {}

    def work(st: Stage) -> None:
        from distill.evaluate import hf_generate_n, latency
        from families.hf import load_causal_lm

        enc, tok = r.teacher.enc, r.teacher.tokenizer
        timed_prompts = [ex["input_ids"][: ex["prompt_len"]] for ex in enc["test"][: e.latency_prompts]]
        student = load_causal_lm(r.dir / "student")
        for who, m, folder in (
            ("teacher", r.teacher.model.get(), r.teacher.dir),
            ("student", student, r.dir / "student"),
        ):
            gen = hf_generate_n(m, tok.pad_token_id)
            out[who] = {"bytes": safetensors_bytes(folder), **latency(gen, timed_prompts, e.latency_tokens)}
        with building(st.folder) as tmp:
            write_json(tmp / "latency.json", out)

    st = r.stage(
        "evaluate:latency",
        r.dir / "eval" / "pytorch_latency",
        {"prompts": e.latency_prompts, "tokens": e.latency_tokens},
        {"teacher_hash": r.teacher.id, "student_hash": r.student.hash, "data_hash": r.data.hash},
        work,
        on="main-only",
    )
    return out or json.loads((st.folder / "latency.json").read_text())


MISSES = "misses.json"  # in each evaluation folder: the examples the model got wrong, beside the teacher's answers


def _evaluate_student(r: Run) -> tuple[dict, dict]:
    from distill.evaluate import evaluate_model
    from families.hf import config_param_count, load_causal_lm

    ev, enc, tok = eval_settings(r.rc), r.teacher.enc, r.teacher.tokenizer
    t = teacher_answers(r)
    student = load_causal_lm(r.dir / "student")  # score the artifact we ship, exactly as a user would load it
    got, missed = {}, {}
    for split in EVAL_SPLITS:
        if not enc[split]:
            continue
        t_ans = teacher_split_answers(t, split)
        got[split], answers = evaluate_model(
            student, tok, enc[split], teacher=teacher_reference(r, t, split), teacher_answers=t_ans, **ev
        )
        missed[split] = misses(tok, enc[split], answers, t_ans)
    scores = {
        "teacher": dict(t["test"]),
        "student": {**got["test"], "num_params": config_param_count(student.config), "heldout": got.get("heldout", {})},
        "teacher_answers": t["answers"],
    }
    return scores, missed


def teacher_split_answers(t: dict, split: str) -> list[list[int]]:
    """The teacher's greedy answers on ``split`` from ``teacher_answers``' record."""
    return t["answers"] if split == "test" else t["heldout_answers"]


def misses(tok, data: list[dict], answers: list[list[int]], t_answers: list[list[int]]) -> list[dict]:
    """The examples whose answer is not the reference (as ``distill.metrics.score`` judges exact match),
    each with the request, reference, the model's and the teacher's answers and the example's tags."""
    from distill.metrics import is_exact

    out = []
    for ex, a, ta in zip(data, answers, t_answers, strict=True):
        text = tok.decode(a, skip_special_tokens=True)
        fmt = ex.get("format", "json")
        if is_exact(text, ex["answer"], fmt):
            continue
        teacher = tok.decode(ta, skip_special_tokens=True)
        out.append(
            {
                "request": ex.get("request", ""),
                "reference": ex["answer"],
                "answer": text,
                "teacher": teacher,
                "teacher_right": is_exact(teacher, ex["answer"], fmt),
                **ex.get("tags", {}),
            }
        )
    return out


def safetensors_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def retention_metrics(r: Run, scores: dict, info: dict) -> dict:
    """metrics.json's core: teacher and student scores, retention, training summary (``info``: the
    student's distill_info.json)."""
    from distill.metrics import slice_retention

    t_test, s_test = scores["teacher"], scores["student"]
    t_held, s_held = t_test.get("heldout", {}), s_test.get("heldout", {})
    return {
        "name": r.rc.name,
        "data_hash": r.data.hash,
        "teacher_dir": str(r.teacher.dir),
        "teacher_hash": r.teacher.hash,
        "student_hash": r.student.hash,
        "teacher": t_test,
        "student": s_test,
        "retention": {
            "exact_match": (ret := s_test["exact_match"] / max(t_test["exact_match"], 1e-9)),
            "target": r.rc.eval.retention_target,
            "met": ret >= r.rc.eval.retention_target,
            "param_ratio": s_test["num_params"] / t_test["num_params"],
            "heldout_exact_match": (s_held.get("exact_match", 0.0) / max(t_held.get("exact_match", 0.0), 1e-9))
            if t_held
            else None,
            "heldout_parts": slice_retention(s_held, t_held, "part") if t_held else {},
        },
        "train": {k: v for k, v in info.items() if k != "history"},
        **({"train_data": {"task": len(r.teacher.enc["train"]), **r.pools.info}} if r.pools.info else {}),
    }
