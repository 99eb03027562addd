"""One run: its config, folder, process group and stage records (``Run``), and ``Run.stage``, through which
every stage goes: begin (skip when the finished folder's manifest matches), the work inside ``guard``
(disk-full and permission errors become one clear error), the manifest written last by the main process,
and every process seeing it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.config import RunConfig
from distill.manifest import Stage, Stages, guard

log = logging.getLogger("distill")


SPLITS = ("train", "validation", "test", "heldout")
EVAL_SPLITS = ("test", "heldout")  # scored and gated: in distribution, and unlike training
# TrainConfig knobs that do not change the trained weights: changing them does not redo distillation.
NOT_IN_RESULT = ("log_every", "checkpoint_every", "keep_checkpoints", "eval_generate")


class timed:
    """Log one line when a step starts and one with its duration when it ends."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.t = time.time()
        log.info("stage %s: start", self.name)

    def __exit__(self, *exc):
        log.info("stage %s: %s in %.1f s", self.name, "failed" if exc[0] else "done", time.time() - self.t)


class LazyTeacher:
    """The teacher model, loaded on first use: a rerun whose teacher-using stages are all finished
    never loads its weights."""

    def __init__(self, folder: Path, rc: RunConfig):
        self.folder, self.rc, self.model = folder, rc, None

    def get(self):
        if self.model is None:
            from families.hf import load_causal_lm

            with timed("load teacher"):
                self.model = load_causal_lm(
                    self.folder, self.rc.teacher.quantization, trust_remote_code=self.rc.teacher.trust_remote_code
                )
        return self.model

    def forget(self) -> None:
        self.model = None


@dataclass
class Run:
    """One run: its config, folder, process group and stage records, and what each stage left for the next."""

    rc: RunConfig
    dir: Path
    acc: Any  # accelerate.Accelerator
    stages: Stages
    started: float = field(default_factory=time.time)
    data_hash: str = ""
    records: dict[str, list[dict]] = field(default_factory=dict)
    teacher_dir: Path | None = None
    teacher_hash: str = ""  # content of the teacher folder
    teacher_id: str = ""  # what the teacher computes: its content and how it is loaded (8bit / nf4 change logits)
    teacher: LazyTeacher | None = None
    tokenizer: Any = None
    enc: dict[str, list[dict]] = field(default_factory=dict)
    plan: Any = None  # prune.Plan of student.init=prune, made once by the pipeline from the teacher's config
    plan_teacher: dict = field(default_factory=dict)  # the teacher numbers ``plan`` was made from
    signals: Any = None  # distill.signals.TopKSignals with distill.signals=topk
    student_hash: str = ""
    qad: dict[str, Stage] = field(default_factory=dict)  # scheme -> its finished quantization-aware student
    # extra training pools beside the task data, by name (augment, general): encoded examples, and the
    # output hash of the stage that made them (part of every later stage key that trains on them)
    mix: dict[str, list[dict]] = field(default_factory=dict)
    mix_hash: dict[str, str] = field(default_factory=dict)
    mix_info: dict[str, dict] = field(default_factory=dict)  # what each extra pool holds (metrics.json)
    general_sequences: list[list[int]] = field(default_factory=list)

    def train_data(self):
        """The distillation data: the task's training split, with each extra pool at its share of a batch."""
        from distill.train import Mixture

        shares = {"augment": self.rc.distill.augment.share, "general": self.rc.distill.general.share}
        return Mixture(self.enc["train"], [(self.mix[k], shares[k]) for k in sorted(self.mix)])

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    def stage(
        self,
        name: str,
        folder: Path,
        config: dict,
        inputs: dict,
        work: Callable[[Stage], dict | None],
        *,
        on: str = "all",
    ) -> Stage:
        """Run (or skip) one stage. ``on``: ``all`` (every process works, e.g. training), ``main`` (the main
        process works, the others wait for its manifest), ``main-only`` (inside a section only the main
        process runs: no waiting). ``work(stage)`` may return a dict of extra manifest fields."""
        st = self.stages.begin(name, folder, config, inputs)
        if not st.skipped and (on == "all" or self.main):
            with guard(name, st.folder):
                extra = work(st)
                if self.main:
                    self.stages.finish(st, extra if isinstance(extra, dict) else None)
        if on != "main-only":
            self.acc.wait_for_everyone()
            self.stages.adopt(st)
        return st
