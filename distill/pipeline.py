"""``run(cfg, run_dir)``: the stages in order, read top to bottom. Hydra-free; callable from notebooks.

Each stage writes one folder with a ``stage.json`` manifest (``distill.manifest``); running the same
command again skips every stage whose config, inputs and library versions are unchanged and whose files
are intact, and redoes the rest (a new data hash redoes distillation onward; a new gate threshold redoes
only the gate). ``force=[...]`` reruns named stages. Stage folders under the run folder::

    pruned/      the pruned teacher (student.init=prune), an HF folder
    student/     the distilled student, an HF folder (+ distill_info.json: training history)
    eval/        pytorch/ and onnx_<variant>/ scores
    onnx/        fp32/ (export), fp16/, int8/, int8_static/, int4/ (quantize): plain ONNX folders
    gate/        gate.json: the release verdict
    metrics.json, report.md, plots, manifest.json: rebuilt from the stages on every run

The teacher (bootstrapped, fine-tuned from ``teacher.path``, or converted from a GGUF file), its test
answers and its cached top-k signals live in the cache folder (``teacher.cache_dir``) and are shared by every run and sweep job that uses the same teacher and data.
Each stage's body is in ``distill.stages``: ``inputs`` (data, teacher, extra pools, signals), ``student``
(prune, distill, QAD), ``measure`` (evaluate), ``ship`` (export, quantize, evaluate ONNX, gate); ``run``
holds the ``Run`` they share. Manifests (skip / redo / refuse) are ``distill.manifest``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from core.files import write_json
from core.hashing import digest, folder_hash
from distill.config import RunConfig, student_plan, student_sizes, teacher_config_dict, to_dict, validate
from distill.manifest import Stages, check_free_space, claim_run_dir
from distill.stages import inputs, measure, ship, student
from distill.stages.measure import MISSES
from distill.stages.run import Run

log = logging.getLogger("distill")


def run(cfg, run_dir: str | Path, force: list[str] | tuple[str, ...] | None = None) -> dict:
    """Data -> teacher -> [signals] -> [prune] -> distill -> evaluate -> export -> quantize -> evaluate ONNX
    -> gate -> report; returns the metrics written to metrics.json.

    ``cfg`` is a composed config (DictConfig / dict) or a validated ``RunConfig``. ``force`` (default
    ``cfg.force``) names stages to rerun although their finished output matches.
    """
    rc = cfg if isinstance(cfg, RunConfig) else validate(cfg)
    r = start(rc, Path(run_dir), force)
    r.data = inputs.load_data(r)
    r.teacher = inputs.teacher(r)
    inputs.augment(r)  # teacher-labelled requests with new open values (distill.augment)
    inputs.general(r)  # general text mixed into KD (distill.general)
    inputs.pool_use(r)  # how much of each pool the steps read (a pool larger than that costs minutes for nothing)
    if rc.distill.signals == "topk":
        r.signals = inputs.signals(r)
    init_input: dict = {"init": rc.student.init}
    if rc.student.init == "prune":
        init_input["pruned_hash"] = student.prune(r).output_hash
    elif rc.student.init == "folder":
        init_input["student_hash"] = folder_hash(rc.student.path)
    r.student = student.distill(r, init_input)
    if rc.export.enabled:
        r.qad = student.quantization_aware(r)  # QAD trains on every process: before the main-only export section
    metrics: dict = {}
    if r.main:
        import torch

        with torch.no_grad():
            scores = measure.evaluate(r)
        info = json.loads((r.dir / "student" / "distill_info.json").read_text())
        metrics = measure.retention_metrics(r, scores, info)
        if rc.export.enabled:
            metrics.update(ship.ship(r, scores["teacher"]))
        report(r, metrics, info)
    r.acc.wait_for_everyone()
    r.acc.end_training()  # also tears down the process group: nothing collective after this
    return metrics


def start(rc: RunConfig, run_dir: Path, force) -> Run:
    """Claim the run folder (before any weights load), make the accelerator, record the resolved config,
    and refuse a disk too small for the run."""
    from distill.train import make_accelerator

    claim_run_dir(run_dir, rc.name, is_main=os.environ.get("RANK", "0") == "0")
    acc = make_accelerator(rc.distill.train.mixed_precision, run_dir, log_with=list(rc.trackers) or None)
    r = Run(rc, run_dir, acc, Stages(force if force is not None else rc.force, is_main=acc.is_main_process))
    t_cfg = teacher_config_dict(rc)
    if rc.student.init == "prune" and t_cfg is not None:  # validated already: this cannot raise PlanError
        r.plan, r.plan_teacher = student_plan(rc, t_cfg), t_cfg
    if r.main:
        (run_dir / "config.yaml").write_text(_yaml(to_dict(rc)))
        check_space(rc, run_dir, t_cfg, r.plan)
    return r


def report(r: Run, metrics: dict, info: dict) -> None:
    """metrics.json, report.md with plots, manifest.json, and the closing log lines."""
    from distill.report import (
        plot_history,
        plot_retention,
        plot_slices,
        plot_training,
        plot_variants,
        render_report,
        shipped,
    )

    rc, stages = r.rc, r.stages
    history = info.get("history", [])
    made = [
        plot_history(history, r.dir / "loss.png", f"{rc.name}: distillation"),
        plot_training(history, r.dir / "training.png", f"{rc.name}: training health"),
        plot_retention(
            history,
            info.get("teacher_val_exact_match"),
            r.dir / "retention.png",
            f"{rc.name}: retention over training",
            info.get("teacher_heldout_exact_match"),
        ),
    ]
    if rc.export.enabled:
        made.append(plot_variants(metrics, r.dir / "variants.png"))
    made.append(plot_slices(metrics, r.dir / "slices.png"))
    metrics["stages"] = stages.record
    metrics["seconds"] = time.time() - r.started
    write_json(r.dir / "metrics.json", metrics)
    variant = shipped(metrics)  # the shipped artifact's misses, else the PyTorch student's
    missed = r.dir / "eval" / (variant or "pytorch") / MISSES
    misses = json.loads(missed.read_text()) if missed.is_file() else {}
    (r.dir / "report.md").write_text(render_report(metrics, [p.name for p in made if p], misses))
    write_json(
        r.dir / "manifest.json",
        {
            "name": rc.name,
            "status": "finished",
            "command": sys.argv,
            "config_hash": digest(to_dict(rc)),
            "data_hash": r.data.hash,
            "teacher_dir": str(r.teacher.dir),
            "teacher_hash": r.teacher.hash,
            "student_hash": r.student.hash,
            "stages": stages.record,
            "versions": stages.versions,
            "processes": r.acc.num_processes,
            "threads": _threads(),  # per process: a parallel launcher (joblib) splits the cores between jobs
            "started": r.started,
            "finished": time.time(),
        },
    )
    if "gate" in metrics:
        (log.info if metrics["gate"]["passed"] else log.error)("%s", metrics["gate"]["summary"])
    by_status = {s: [n for n, rec in stages.record.items() if rec.get("status") == s] for s in ("ran", "skipped")}
    log.info(
        "stages run: %s; reused: %s", ", ".join(by_status["ran"]) or "none", ", ".join(by_status["skipped"]) or "none"
    )
    t, s = metrics["teacher"], metrics["student"]
    log.info(
        "student keeps %.1f%% of the teacher's test exact match (%.3f vs %.3f) at %.3fx the parameters; report: %s",
        100 * metrics["retention"]["exact_match"],
        s["exact_match"],
        t["exact_match"],
        metrics["retention"]["param_ratio"],
        r.dir / "report.md",
    )


def check_space(rc: RunConfig, run_dir: Path, t_cfg: dict | None, plan=None) -> None:
    """Refuse to start on a disk that cannot hold the run's artifacts (estimated from configs, no weights)."""
    from families.hf import config_param_count, read_config, student_config

    if t_cfg is None:
        return
    s = rc.student
    try:
        if s.init == "prune":
            sizes = plan.shape.as_dict()
        elif s.init == "folder":
            sizes = read_config(s.path)
        else:
            sizes = student_sizes(rc)
        n = config_param_count(student_config(t_cfg, sizes))
    except Exception as err:  # the estimate is advisory; real problems are reported by their stage
        log.debug("no disk estimate: %s", err)
        return
    t = rc.distill.train
    copies = 1 + (s.init == "prune") + (3 * t.keep_checkpoints if t.checkpoint_every else 0)
    if rc.export.enabled:
        copies += 1 + 0.5 * rc.export.fp16 + 0.3 * len(rc.quantize.variants)
    check_free_space(run_dir, int(n * 4 * copies * 1.2) + (64 << 20), "hydra.run.dir")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _yaml(d: dict) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(d))
