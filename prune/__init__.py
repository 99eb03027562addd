"""Structured (width / depth) pruning of Hugging Face causal LMs into standard, reloadable models.

    from prune import prune_model
    student, report = prune_model(teacher, calib_batches, fraction=0.25)          # budget
    student, report = prune_model(teacher, calib_batches, sizes={"hidden_size": 128})  # explicit

Supported families: Llama, Qwen2, Qwen3, Mistral (tied or untied embeddings, any GQA ratio).
"""

from __future__ import annotations

from prune.plan import Plan, PlanError, Shape, count_params, plan_budget, plan_explicit

__all__ = ["Plan", "PlanError", "Shape", "count_params", "plan_budget", "plan_explicit", "make_plan", "prune_model"]


def make_plan(
    cfg: dict,
    *,
    sizes: dict | None = None,
    fraction: float | None = None,
    bytes_: int | None = None,
    strategy: str = "width",
    align: int = 8,
    prune_heads: bool = True,
) -> Plan:
    """Explicit sizes or a budget -> a Plan, from the config alone (raises PlanError listing every problem)."""
    if fraction is not None or bytes_ is not None:
        return plan_budget(
            cfg, fraction=fraction, bytes_=bytes_, strategy=strategy, align=align, prune_heads=prune_heads
        )
    return plan_explicit(cfg, {k: v for k, v in (sizes or {}).items() if v is not None}, align=align)


def prune_model(model, calib_batches=None, *, method: str = "activation", **plan_kwargs):
    """Prune ``model`` to a plan; returns (new model, report dict). ``model`` is left untouched.

    ``method``: ``activation`` (needs ``calib_batches``: dicts with input_ids / attention_mask) or
    ``magnitude`` (weights only).
    """
    from prune.importance import activation_importance, magnitude_importance
    from prune.surgery import apply

    plan = make_plan(model.config.to_dict(), **plan_kwargs)
    if method == "activation":
        if not calib_batches:
            raise ValueError("method='activation' needs calibration batches")
        imp = activation_importance(model, calib_batches)
    elif method == "magnitude":
        imp = magnitude_importance(model)
    else:
        raise ValueError(f"unknown importance method {method!r}; use activation or magnitude")
    pruned, keep = apply(model, imp, plan.shape)
    report = {
        "method": method,
        "shape": plan.shape.as_dict(),
        "params": plan.params,
        "teacher_params": plan.teacher_params,
        "fraction": plan.fraction,
        "reasons": plan.reasons,
        "kept_layers": keep.layers,
    }
    return pruned, report
