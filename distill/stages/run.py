"""One run: its config, folder, process group and stage records (``Run``), and ``Run.stage``, through which
every stage goes: begin (skip when the finished folder's manifest matches), the work inside ``guard``
(disk-full and permission errors become one clear error), the manifest written last by the main process,
and every process seeing it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.hashing import MANIFEST
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


@dataclass(frozen=True)
class Data:
    """What ``inputs.load_data`` leaves: every split's records, and their hash (part of later stage keys)."""

    records: dict[str, list[dict]]
    hash: str


@dataclass(frozen=True)
class Teacher:
    """What ``inputs.teacher`` leaves: the teacher folder, its identity, the model (loaded on first use),
    its tokenizer and every split encoded with it."""

    dir: Path
    hash: str  # content of the folder
    id: str  # what it computes: its content and how it is loaded (8bit / nf4 change logits)
    model: LazyTeacher
    tokenizer: Any
    enc: dict[str, list[dict]]


@dataclass
class Pools:
    """Extra training pools beside the task data, by name (``augment``, ``general``), as ``inputs.augment``
    and ``inputs.general`` add them: encoded examples, the output hash of the stage that made each (part of
    every later stage key that trains on them), and what each holds (metrics.json)."""

    examples: dict[str, list[dict]] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    info: dict[str, dict] = field(default_factory=dict)
    general_sequences: list[list[int]] = field(default_factory=list)  # the general text, for prune calibration


@dataclass(frozen=True)
class Student:
    """What ``student.distill`` leaves: the distilled student's folder and its output hash."""

    folder: Path
    hash: str


@dataclass
class Run:
    """One run: its config, folder, process group and stage records (the context every stage reads), and
    the typed outputs of the stages so far, which ``pipeline.run`` sets from each stage's return value."""

    rc: RunConfig
    dir: Path
    acc: Any  # accelerate.Accelerator
    stages: Stages
    started: float = field(default_factory=time.time)
    plan: Any = None  # prune.Plan of student.init=prune, made once by the pipeline from the teacher's config
    plan_teacher: dict = field(default_factory=dict)  # the teacher numbers ``plan`` was made from
    data: Data | None = None  # inputs.load_data
    teacher: Teacher | None = None  # inputs.teacher
    base: Path | None = None  # inputs.teacher: the pretrained folder a fine-tuned teacher started from
    pools: Pools = field(default_factory=Pools)  # inputs.augment, inputs.general
    signals: Any = None  # inputs.signals (distill.signals.TopKSignals) with distill.signals=topk
    student: Student | None = None  # student.distill
    qad: dict[str, Stage] = field(default_factory=dict)  # student.quantization_aware: scheme -> its student

    def train_data(self):
        """The distillation data: the task's training split, with each extra pool at its share of a batch."""
        from distill.train import Mixture

        shares = {"augment": self.rc.distill.augment.share, "general": self.rc.distill.general.share}
        pools = self.pools.examples
        return Mixture(self.teacher.enc["train"], [(pools[k], shares[k]) for k in sorted(pools)])

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
        shared: bool = False,
    ) -> Stage:
        """Run (or skip) one stage. ``on``: ``all`` (every process works, e.g. training), ``main`` (the main
        process works, the others wait for its manifest), ``main-only`` (inside a section only the main
        process runs: no waiting). ``work(stage)`` may return a dict of extra manifest fields.

        ``shared``: ``folder`` is a cache entry other jobs use too. The main process holds its claim
        (``core.cache.claimed``) from the decision to skip through the manifest: while another job builds
        it, this one waits, then reuses it. A claim lost to another job while building (this one was
        suspended past the lease) discards this job's copy and decides again."""
        if not shared:
            return self._stage(name, folder, config, inputs, work, on)
        from core.cache import ClaimLost

        for _ in range(3):
            try:
                with guard(name, folder), self._claim(name, folder):  # an unwritable cache: one clear error
                    return self._stage(name, folder, config, inputs, work, on)
            except ClaimLost as err:
                log.warning("stage %s: %s", name, err)
        raise RuntimeError(f"stage {name}: lost the claim on {folder} three times; is the cache lease too short?")

    def _stage(self, name, folder, config, inputs, work, on) -> Stage:
        st = self.stages.begin(name, folder, config, inputs)
        if not st.skipped and (on == "all" or self.main):
            with guard(name, st.folder):
                extra = work(st)
                if self.main:
                    from core.cache import check_current_claim

                    check_current_claim()  # the manifest is written by the claim's holder only
                    self.stages.finish(st, extra if isinstance(extra, dict) else None)
        if on != "main-only":
            self.acc.wait_for_everyone()
            self.stages.adopt(st)
        return st

    @contextmanager
    def _claim(self, name: str, folder: Path):
        """The main process holds the cache claim; in a multi-process run the others poll for a marker in
        the run folder until it holds it (not a collective: a wait for another job's build can outlast the
        process group's timeout), then meet it at a barrier."""
        from core.cache import claimed

        flag = self.dir / f".claim-{name.replace(':', '_')}"
        if self.acc.num_processes == 1:
            with claimed(folder, f"stage {name}"):
                yield
            return
        if self.main:
            with claimed(folder, f"stage {name}"):
                flag.write_text(str(self.started))
                self.acc.wait_for_everyone()
                try:
                    yield
                finally:
                    flag.unlink(missing_ok=True)
        else:
            while not self._fresh(flag) and not (Path(folder) / MANIFEST).is_file():
                time.sleep(1.0)
            self.acc.wait_for_everyone()
            yield

    def _fresh(self, flag: Path) -> bool:
        """Whether the main process's claim marker is this run's: one left by a run killed earlier (the
        marker is removed when the stage ends) is older than this run."""
        try:
            return flag.stat().st_mtime >= self.started - 60
        except FileNotFoundError:
            return False
