"""FSDP2 for ``train``: the student and the frozen teacher sharded per decoder layer (``train.sharding: fsdp``).

PyTorch's own FSDP2 (``torch.distributed.fsdp.fully_shard``), applied here rather than through accelerate:
accelerate wraps one model per ``prepare`` call, and the distillation step needs *two* models (the student
that trains, the teacher that only runs forward) inside one FSDP root, so that the chunked KD loss can read
both LM heads while they are gathered. accelerate still owns the process group, autocast and the
collectives the loop uses; FSDP2 runs on its gloo (CPU) or NCCL (GPU) group.

The layout (``shard``):
- every decoder layer of the student and of the teacher is its own FSDP unit: all-gathered for its
  forward (and the student's backward), then freed. The teacher's units never see a backward.
- the root unit is the ``DistillModule``: it holds what the layers do not (embeddings, final norms, LM
  heads, feature projections) of both models. They are gathered once per step, at the root's forward,
  and stay gathered through the backward (FSDP2's root default), so the KD loss reads ``head.weight``
  *inside the root's forward* where it is a full tensor. Read outside (a sharded ``DTensor``), it fails.
- gradients are reduce-scattered (averaged) after each micro-batch's backward; every process keeps only
  its shard of gradients and AdamW state, so N processes hold ~1/N of the optimizer state each.

Checkpoints are sharded (``torch.distributed.checkpoint``: each process writes its own shard of the student
and optimizer, the frozen teacher is not written); the final student is gathered to the main process one
tensor at a time and rebuilt there as a plain model (``final_model``).
"""

from __future__ import annotations

import logging
from pathlib import Path

SHARDING = ("none", "fsdp")  # train.sharding: replicate (DDP with N processes) or FSDP2 (fully_shard)

log = logging.getLogger(__name__)


def sharded(acc, tc) -> bool:
    """Whether ``train`` shards under this accelerator and train config (FSDP2 needs 2+ processes)."""
    if tc.sharding != "fsdp":
        return False
    if str(acc.distributed_type).rsplit(".", 1)[-1] in ("FSDP", "DEEPSPEED"):
        raise ValueError(
            f"train.sharding=fsdp under accelerate's {acc.distributed_type} config would shard twice: launch with "
            "torchrun or `accelerate launch --multi_gpu` (accelerate_configs/multi_gpu.yaml) instead"
        )
    if acc.num_processes == 1:
        log.info("train.sharding=fsdp with one process: nothing to shard, training unsharded")
        return False
    return True


def shard(module, teacher, acc):
    """Apply FSDP2 to a ``DistillModule`` in place: each decoder layer of its student (and of ``teacher``,
    which becomes ``module.teacher``) is one unit, the module itself the root. Returns ``module``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from families import decoder_layers

    mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
    for layer in decoder_layers(module.student):
        fully_shard(layer, mesh=mesh)
    if teacher is not None:
        if getattr(teacher, "is_loaded_in_8bit", False) or getattr(teacher, "is_loaded_in_4bit", False):
            raise ValueError("train.sharding=fsdp needs a teacher in full precision (teacher.quantization=none)")
        module.teacher = teacher
        for layer in decoder_layers(teacher):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    # FSDP2 makes the first unit to run forward the root. Validation or on-policy sampling may run the
    # student's layers before the first training step: settle the root now.
    module._get_fsdp_state()._lazy_init()
    return module


def _trained_state(module, optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts of the sharded module without the frozen teacher's weights."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer)
    return {k: v for k, v in msd.items() if not k.startswith("teacher.")}, osd


def save(module, optimizer, folder: Path, rank: int) -> None:
    """Each process writes its shard of the student and the optimizer (and its RNG state) into ``folder``
    (a collective: every process calls it)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    msd, osd = _trained_state(module, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(folder / f"rng-{rank}.safetensors"))


def load(module, optimizer, folder: Path, rank: int) -> None:
    """Inverse of ``save``, into the already sharded module and its optimizer (a collective)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    msd, osd = _trained_state(module, optimizer)  # also creates the optimizer's (empty) state to load into
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        module,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=StateDictOptions(strict=False),  # the teacher's weights are not in the checkpoint
    )
    rng = folder / f"rng-{rank}.safetensors"
    if rng.is_file():
        states = load_file(str(rng))
        torch.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])


def gather(model, main: bool) -> dict | None:
    """Full tensors of ``model``'s state dict on the main process, one tensor at a time (a collective:
    every process calls it; the others get None). Peak extra memory: one full tensor per process."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in model.state_dict().items():
        full = v.full_tensor() if isinstance(v, DTensor) else v
        if main:
            out[k] = full.detach().cpu().clone()
        del full
    return out if main else None


def rebuild(like, state: dict):
    """A plain (unsharded) copy of ``like`` (an HF causal LM, or a peft model around one) holding ``state``
    (``like``'s state-dict keys), LoRA merged: the model the main process saves."""
    import torch
    from transformers import AutoModelForCausalLM

    from families import unwrap

    base = unwrap(like)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(base.config, dtype=next(iter(state.values())).dtype)
        if hasattr(like, "peft_config"):
            from peft import get_peft_model

            fresh = get_peft_model(fresh, like.peft_config["default"])
    fresh.load_state_dict(state, assign=True, strict=True)
    # buffers outside the state dict (rotary frequencies) were built on meta: take them from ``like``
    live = dict(like.named_buffers())
    for name, buf in list(fresh.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            fresh.get_submodule(owner).register_buffer(leaf, live[name].detach().cpu().clone(), persistent=False)
    if getattr(base.config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.generation_config = base.generation_config
    return fresh.merge_and_unload() if hasattr(fresh, "merge_and_unload") else fresh
