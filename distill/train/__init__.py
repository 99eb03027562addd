"""Training, for distillation (teacher given) and plain fine-tuning (no teacher), in small modules:

- ``module``: ``DistillModule`` (student + losses in one module for DDP / FSDP), the teacher's signals, LoRA;
- ``modes``: ``CrossEntropy``, ``LiveKD``, ``OnPolicyKD``, ``CachedTopK``, picked by ``make_mode``;
- ``batching``: the data order (a pure function of seed and step) and mixtures of pools;
- ``guard``: the spike guard (``TrainingDiverged``) and checkpoints;
- ``loop``: ``train`` (set-up, then the steps), ``final_model``, ``make_accelerator``.

Imports no export, quantize or prune code (``distill.schema`` holds the settings types).
"""

from distill.train.batching import Mixture
from distill.train.guard import SpikeGuard, TrainingDiverged
from distill.train.loop import (
    TrainResult,
    final_model,
    generated_exact_match,
    make_accelerator,
    train,
    validation_loss,
)
from distill.train.modes import CachedTopK, CrossEntropy, LiveKD, OnPolicyKD, make_mode
from distill.train.module import DistillModule, apply_lora, merge_lora, teacher_signals

__all__ = [
    "CachedTopK",
    "CrossEntropy",
    "DistillModule",
    "LiveKD",
    "Mixture",
    "OnPolicyKD",
    "SpikeGuard",
    "TrainResult",
    "TrainingDiverged",
    "apply_lora",
    "final_model",
    "generated_exact_match",
    "make_accelerator",
    "make_mode",
    "merge_lora",
    "teacher_signals",
    "train",
    "validation_loss",
]
