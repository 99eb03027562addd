"""The distillation module: student (+ LoRA) and the logit / feature losses in one ``nn.Module``, so DDP and
FSDP wrap one thing; the teacher's signals (logits, hidden states of mapped layers) it is trained against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.chat import IGNORE
from distill.losses import chunked_kd_loss, divergence, feature_loss
from distill.schema import DistillConfig, LoraConfig
from families import backbone_and_head, decoder_layers, layer_module


class Capture:
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
    cap = Capture(teacher, [t for _, t in layer_map], attention) if layer_map else None
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
        self,
        student,
        cfg: DistillConfig | None,
        teacher_hidden_size: int | None,
        vocab_size: int,
        chunk_size: int,
        teacher_channels: Sequence[int] | None = None,
    ):
        """``teacher_channels``: the teacher's residual channels a pruned student kept, in its order (the prune
        report's ``kept_hidden``); ``distill.features.projection=channels`` compares the student's features
        with the teacher's at those channels instead of through a learned map."""
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
        self.channels: list[int] | None = None
        if self.layer_map and fe.projection == "channels":
            if teacher_channels is None or len(teacher_channels) != s_width:
                raise ValueError(
                    f"distill.features.projection=channels needs the {s_width} teacher channels the pruned student "
                    f"kept (got {None if teacher_channels is None else len(teacher_channels)})"
                )
            self.channels = list(teacher_channels)
        elif self.layer_map and teacher_hidden_size is not None and teacher_hidden_size != s_width:
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
        cap = Capture(self.student, [s for s, _ in self.layer_map], attention) if (self.layer_map and teacher) else None
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
                x, y = _select(value, sel), teacher["feats"][(kind, t_layer)]
                key = f"{s_layer}_{t_layer}"
                if key in self.proj:
                    x = self.proj[key](x)
                if self.channels is not None:
                    y = y.index_select(-1, torch.tensor(self.channels, device=y.device))
                feat = feat + feature_loss(x, y, cfg.features.kind).sum()
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
