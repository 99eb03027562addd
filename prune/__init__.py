"""Structured (width / depth) pruning of Hugging Face causal LMs into standard, reloadable models.

    from prune import prune_model
    student, report = prune_model(teacher, calib_batches, fraction=0.25)          # budget
    student, report = prune_model(teacher, calib_batches, sizes={"hidden_size": 128})  # explicit

Supported families: every entry of ``families.FAMILIES`` (tied or untied embeddings, any GQA ratio).
"""

from __future__ import annotations

import logging

from prune.plan import Plan, PlanError, Shape, count_params, embedding_share, plan_budget, plan_explicit

__all__ = [
    "Plan",
    "PlanError",
    "Shape",
    "count_params",
    "plan_budget",
    "plan_explicit",
    "make_plan",
    "prune_model",
    "prune_folder",
]
log = logging.getLogger("prune")


def make_plan(
    cfg: dict,
    *,
    sizes: dict | None = None,
    fraction: float | None = None,
    bytes_: int | None = None,
    strategy: str = "width",
    align: int = 8,
    prune_heads: bool = True,
    depth: int | None = None,
    hidden_fraction: float | None = None,
) -> Plan:
    """Explicit sizes or a budget -> a Plan, from the config alone (raises PlanError listing every problem).

    ``depth`` (a budget only): keep that many layers and let the width fill the budget at that depth.
    ``hidden_fraction`` (a budget only): the hidden size at that share of the teacher's, the MLP filling the rest.
    Sizes beside a budget are an error, never silently ignored."""
    if fraction is not None or bytes_ is not None:
        fixed = {k: v for k, v in (sizes or {}).items() if v is not None}
        if fixed:
            given = ", ".join(f"{k}={v}" for k, v in fixed.items())
            raise PlanError(
                [f"{given} given with a budget: give explicit sizes or a budget, not both (a budget takes a depth)"]
            )
        return plan_budget(
            cfg,
            fraction=fraction,
            bytes_=bytes_,
            strategy=strategy,
            align=align,
            prune_heads=prune_heads,
            depth=depth,
            hidden_fraction=hidden_fraction,
        )
    if depth is not None:
        raise PlanError([f"depth={depth} without a budget: set num_hidden_layers among the explicit sizes"])
    if hidden_fraction is not None:
        raise PlanError(
            [f"hidden_fraction={hidden_fraction} without a budget: set hidden_size among the explicit sizes"]
        )
    return plan_explicit(cfg, {k: v for k, v in (sizes or {}).items() if v is not None}, align=align)


def prune_model(model, calib_batches=None, *, method: str = "activation", plan: Plan | None = None, **plan_kwargs):
    """Prune ``model`` to ``plan`` (or to the plan ``make_plan`` makes of ``plan_kwargs``); returns (new
    model, report dict). ``model`` is left untouched.

    ``method``: ``activation`` (needs ``calib_batches``: dicts with input_ids / attention_mask) or
    ``magnitude`` (weights only).
    """
    from prune.importance import activation_importance, magnitude_importance
    from prune.surgery import apply

    if plan is None:
        plan = make_plan(model.config.to_dict(), **plan_kwargs)
    elif plan_kwargs:
        raise TypeError(f"give a plan or budget keywords, not both ({sorted(plan_kwargs)})")
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
        "kept_hidden": keep.hidden,  # the teacher's residual channels, in the student's order (feature distillation)
        "embedding": embedding_share(model.config.to_dict(), plan.shape),
    }
    return pruned, report


def prune_folder(
    src,
    dest,
    *,
    sizes: dict | None = None,
    fraction: float | None = None,
    bytes_: int | None = None,
    strategy: str = "width",
    method: str = "activation",
    align: int = 8,
    prune_heads: bool = True,
    depth: int | None = None,
    hidden_fraction: float | None = None,
    calib_examples: int,
    records: list[dict] | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Prune the model in folder ``src`` and save a standard HF folder at ``dest``; returns the report.

    The plan (and every problem with it) is settled from config.json before any weights load.
    ``records`` (chat records ``{"messages": [...]}``) calibrate ``method="activation"``.
    """
    from transformers import AutoTokenizer

    from core.chat import ChatTemplateError, check_template, ensure_pad
    from core.hashing import folder_hash
    from families.hf import folder_problems, load_causal_lm, read_config, save_model_atomically
    from prune.calibration import calibration_batches

    problems = folder_problems(src, "src", allow_pickle=allow_pickle)
    if method == "activation" and not records:
        problems.append("method=activation needs calibration records (task data); or use method=magnitude")
    if problems:
        raise PlanError(problems)
    plan = make_plan(
        read_config(src),
        sizes=sizes,
        fraction=fraction,
        bytes_=bytes_,
        strategy=strategy,
        align=align,
        prune_heads=prune_heads,
        depth=depth,
        hidden_fraction=hidden_fraction,
    )
    for r in plan.reasons:
        log.info("plan: %s", r)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    if method == "activation":
        template = check_template(tokenizer, "src")
        if template:  # not a pruning target problem: PlanError would call it "impossible pruning target"
            raise ChatTemplateError("\n".join(template))
        ensure_pad(tokenizer)  # calibration batches are padded; the saved tokenizer records the choice
    model = load_causal_lm(src)
    batches = None
    if method == "activation":
        # every calibration example the model can hold (the pipeline uses data.max_length)
        batches = calibration_batches(
            tokenizer, records, calib_examples, max_length=model.config.max_position_embeddings
        )
    pruned, report = prune_model(model, batches, method=method, plan=plan)
    report.update(
        source=str(src),
        source_hash=folder_hash(src),
        reasons=plan.reasons,
        strategy=strategy,
        calib_examples=calib_examples if method == "activation" else 0,
    )
    save_model_atomically(pruned, tokenizer, dest, {"prune_report.json": report})
    return report
