"""Training modes, one object each: ``CrossEntropy`` (fine-tuning), ``LiveKD`` (the teacher runs every
step), ``OnPolicyKD`` (some steps on the student's own sampled answers, GKD), ``CachedTopK`` (the
teacher's cached top-k log-probs); ``make_mode`` picks one from the distillation settings.
"""

from __future__ import annotations

import random

import torch

from core.chat import IGNORE, collate, stop_ids
from distill.schema import DistillConfig
from distill.train.module import INSIDE, teacher_signals


def sample_on_policy(student, batch: dict, tokenizer, cfg, synced: bool = False) -> dict:
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
    teacher_channels: list[int] | None = None  # a pruned student's kept teacher channels (features.projection)

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

    def __init__(self, teacher, dcfg: DistillConfig, teacher_channels: list[int] | None = None):
        super().__init__(dcfg)
        self.teacher = teacher
        self.teacher_hidden_size = teacher.config.hidden_size
        self.teacher_channels = teacher_channels
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


def make_mode(dcfg: DistillConfig, *, teacher=None, signals=None, teacher_channels: list[int] | None = None):
    """The mode for what is given: a live ``teacher`` -> LiveKD (OnPolicyKD when ``dcfg.on_policy.fraction``
    > 0); cached ``signals`` -> CachedTopK; neither -> CrossEntropy at ``dcfg.chunk_size``.
    ``teacher_channels``: the teacher channels a pruned student kept (``features.projection=channels``)."""
    if teacher is not None and signals is not None:
        raise ValueError("give a live teacher or cached signals, not both")
    if teacher is not None:
        kind = OnPolicyKD if dcfg.on_policy.fraction > 0 else LiveKD
        return kind(teacher, dcfg, teacher_channels)
    if signals is not None:
        return CachedTopK(signals, dcfg)
    return CrossEntropy(dcfg.chunk_size)


# ---- the spike guard and checkpoints: their own units, their state saved together ----
