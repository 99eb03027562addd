"""Training that fails loudly and resumes: the spike guard (a loss far above its running mean skips the
step; too many in a row raise ``TrainingDiverged``) and checkpoints written under a temporary name.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

from distill.schema import TrainConfig

log = logging.getLogger("distill.train")


class TrainingDiverged(RuntimeError):
    """Raised when the loss stays non-finite or spiking; nothing is saved after it."""


class SpikeGuard:
    """Skips a micro-batch whose loss is not finite or above ``spike_factor`` x its running mean and at least
    ``MIN_RISE`` above it (after ``spike_warmup`` steps); more than ``max_spikes`` skipped steps in a row
    raise ``TrainingDiverged``.

    ``MIN_RISE``: near the end of a distillation the loss sits at ~0.002 nats per token, where one batch
    of slightly harder (or, with ``group_by_length``, longer) examples is 5x the mean without being a
    spike; the SmolLM2 run skipped 48 of 500 steps that way. A divergence rises by whole nats."""

    MIN_RISE = 0.5  # nats per token

    def __init__(self, tc: TrainConfig, desc: str, state: dict | None = None):
        self.tc, self.desc = tc, desc
        state = state or {}
        ema = state.get("ema")
        # one running mean per micro-batch position: with ``split_by_length`` the i-th micro-batch of every
        # step holds the i-th shortest examples, whose loss level differs from the longest ones'
        self.ema: dict[str, float] = ema if isinstance(ema, dict) else {} if ema is None else {"0": ema}
        self.in_row, self.skipped = state.get("spikes_in_row", 0), state.get("skipped_steps", 0)
        self.pending: dict[str, float] = {}

    def state(self) -> dict:
        return {"ema": self.ema, "spikes_in_row": self.in_row, "skipped_steps": self.skipped}

    def is_bad(self, step: int, value: float, key: int = 0) -> bool:
        """Whether micro-batch ``key`` of ``step`` (its mean loss ``value``) is skipped."""
        tc, ema = self.tc, self.ema.get(str(key))
        bad = not math.isfinite(value) or (
            ema is not None and step >= tc.spike_warmup and value > max(tc.spike_factor * ema, ema + self.MIN_RISE)
        )
        if bad:
            log.warning(
                "%s step %d: loss %.4g is %s (running mean %s); skipping this micro-batch",
                self.desc,
                step,
                value,
                "not finite" if not math.isfinite(value) else "a spike",
                f"{ema:.4g}" if ema else "n/a",
            )
        else:
            self.pending[str(key)] = value
        return bad

    def step_skipped(self, step: int, any_backward: bool) -> None:
        self.pending = {}
        self.skipped += 1
        self.in_row += 1
        if any_backward:
            log.warning("%s step %d: gradient norm is not finite; step skipped", self.desc, step)
        if self.in_row > self.tc.max_spikes:
            raise TrainingDiverged(
                f"{self.desc}: {self.in_row} steps in a row had non-finite or spiking loss (last step {step}); "
                "stopping without saving. Lower the learning rate (distill.train.lr) or raise "
                "distill.train.spike_factor / max_spikes if spikes are expected."
            )

    def step_done(self) -> None:
        """A step was applied: its micro-batches' losses enter their running means."""
        self.in_row = 0
        for key, loss in self.pending.items():
            self.ema[key] = loss if key not in self.ema else 0.9 * self.ema[key] + 0.1 * loss
        self.pending = {}


class Checkpoints:
    """accelerate state (model, optimizer, RNG) + step, history and spike-guard state every ``every``
    steps under ``root``, keyed: a resume only takes checkpoints written under the same ``key``."""

    def __init__(self, root: Path, key: str | None, every: int, keep: int, desc: str, fsdp=None):
        self.root, self.key, self.every, self.keep, self.desc = Path(root), key, every, keep, desc
        self.fsdp = fsdp  # (module, optimizer) when sharded: torch.distributed.checkpoint, one shard per process

    def resume(self, acc) -> dict | None:
        """Load the newest checkpoint of this key into ``acc``'s prepared objects; returns its record
        (step, history, guard) or None. Checkpoints of another key are discarded."""
        latest = self.root / "latest.json"
        if not latest.is_file():
            return None
        state = json.loads(latest.read_text())
        if state.get("key") != self.key:
            log.warning(
                "%s: checkpoints in %s belong to another configuration (key %s, now %s); starting from step 0",
                self.desc,
                self.root,
                state.get("key"),
                self.key,
            )
            acc.wait_for_everyone()
            if acc.is_main_process:
                shutil.rmtree(self.root, ignore_errors=True)
            acc.wait_for_everyone()
            return None
        if self.fsdp:
            from distill import sharding

            sharding.load(*self.fsdp, self.root / state["dir"], acc.process_index)
        else:
            acc.load_state(str(self.root / state["dir"]))
        log.info("%s: resumed from %s at step %d", self.desc, self.root / state["dir"], state["step"])
        return state

    def due(self, done: int, total: int) -> bool:
        return bool(self.every) and done % self.every == 0 and done < total

    def save(self, acc, step: int, history: list[dict], guard: dict) -> None:
        save_checkpoint(acc, self.root, step, history, self.keep, self.key, guard, self.fsdp)


# ---- the loop ----


def save_checkpoint(
    acc,
    root: Path,
    step: int,
    history: list[dict],
    keep: int,
    key: str | None = None,
    guard: dict | None = None,
    fsdp=None,
) -> None:
    """accelerate state (model, optimizer, scheduler, RNG) + step, written under a temp name then renamed;
    ``fsdp`` = (module, optimizer): a sharded checkpoint (``distill.sharding.save``) instead."""
    name = f"step-{step:08d}"
    tmp = root / f".{name}.tmp"
    if fsdp:
        from distill import sharding

        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        sharding.save(*fsdp, tmp, acc.process_index)  # every process writes its shard
    else:
        acc.save_state(str(tmp))  # every process must call it (FSDP / DeepSpeed shard their state)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if (root / name).exists():
            shutil.rmtree(root / name)
        tmp.rename(root / name)
        info = root / ".latest.json.tmp"
        info.write_text(json.dumps({"step": step, "dir": name, "key": key, "guard": guard or {}, "history": history}))
        info.replace(root / "latest.json")
        kept = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in kept[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
