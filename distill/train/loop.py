"""The accelerate training loop: ``train`` sets up (module, optimizer, schedule, data order, checkpoints,
guard) and runs the steps; ``final_model`` returns a plain HF model (LoRA merged, shards gathered).

One process or many: the same code runs under ``python -m distill`` and ``accelerate launch`` /
``torchrun``. Data order is a pure function of (seed, step), every process takes its slice of each
global batch, and losses are normalised by the *global* number of response tokens, so N processes
with batch B/N follow the same loss curve as one process with batch B.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.chat import IGNORE, collate, collate_packed, real_tokens
from distill import sharding
from distill.schema import TrainConfig
from distill.train.batching import BatchStream, make_stream
from distill.train.guard import Checkpoints, SpikeGuard
from distill.train.modes import CrossEntropy, LiveKD, sample_on_policy
from distill.train.module import DistillModule, merge_lora

log = logging.getLogger("distill.train")


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per optimizer step (main process)
    skipped_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    module: nn.Module | None = None  # the prepared (possibly DDP / FSDP wrapped) DistillModule
    sharded: bool = False  # trained under ``train.sharding: fsdp``: the models hold only their shards


def _schedule(optimizer, tc: TrainConfig):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[tc.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=tc.warmup_steps, num_training_steps=tc.steps)


def make_accelerator(mixed_precision: str = "auto", project_dir: str | Path | None = None, log_with=None):
    """One Accelerator per process (accelerate allows only one); bf16 where the hardware has it. bitsandbytes
    is imported first without its Hub kernel lookup (``core.offline``): accelerate imports it through peft."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from core.offline import import_bitsandbytes

    import_bitsandbytes()
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
    stream: BatchStream
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
                    batch = sample_on_policy(
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

    s = _setup(student, tokenizer, train_data, tc, accelerator, mode, checkpoint_dir, checkpoint_key, desc)
    acc, loop, result, guard = s.acc, s.loop, s.result, s.guard
    proc = _process()
    t0, tokens_seen, probe_s = time.time(), 0, 0.0
    bar = tqdm(total=tc.steps, initial=s.start_step, desc=desc, disable=not acc.is_main_process, unit="step")
    loop.module.train()
    for step in range(s.start_step, tc.steps):
        use_policy = mode.on_policy(step, tc.seed)
        terms, tokens, grad_norm = _accumulate(loop, guard, step, use_policy)
        tokens_seen += tokens
        if grad_norm is None or not math.isfinite(grad_norm):  # all micro-batches spikes, or a non-finite norm
            s.optimizer.zero_grad(set_to_none=True)
            guard.step_skipped(step, grad_norm is not None)
            s.scheduler.step()
            bar.update(1)
            continue
        s.optimizer.step()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        guard.step_done()
        row = {
            "step": step + 1,
            **terms,
            "lr": s.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_seen / max(time.time() - t0, 1e-9),
            "memory_mb": _memory_mb(proc, acc.device),
            "on_policy": use_policy,
        }
        row["elapsed_s"], row["tokens"] = time.time() - t0, tokens_seen
        row["probe_s"] = probe_s  # of elapsed_s, spent in validation and probes (not training)
        if val_data is not None and tc.eval_every and (step + 1) % tc.eval_every == 0:
            t_probe = time.time()
            row.update(_probe(loop, val_data, heldout_data))
            probe_s += time.time() - t_probe
        result.history.append(row)
        if acc.is_main_process and ((step + 1) % tc.log_every == 0 or step + 1 == tc.steps):
            acc.log(
                {f"{log_prefix}{k}": v for k, v in row.items() if isinstance(v, int | float) and k != "step"},
                step=step + 1,
            )
            bar.set_postfix(loss=f"{terms['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if s.ckpt and s.ckpt.due(step + 1, tc.steps):
            s.ckpt.save(acc, step + 1, result.history, guard.state())
    bar.close()
    result.skipped_steps = guard.skipped
    result.tokens = tokens_seen
    result.seconds = time.time() - t0
    result.module = loop.module
    result.sharded = loop.sharded
    acc.wait_for_everyone()
    return result


@dataclass
class _Setup:
    acc: Any
    loop: _Loop
    optimizer: Any
    scheduler: Any
    ckpt: Checkpoints | None
    guard: SpikeGuard
    result: TrainResult
    start_step: int


def _setup(student, tokenizer, train_data, tc: TrainConfig, acc, mode, checkpoint_dir, checkpoint_key, desc) -> _Setup:
    """The module (sharded or prepared by accelerate), AdamW, the schedule, the data order, checkpoints and
    the spike guard, resumed from the newest checkpoint of ``checkpoint_dir`` when there is one."""
    acc.free_memory()  # forget objects prepared by an earlier train() so checkpoints hold only this run
    torch.manual_seed(tc.seed)
    module = DistillModule(
        student, mode.dcfg, mode.teacher_hidden_size, len(tokenizer), mode.chunk_size, mode.teacher_channels
    )
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
    stream = make_stream(train_data, tc.batch_size * acc.num_processes, tc.seed, tc.group_by_length)
    ckpt = None
    if checkpoint_dir:
        shards = (module, optimizer) if fsdp else None
        ckpt = Checkpoints(checkpoint_dir, checkpoint_key, tc.checkpoint_every, tc.keep_checkpoints, desc, shards)
    state = (ckpt.resume(acc) if ckpt else None) or {}
    start_step = state.get("step", 0)
    for _ in range(start_step):
        scheduler.step()
    raw = module if fsdp else acc.unwrap_model(module)
    loop = _Loop(acc, module, raw, tokenizer, train_data, tc, mode, stream, fsdp)
    guard = SpikeGuard(tc, desc, state.get("guard"))
    return _Setup(
        acc, loop, optimizer, scheduler, ckpt, guard, TrainResult(history=state.get("history", [])), start_step
    )


def _accumulate(loop: _Loop, guard: SpikeGuard, step: int, use_policy: bool) -> tuple[dict, int, float | None]:
    """Forward and backward over the step's micro-batches, gradients clipped: (mean loss terms, tokens seen
    over processes, gradient norm). The norm is None when no micro-batch ran backward (all spikes); the
    caller skips the update then, and when the norm is not finite."""
    acc, tc = loop.acc, loop.tc
    terms = {"kd": 0.0, "ce": 0.0, "feat": 0.0, "loss": 0.0}
    any_backward, tokens = False, 0
    batches, indices, n_step = loop.micro_batches(step, use_policy)
    weights = loop.mode.weights(use_policy)
    for micro, batch in enumerate(batches):
        last = micro == len(batches) - 1
        skip = functools.partial(guard.is_bad, step, key=micro)
        done = loop.forward_backward(batch, indices[micro], weights, n_step, last, skip)
        if done is None:
            continue
        any_backward = True
        for k, v in zip(("loss", "kd", "ce", "feat"), done[0], strict=True):
            terms[k] += v
        tokens += done[1]
    if not any_backward:
        return terms, tokens, None
    grad_norm = acc.clip_grad_norm_(loop.module.parameters(), tc.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm is a DTensor over all processes
        grad_norm = grad_norm.full_tensor()
    return terms, tokens, float(grad_norm)


def _probe(loop: _Loop, val_data, heldout_data) -> dict:
    """Validation loss and, with ``eval_generate``, greedy exact match on validation and heldout examples;
    every process runs the same validation (its collectives line up)."""
    tc, student, tokenizer = loop.tc, loop.raw.student, loop.tokenizer
    row = {}
    with loop.full_params():
        row["val_loss"] = validation_loss(student, tokenizer, val_data, tc.batch_size * 4, loop.mode.chunk_size)
        if tc.eval_generate:
            row["val_exact_match"] = generated_exact_match(student, tokenizer, val_data, tc)
            if heldout_data:  # requests unlike training: does the student generalize as it trains?
                row["heldout_exact_match"] = generated_exact_match(student, tokenizer, heldout_data, tc)
    loop.module.train()
    return row


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


@torch.no_grad()
def generated_exact_match(model, tokenizer, data: Sequence[dict], tc: TrainConfig) -> float:
    """Exact match of ``model``'s greedy answers on the first ``tc.eval_generate`` examples of ``data``:
    the task metric during training, so a run shows what more steps buy (``train.eval_generate``)."""
    from distill.evaluate import answer_budget, evaluate_generations, hf_generate_fn

    was = model.training
    data = data[: tc.eval_generate]
    # generation only: the teacher-forced perplexity evaluate_model adds made a probe ~1.6x as long (bench/eval_passes.py)
    generate = hf_generate_fn(model, tokenizer, answer_budget(data), batch_size=tc.batch_size * 2)
    scores, _ = evaluate_generations(data, generate, tokenizer)
    model.train(was)
    return scores["exact_match"]


@torch.no_grad()
def validation_loss(model, tokenizer, data: Sequence[dict], batch_size: int, chunk_size: int) -> float:
    """Mean cross-entropy per response token of ``model`` on encoded ``data``; logits are formed
    ``chunk_size`` answer tokens at a time (``distill.evaluate.answer_logits``)."""
    from distill.evaluate import answer_logits, by_length_order

    was = model.training
    model.eval()
    total, count = 0.0, 0
    data = by_length_order(data)  # batches of similar lengths: little padding, the same sum
    for i in range(0, len(data), batch_size):
        b = collate(data[i : i + batch_size], tokenizer.pad_token_id)
        targets, start = b["labels"][:, 1:][b["labels"][:, 1:] != IGNORE], 0
        for logits in answer_logits(model, b, len(tokenizer), chunk_size):
            n = logits.shape[0]
            total += float(F.cross_entropy(logits, targets[start : start + n].to(logits.device), reduction="sum"))
            start, count = start + n, count + n
    model.train(was)
    return total / max(count, 1)
