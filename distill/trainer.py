"""The accelerate training loop, for distillation (teacher given) and plain fine-tuning (no teacher).

One process or many: the same code runs under ``python -m distill`` and ``accelerate launch`` /
``torchrun``. Data order is a pure function of (seed, step), every process takes its slice of each
global batch, and losses are normalised by the *global* number of response tokens, so N processes
with batch B/N follow the same loss curve as one process with batch B.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.chat import IGNORE, collate, collate_packed, real_tokens, stop_ids
from distill import sharding
from distill.config import DistillConfig, LoraConfig, TrainConfig
from distill.losses import chunked_kd_loss, divergence, feature_loss
from families import backbone_and_head, decoder_layers, layer_module

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Raised when the loss stays non-finite or spiking; nothing is saved after it."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per optimizer step (main process)
    skipped_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    module: nn.Module | None = None  # the prepared (possibly DDP / FSDP wrapped) DistillModule
    sharded: bool = False  # trained under ``train.sharding: fsdp``: the models hold only their shards


class _Capture:
    """Forward hooks recording the outputs of chosen decoder layers (and their attention blocks)."""

    def __init__(self, model, layers: Sequence[int], attention: bool):
        self.out: dict[tuple[str, int], torch.Tensor] = {}
        self.handles = []
        blocks = decoder_layers(model)
        for i in layers:
            self.handles.append(blocks[i].register_forward_hook(self._hook(("hidden", i))))
            if attention:
                attn = layer_module(model, blocks[i], "attention")
                self.handles.append(attn.register_forward_hook(self._hook(("attn", i))))

    def _hook(self, key):
        def fn(_module, _inputs, output):
            self.out[key] = output[0] if isinstance(output, tuple) else output

        return fn

    def close(self):
        for h in self.handles:
            h.remove()


def _select(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """(B, T, H) states at positions predicting a response token -> (N, H)."""
    return x[:, :-1][sel]


def teacher_signals(teacher, batch: dict, layer_map: Sequence[Sequence[int]], attention: bool) -> dict:
    """Teacher final hidden states (N, Ht) at response positions, and mapped layer features."""
    sel = batch["labels"][:, 1:] != IGNORE
    cap = _Capture(teacher, [t for _, t in layer_map], attention) if layer_map else None
    try:
        with torch.no_grad():
            body, head = backbone_and_head(teacher)
            h = body(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch.get("position_ids"),  # packed rows (``train.pack``)
                use_cache=False,  # a cache would also turn off transformers' packed-sequence masks
            ).last_hidden_state
    finally:
        if cap:
            cap.close()
    feats = {k: _select(v, sel) for k, v in cap.out.items()} if cap else {}
    return {"hidden": _select(h, sel), "head": head.weight, "feats": feats}


INSIDE = {"inside": True}  # signals placeholder: the sharded teacher runs inside DistillModule.forward


class DistillModule(nn.Module):
    """Student + feature projections; ``forward`` returns the summed loss terms of one micro-batch.

    Everything trainable lives here so that DDP / FSDP wrap one module and see the whole graph.
    """

    def __init__(
        self, student, cfg: DistillConfig | None, teacher_hidden_size: int | None, vocab_size: int, chunk_size: int
    ):
        super().__init__()
        self.chunk_size = chunk_size
        self.student = student
        self.teacher = None  # the frozen teacher, held here only when sharded (``distill.sharding.shard``)
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.proj = nn.ModuleDict()
        self.div = divergence(cfg.divergence, beta=cfg.beta, alpha=cfg.skew_alpha) if cfg else None
        fe = cfg.features if cfg else None
        self.layer_map = [tuple(p) for p in fe.layer_map] if fe and fe.weight > 0 else []
        s_width = student.config.hidden_size
        if self.layer_map and teacher_hidden_size is not None and teacher_hidden_size != s_width:
            for s, t in self.layer_map:
                # Learned linear map from student to teacher width (FitNets, Romero et al. 2015).
                self.proj[f"{s}_{t}"] = nn.Linear(s_width, teacher_hidden_size, bias=False)

    def forward(
        self,
        input_ids,
        attention_mask,
        labels,
        teacher: dict | None,
        kd_weight: float,
        ce_weight: float,
        position_ids=None,
    ):
        """Summed losses of one micro-batch: ``logit`` = kd_weight * KD + ce_weight * CE (differentiable),
        ``kd`` and ``ce`` (detached, for logging), ``feat`` (differentiable), ``tokens``.

        ``teacher``: live signals from ``teacher_signals``, ``{"topk": (indices, logp, tail)}`` read from
        the cache (``distill.signals``), or ``INSIDE``: run ``self.teacher`` here, inside the (FSDP root's)
        forward, where its sharded embeddings and LM head are gathered."""
        sel = labels[:, 1:] != IGNORE
        attention = bool(self.cfg and self.cfg.features.attention)
        if teacher is INSIDE:
            batch = {
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "labels": labels,
                "position_ids": position_ids,
            }
            teacher = teacher_signals(self.teacher, batch, self.layer_map, attention)
        cap = (
            _Capture(self.student, [s for s, _ in self.layer_map], attention) if (self.layer_map and teacher) else None
        )
        try:
            body, head = backbone_and_head(self.student)
            h = body(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state
        finally:
            if cap:
                cap.close()
        hs, targets = _select(h, sel), labels[:, 1:][sel]
        cfg = self.cfg
        logit, kd, ce = chunked_kd_loss(
            hs,
            head.weight,
            targets,
            teacher.get("hidden") if teacher else None,
            teacher.get("head") if teacher else None,
            vocab_size=self.vocab_size,
            div=self.div or divergence("forward_kl"),
            temperature=cfg.temperature if cfg else 1.0,
            chunk_size=self.chunk_size,
            kd_weight=kd_weight if teacher else 0.0,
            ce_weight=ce_weight,
            teacher_topk=teacher.get("topk") if teacher else None,
        )
        feat = hs.new_zeros((), dtype=torch.float32)
        if cap:
            for (kind, s_layer), value in cap.out.items():
                t_layer = dict(self.layer_map)[s_layer]
                x = _select(value, sel)
                key = f"{s_layer}_{t_layer}"
                if key in self.proj:
                    x = self.proj[key](x)
                feat = feat + feature_loss(x, teacher["feats"][(kind, t_layer)], cfg.features.kind).sum()
        tokens = torch.tensor(int(sel.sum()), device=h.device)
        return {"logit": logit, "kd": kd, "ce": ce, "feat": feat, "tokens": tokens}


def apply_lora(student, cfg: LoraConfig):
    """Wrap ``student`` with peft LoRA adapters; ``merge_lora`` folds them back before saving."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    pc = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(student, pc)


def merge_lora(student):
    return student.merge_and_unload() if hasattr(student, "merge_and_unload") else student


class _BatchStream:
    """Global batch j is a pure function of (seed, j): resumable and identical for any process count.

    With ``lengths`` (``train.group_by_length``), each epoch's shuffled order is cut into windows of
    ``GROUP_WINDOW`` global batches, each window sorted by length and cut into batches, and the full batches
    shuffled: batches of similar lengths, little padding, still random across the epoch."""

    GROUP_WINDOW = 64  # global batches per sorted window (not a knob: any large window gives the saving)

    def __init__(self, n: int, global_batch: int, seed: int, lengths: Sequence[int] | None = None):
        self.n, self.gb, self.seed, self.lengths = n, global_batch, seed, lengths
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            idx = list(range(self.n))
            rng = random.Random(self.seed * 100003 + epoch)
            rng.shuffle(idx)
            if self.lengths is not None:
                idx = self._grouped(idx, rng)
            self._perms = {epoch: idx}
        return self._perms[epoch]

    def _grouped(self, idx: list[int], rng: random.Random) -> list[int]:
        w, gb = self.GROUP_WINDOW * self.gb, self.gb
        ordered = [i for s in range(0, len(idx), w) for i in sorted(idx[s : s + w], key=self.lengths.__getitem__)]
        full = len(ordered) // gb * gb
        batches = [ordered[s : s + gb] for s in range(0, full, gb)]
        rng.shuffle(batches)
        return [i for b in batches for i in b] + ordered[full:]  # a partial batch stays last: batches stay aligned

    def global_batch(self, j: int) -> list[int]:
        out = []
        for pos in range(j * self.gb, (j + 1) * self.gb):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out


class Mixture(Sequence):
    """Training examples from several pools, each extra pool at a fixed share of every global batch (the
    first pool takes the rest): task data with teacher-labelled augmented requests and general text at,
    say, a quarter of each batch however many of each there are. Indexes like one list (the pools one
    after another); ``train`` draws each pool's part of a batch from its own seeded order."""

    def __init__(self, main: Sequence[dict], extra: Sequence[tuple[Sequence[dict], float]] = ()):
        extra = [(d, share) for d, share in extra if len(d) and share > 0]
        if sum(share for _, share in extra) >= 1:
            raise ValueError("the extra pools' shares must leave part of every batch to the main data")
        self.pools = [main, *(d for d, _ in extra)]
        self.shares = [share for _, share in extra]
        self.offsets = [0]
        for d in self.pools:
            self.offsets.append(self.offsets[-1] + len(d))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(i)
        p = bisect.bisect_right(self.offsets, i) - 1
        return self.pools[p][i - self.offsets[p]]

    def __iter__(self):
        for pool in self.pools:
            yield from pool

    def counts(self, global_batch: int) -> list[int]:
        """Examples per pool in a global batch: each extra pool its share (at least one), the main the rest."""
        extra = [max(1, round(share * global_batch)) for share in self.shares]
        if global_batch - sum(extra) < 1:
            raise ValueError(f"a global batch of {global_batch} cannot hold the extra pools' shares {self.shares}")
        return [global_batch - sum(extra), *extra]


class _MixedStream:
    """``_BatchStream`` over a ``Mixture``: one stream per pool at its count per global batch, the extra
    examples spread evenly through the batch (so every process gets its share)."""

    def __init__(self, data: Mixture, global_batch: int, seed: int, group_by_length: bool):
        self.offsets = data.offsets
        self.streams = [
            _BatchStream(
                len(pool), k, seed + 7919 * p, [len(e["input_ids"]) for e in pool] if group_by_length else None
            )
            for p, (pool, k) in enumerate(zip(data.pools, data.counts(global_batch), strict=True))
        ]

    def global_batch(self, j: int) -> list[int]:
        placed = []
        for p, stream in enumerate(self.streams):
            part = stream.global_batch(j)
            placed += [((q + 0.5) / len(part), p, self.offsets[p] + i) for q, i in enumerate(part)]
        return [i for *_, i in sorted(placed)]


def _stream(data: Sequence[dict], global_batch: int, seed: int, group_by_length: bool):
    if isinstance(data, Mixture) and len(data.pools) > 1:
        return _MixedStream(data, global_batch, seed, group_by_length)
    lengths = [len(e["input_ids"]) for e in data] if group_by_length else None
    return _BatchStream(len(data), global_batch, seed, lengths)


def _schedule(optimizer, tc: TrainConfig):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[tc.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.steps)


def make_accelerator(mixed_precision: str = "auto", project_dir: str | Path | None = None, log_with=None):
    """One Accelerator per process (accelerate allows only one); bf16 where the hardware has it."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    pc = ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir)) if project_dir else None
    acc = Accelerator(mixed_precision=mixed_precision, project_config=pc, log_with=log_with)
    if mixed_precision == "bf16" and acc.device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        log.warning(
            "mixed_precision=bf16 on a CPU without native bf16 (AVX512-BF16 / AMX): autocast is emulated and "
            "slower than float32 here; set distill.train.mixed_precision=no (and the teacher's) on this machine"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != acc.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate runs {acc.num_processes}: each would train alone and "
            "write the same artifacts. On CPU-only machines set ACCELERATE_USE_CPU=true (torchrun, or "
            "`accelerate launch --multi_gpu --num_processes N`; accelerate's --cpu flag runs one process)."
        )
    return acc


def _sample_on_policy(student, batch: dict, tokenizer, cfg, synced: bool = False) -> dict:
    """GKD on-policy batch: the student's own sampled answers to the batch's prompts, labels on them.
    ``synced``: every process keeps stepping until all are done (sharded layers gather collectively)."""
    from distill.evaluate import left_pad

    prompts = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        n = int((labels == IGNORE).long().cumprod(0).sum())  # prompt length = leading IGNOREs
        prompts.append(ids[:n].tolist())
    stops = stop_ids(tokenizer)
    inp, mask = left_pad(prompts, tokenizer.pad_token_id)
    inp, mask = inp.to(batch["input_ids"].device), mask.to(batch["input_ids"].device)
    was_training = student.training
    student.eval()
    with torch.no_grad():
        out = student.generate(
            input_ids=inp,
            attention_mask=mask,
            do_sample=True,
            temperature=cfg.temperature,
            top_k=0,
            max_new_tokens=cfg.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops[0] if len(stops) == 1 else stops,
            synced_gpus=synced,
        )
    student.train(was_training)
    feats = []
    for p, row in zip(prompts, out[:, inp.shape[1] :].tolist(), strict=True):
        # up to and including the first stop token; positions after it are generate's padding (by position,
        # not by id: the pad token may be the end-of-turn token itself)
        end = next((k + 1 for k, t in enumerate(row) if t in stops), len(row))
        ans = row[:end] or [stops[0]]
        feats.append({"input_ids": p + ans, "labels": [IGNORE] * len(p) + ans})
    return {k: v.to(batch["input_ids"].device) for k, v in collate(feats, tokenizer.pad_token_id).items()}


# ---- the modes: what a step needs from a teacher, and how its loss terms are weighted ----


class CrossEntropy:
    """Plain cross-entropy on response tokens, no teacher (how the teacher is bootstrapped); logits are
    computed ``chunk_size`` tokens at a time."""

    dcfg: DistillConfig | None = None
    teacher_hidden_size: int | None = None

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size

    def prepare(self, acc) -> None:
        pass

    def on_policy(self, step: int, seed: int) -> bool:
        """Whether step ``step`` trains on the student's own samples (a pure function of seed and step)."""
        return False

    def signals(self, batch: dict, idx: list[int], device, layer_map) -> dict | None:
        return None

    def weights(self, on_policy: bool) -> tuple[float, float, float]:
        """(KD, CE, feature) weights of one micro-batch's loss."""
        return 0.0, 1.0, 0.0


class _KD(CrossEntropy):
    """loss = kd_weight * KD + (1 - kd_weight) * CE + features.weight * feature loss, logits chunked by
    ``distill.chunk_size``; subclasses say where the teacher's signals come from."""

    def __init__(self, dcfg: DistillConfig):
        super().__init__(dcfg.chunk_size)
        self.dcfg = dcfg

    def weights(self, on_policy: bool) -> tuple[float, float, float]:
        d = self.dcfg
        return d.kd_weight, 1.0 - d.kd_weight, d.features.weight


class LiveKD(_KD):
    """KD against a teacher that runs on every batch (frozen, no gradients)."""

    def __init__(self, teacher, dcfg: DistillConfig):
        super().__init__(dcfg)
        self.teacher = teacher
        self.teacher_hidden_size = teacher.config.hidden_size
        self.inside = False  # set by train() when the teacher is sharded into the DistillModule

    def prepare(self, acc) -> None:
        t = self.teacher
        t.eval()
        for p in t.parameters():
            p.requires_grad_(False)
        if not getattr(t, "is_loaded_in_8bit", False) and not getattr(t, "is_loaded_in_4bit", False):
            t.to(acc.device)

    def signals(self, batch: dict, idx: list[int], device, layer_map) -> dict | None:
        if self.inside:
            return INSIDE
        return teacher_signals(self.teacher, batch, layer_map, self.dcfg.features.attention)


class OnPolicyKD(LiveKD):
    """LiveKD where a share ``on_policy.fraction`` of steps (a pure function of seed and step) trains on
    the student's own sampled answers, KD only (GKD, Agarwal et al. 2024, arXiv:2306.13649)."""

    def on_policy(self, step: int, seed: int) -> bool:
        return random.Random(seed * 7919 + step).random() < self.dcfg.on_policy.fraction

    def weights(self, on_policy: bool) -> tuple[float, float, float]:
        return (1.0, 0.0, self.dcfg.features.weight) if on_policy else super().weights(False)


class CachedTopK(_KD):
    """KD from the teacher's top-k log-probabilities cached on disk (``distill.signals``): no teacher
    forward passes."""

    def __init__(self, signals, dcfg: DistillConfig):
        super().__init__(dcfg)
        self.cache = signals

    def signals(self, batch: dict, idx: list[int], device, layer_map) -> dict | None:
        return {"topk": self.cache.batch(idx, device)}


def make_mode(dcfg: DistillConfig, *, teacher=None, signals=None):
    """The mode for what is given: a live ``teacher`` -> LiveKD (OnPolicyKD when ``dcfg.on_policy.fraction``
    > 0); cached ``signals`` -> CachedTopK; neither -> CrossEntropy at ``dcfg.chunk_size``."""
    if teacher is not None and signals is not None:
        raise ValueError("give a live teacher or cached signals, not both")
    if teacher is not None:
        return OnPolicyKD(teacher, dcfg) if dcfg.on_policy.fraction > 0 else LiveKD(teacher, dcfg)
    if signals is not None:
        return CachedTopK(signals, dcfg)
    return CrossEntropy(dcfg.chunk_size)


# ---- the spike guard and checkpoints: their own units, their state saved together ----


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


@dataclass
class _Loop:
    """What every step of one ``train`` call shares: the prepared module, the data order and the mode."""

    acc: Any
    module: nn.Module
    raw: DistillModule  # the unwrapped module (its student samples on-policy answers)
    tokenizer: Any
    data: Sequence[dict]
    tc: TrainConfig
    mode: CrossEntropy
    stream: _BatchStream
    sharded: bool = False  # FSDP2: ``module`` is the root, the layers of student (and teacher) its units

    def full_params(self):
        """Context in which the student runs outside the root's forward (validation, sampling): the root's
        sharded embeddings, norms and heads gathered (layers gather themselves); nothing when unsharded."""
        return _gathered_root(self.module) if self.sharded else nullcontext()

    def micro_batches(self, step: int, use_policy: bool) -> tuple[list[dict], list[list[int]], float]:
        """This process's micro-batches of optimizer step ``step``, their example indices, and the response
        tokens of the whole step over all micro-batches and processes (every loss is divided by it, so
        accumulation and data parallelism give exactly the large-batch token mean)."""
        acc, tc = self.acc, self.tc
        rank = acc.process_index
        batches, indices = [], []
        parts = [
            self.stream.global_batch(step * tc.grad_accum + micro)[rank * tc.batch_size : (rank + 1) * tc.batch_size]
            for micro in range(tc.grad_accum)
        ]
        if tc.split_by_length > 1:  # the same examples, cut into micro-batches of similar lengths
            flat = sorted((i for part in parts for i in part), key=lambda i: len(self.data[i]["input_ids"]))
            k = min(tc.split_by_length, tc.batch_size) * tc.grad_accum  # equal on every process
            parts = [flat[round(a * len(flat) / k) : round((a + 1) * len(flat) / k)] for a in range(k)]
        for idx in parts:
            packed = tc.pack and not use_policy  # on-policy sampling reads one prompt per row
            rows = (collate_packed if packed else collate)([self.data[i] for i in idx], self.tokenizer.pad_token_id)
            if "order" in rows:  # packed: examples (and their answer tokens) in row-major order
                idx = [idx[j] for j in rows.pop("order")]
            batch = {k: v.to(acc.device) if torch.is_tensor(v) else v for k, v in rows.items()}
            if use_policy:
                with self.full_params():
                    batch = _sample_on_policy(
                        self.raw.student, batch, self.tokenizer, self.mode.dcfg.on_policy, synced=self.sharded
                    )
            batches.append(batch)
            indices.append(idx)
        local = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        n_step = max(float(acc.reduce(torch.tensor(float(local), device=acc.device), reduction="sum")), 1.0)
        return batches, indices, n_step

    def forward_backward(self, batch: dict, idx: list[int], weights, n_step: float, last: bool, skip) -> tuple:
        """One micro-batch: forward, then backward unless ``skip(mean loss)`` says it is a spike (then a
        zero-gradient backward keeps DDP's gradient sync consistent across processes). Returns (loss terms
        summed over processes / n_step, tokens seen over processes), or None when skipped."""
        acc, module, world = self.acc, self.module, self.acc.num_processes
        w_kd, w_ce, w_feat = weights
        with acc.autocast():  # the live teacher's forward in the student's precision (bf16: ~2x faster on CPU too)
            sig = self.mode.signals(batch, idx, acc.device, self.raw.layer_map)
        no_sync = nullcontext() if last or world == 1 or self.sharded else acc.no_sync(module)
        with no_sync, acc.autocast():
            out = module(
                batch["input_ids"], batch["attention_mask"], batch["labels"], sig, w_kd, w_ce, batch.get("position_ids")
            )
            loss_sum = out["logit"] + w_feat * out["feat"]
            # DDP averages gradients over processes: scale so the result is the global token mean.
            loss = loss_sum * world / n_step
        parts = torch.stack(
            [
                loss_sum.detach().float(),
                out["kd"].detach().float(),
                out["ce"].detach().float(),
                out["feat"].detach().float(),
                torch.tensor(float(real_tokens(batch)), device=acc.device),
                out["tokens"].float(),
            ]
        )
        parts = acc.reduce(parts, reduction="sum")
        n_tokens_all, n_micro = int(parts[4]), max(float(parts[5]), 1.0)
        if skip(float(parts[0]) / n_micro):  # this micro-batch's mean loss (the same on every process)
            if self.sharded:  # FSDP reduces each backward: every process skips this one together
                return None
            zero = sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0
            with nullcontext() if last or world == 1 else acc.no_sync(module):
                acc.backward(zero)
            return None
        acc.backward(loss)
        return (parts[:4] / n_step).tolist(), n_tokens_all


@contextmanager
def _gathered_root(root):
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def train(
    student,
    tokenizer,
    train_data: Sequence[dict],
    tc: TrainConfig,
    *,
    accelerator,
    mode: CrossEntropy,
    checkpoint_dir: str | Path | None = None,
    checkpoint_key: str | None = None,
    val_data: Sequence[dict] | None = None,
    heldout_data: Sequence[dict] | None = None,
    desc: str = "train",
    log_prefix: str = "",
) -> TrainResult:
    """Train ``student`` in place on encoded examples (``input_ids``/``labels`` lists) in ``mode``
    (CrossEntropy, or ``make_mode``'s LiveKD, OnPolicyKD, CachedTopK).

    Returns per-step history on the main process. Raises ``TrainingDiverged`` on repeated spikes. With
    ``tc.eval_generate``, every ``tc.eval_every`` steps the history also records greedy exact match on that
    many ``val_data`` and ``heldout_data`` examples (``val_exact_match``, ``heldout_exact_match``).
    Checkpoints go to ``checkpoint_dir`` every ``tc.checkpoint_every`` steps; a later call with the same
    directory and ``checkpoint_key`` resumes from the newest one.
    """
    from tqdm.auto import tqdm

    acc = accelerator
    acc.free_memory()  # forget objects prepared by an earlier train() so checkpoints hold only this run
    torch.manual_seed(tc.seed)
    module = DistillModule(student, mode.dcfg, mode.teacher_hidden_size, len(tokenizer), mode.chunk_size)
    mode.prepare(acc)
    fsdp = sharding.sharded(acc, tc)
    live = isinstance(mode, LiveKD)
    if live:
        mode.inside = fsdp  # a mode object reused for an unsharded call runs its teacher outside again
    if fsdp:
        sharding.shard(module.to(acc.device), mode.teacher if live else None, acc)
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr,
        betas=(0.9, 0.95),
    )
    if not fsdp:
        module, optimizer = acc.prepare(module, optimizer)
    # Not passed to accelerate.prepare: its wrapper steps the schedule once per *process* per step, which
    # runs the schedule N times too fast under N processes. The schedule is a pure function of the step.
    scheduler = _schedule(optimizer, tc)
    stream = _stream(train_data, tc.batch_size * acc.num_processes, tc.seed, tc.group_by_length)
    ckpt = (
        Checkpoints(
            checkpoint_dir,
            checkpoint_key,
            tc.checkpoint_every,
            tc.keep_checkpoints,
            desc,
            (module, optimizer) if fsdp else None,
        )
        if checkpoint_dir
        else None
    )
    state = (ckpt.resume(acc) if ckpt else None) or {}
    start_step = state.get("step", 0)
    for _ in range(start_step):
        scheduler.step()
    result = TrainResult(history=state.get("history", []))
    guard = SpikeGuard(tc, desc, state.get("guard"))
    proc = _process()
    t0, tokens_seen, probe_s = time.time(), 0, 0.0
    bar = tqdm(total=tc.steps, initial=start_step, desc=desc, disable=not acc.is_main_process, unit="step")
    module.train()
    loop = _Loop(
        acc, module, module if fsdp else acc.unwrap_model(module), tokenizer, train_data, tc, mode, stream, fsdp
    )
    for step in range(start_step, tc.steps):
        use_policy = mode.on_policy(step, tc.seed)
        terms = {"kd": 0.0, "ce": 0.0, "feat": 0.0, "loss": 0.0}
        any_backward = False
        batches, indices, n_step = loop.micro_batches(step, use_policy)
        weights = mode.weights(use_policy)
        for micro, batch in enumerate(batches):
            last = micro == len(batches) - 1
            skip = functools.partial(guard.is_bad, step, key=micro)
            done = loop.forward_backward(batch, indices[micro], weights, n_step, last, skip)
            if done is None:
                continue
            any_backward = True
            for k, v in zip(("loss", "kd", "ce", "feat"), done[0], strict=True):
                terms[k] += v
            tokens_seen += done[1]
        grad_norm = (
            acc.clip_grad_norm_(module.parameters(), tc.max_grad_norm) if any_backward else torch.tensor(float("nan"))
        )
        if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm is a DTensor over all processes
            grad_norm = grad_norm.full_tensor()
        if not any_backward or not math.isfinite(float(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            guard.step_skipped(step, any_backward)
            scheduler.step()
            bar.update(1)
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        guard.step_done()
        row = {
            "step": step + 1,
            **terms,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_seen / max(time.time() - t0, 1e-9),
            "memory_mb": _memory_mb(proc, acc.device),
            "on_policy": use_policy,
        }
        row["elapsed_s"], row["tokens"] = time.time() - t0, tokens_seen
        row["probe_s"] = probe_s  # of elapsed_s, spent in validation and probes (not training)
        if val_data is not None and tc.eval_every and (step + 1) % tc.eval_every == 0:
            t_probe = time.time()
            with loop.full_params():  # every process runs the same validation (its collectives line up)
                row["val_loss"] = validation_loss(
                    loop.raw.student, tokenizer, val_data, tc.batch_size * 4, mode.chunk_size
                )
                if tc.eval_generate:
                    row["val_exact_match"] = generated_exact_match(loop.raw.student, tokenizer, val_data, tc)
                    if heldout_data:  # requests unlike training: does the student generalize as it trains?
                        row["heldout_exact_match"] = generated_exact_match(
                            loop.raw.student, tokenizer, heldout_data, tc
                        )
            module.train()
            probe_s += time.time() - t_probe
        result.history.append(row)
        if acc.is_main_process and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps):
            acc.log(
                {f"{log_prefix}{k}": v for k, v in row.items() if isinstance(v, int | float) and k != "step"},
                step=step + 1,
            )
            bar.set_postfix(loss=f"{terms['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if ckpt and ckpt.due(step + 1, tc.steps):
            ckpt.save(acc, step + 1, result.history, guard.state())
    bar.close()
    result.skipped_steps = guard.skipped
    result.tokens = tokens_seen
    result.seconds = time.time() - t0
    result.module = module
    result.sharded = fsdp
    acc.wait_for_everyone()
    return result


def final_model(acc, trainable, result: TrainResult):
    """The trained model as a plain Hugging Face model (LoRA merged) on the main process.

    Unsharded training: ``trainable`` itself, merged. Sharded (``train.sharding: fsdp``, or accelerate's
    FSDP / DeepSpeed ZeRO-3): the full weights are gathered to the main process and a fresh model is
    built there; the other processes get None. A collective: every process must call it."""
    from accelerate.utils import DistributedType

    from distill import sharding

    if result.sharded:
        state = sharding.gather(result.module.student, acc.is_main_process)
    elif acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        full = acc.get_state_dict(result.module)
        state = {k.removeprefix("student."): v for k, v in (full or {}).items() if k.startswith("student.")}
    else:
        return merge_lora(trainable)
    return sharding.rebuild(trainable, state) if acc.is_main_process else None


def _process():
    try:
        import psutil

        return psutil.Process()
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        return None


def _memory_mb(proc, device) -> float:
    """Peak accelerator memory on GPU; resident memory of this process on CPU."""
    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return proc.memory_info().rss / 2**20 if proc is not None else float("nan")


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


@torch.no_grad()
def generated_exact_match(model, tokenizer, data: Sequence[dict], tc: TrainConfig) -> float:
    """Exact match of ``model``'s greedy answers on the first ``tc.eval_generate`` examples of ``data``:
    the task metric during training, so a run shows what more steps buy (``train.eval_generate``)."""
    from distill.evaluate import evaluate_model

    was = model.training
    scores, _ = evaluate_model(
        model, tokenizer, data[: tc.eval_generate], max_new_tokens=None, batch_size=tc.batch_size * 2
    )
    model.train(was)
    return scores["exact_match"]


@torch.no_grad()
def validation_loss(model, tokenizer, data: Sequence[dict], batch_size: int, chunk_size: int) -> float:
    """Mean cross-entropy per response token of ``model`` on encoded ``data``; logits are formed
    ``chunk_size`` answer tokens at a time (``distill.evaluate.answer_logits``)."""
    from distill.evaluate import answer_logits

    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        b = collate(data[i : i + batch_size], tokenizer.pad_token_id)
        targets, start = b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE], 0
        for logits in answer_logits(model, b, len(tokenizer), chunk_size):
            n = logits.shape[0]
            total += float(F.cross_entropy(logits, targets[start : start + n].to(logits.device), reduction="sum"))
            start, count = start + n, count + n
    model.train(was)
    return total / max(count, 1)
