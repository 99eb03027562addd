"""Budget -> target shapes. Pure Python on config dicts (no weights, no torch), so ``validate`` can call it.
Family differences (parameter counts, shape constraints) come from ``families``.

Pruning is uniform across layers (Minitron, Model Optimizer): every layer keeps the same number of MLP
channels, query heads and KV heads, and all layers share one hidden size, so the result is an
ordinary config of the same family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import families
from families import FAMILIES

SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers")


class PlanError(ValueError):
    """Impossible pruning targets, each named with the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("impossible pruning target:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass
class Shape:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in SIZE_KEYS}


@dataclass
class Plan:
    shape: Shape
    params: int
    teacher_params: int
    reasons: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.params / self.teacher_params


def embedding_share(cfg: dict, shape: Shape | None = None) -> dict:
    """Parameters in the embedding and LM head (counted once when tied) and their share of the model with
    ``shape`` (default: the teacher's). For small models with large vocabularies (Gemma 3 270M: 262k rows)
    this is most of the model, and width pruning barely moves it."""
    h = (shape or teacher_shape(cfg)).hidden_size
    tied = bool(cfg.get("tie_word_embeddings", False))
    n = cfg["vocab_size"] * h * (1 if tied else 2)
    return {"params": n, "share": n / count_params(cfg, shape), "vocab_size": cfg["vocab_size"], "tied": tied}


def _embedding_reason(cfg: dict, shape: Shape) -> str:
    t, s = embedding_share(cfg), embedding_share(cfg, shape)
    text = (
        f"embedding{' (tied with the LM head)' if s['tied'] else ' and LM head'}: {s['vocab_size']:,} rows, "
        f"{s['params']:,} parameters = {s['share']:.1%} of this shape (the teacher's: {t['share']:.1%})"
    )
    if s["share"] >= 0.5:
        text += (
            "; most of the model is vocabulary, which width, heads and depth do not shrink (export.vocab.trim "
            "drops the rows the task never uses from the ONNX files, at a measured cost on unseen names)"
        )
    return text


def teacher_shape(cfg: dict) -> Shape:
    return Shape(
        **{k: cfg[k] if k != "num_key_value_heads" else cfg.get(k) or cfg["num_attention_heads"] for k in SIZE_KEYS}
    )


def count_params(cfg: dict, shape: Shape | None = None) -> int:
    """Parameters of the family's decoder with ``shape`` (default: the config's own), counted analytically."""
    return families.count_params(cfg, shape.as_dict() if shape else None)


def _align_down(x: float, a: int) -> int:
    return max(a, int(x // a) * a)


def check_shape(cfg: dict, s: Shape, align: int) -> list[str]:
    """Problems with shape ``s`` as a pruned version of the teacher ``cfg``."""
    t = teacher_shape(cfg)
    out = []
    if cfg.get("model_type") not in FAMILIES:
        out.append(
            f"model_type {cfg.get('model_type')!r} is not supported for pruning; supported: {families.supported()}"
        )
        return out
    for k in SIZE_KEYS:
        new, old = getattr(s, k), getattr(t, k)
        if new < 1:
            out.append(f"{k}={new}: must be at least 1")
        elif new > old:
            out.append(f"{k}={new}: larger than the teacher's {old}; pruning only removes")
    if s.num_key_value_heads and s.num_attention_heads % s.num_key_value_heads:
        out.append(
            f"num_attention_heads={s.num_attention_heads} is not divisible by num_key_value_heads="
            f"{s.num_key_value_heads}; grouped-query attention needs the same number of query heads per KV head"
        )
    g_t = t.num_attention_heads // t.num_key_value_heads
    if s.num_key_value_heads and s.num_attention_heads // max(s.num_key_value_heads, 1) > g_t:
        out.append(
            f"{s.num_attention_heads} query heads over {s.num_key_value_heads} KV heads is "
            f"{s.num_attention_heads // s.num_key_value_heads} per group, more than the teacher's {g_t}; "
            "keep at least num_attention_heads / group size KV heads"
        )
    fam = FAMILIES[cfg["model_type"]]
    out += fam.shape_problems(cfg, s.as_dict())
    if fam.hidden_multiple_of_heads and s.num_attention_heads and s.hidden_size % s.num_attention_heads:
        out.append(
            f"hidden_size={s.hidden_size} is not a multiple of num_attention_heads={s.num_attention_heads}: "
            f"transformers' {fam.label} config refuses that shape"
        )
    for k in ("hidden_size", "intermediate_size"):
        v = getattr(s, k)
        if v != getattr(t, k) and v % align:
            out.append(f"{k}={v} is not a multiple of align={align}; use {_align_down(v, align)} or set align")
    return out


def plan_explicit(cfg: dict, sizes: dict, align: int = 8) -> Plan:
    """Shape from explicit sizes (missing ones keep the teacher's); PlanError lists every problem."""
    t = teacher_shape(cfg)
    unknown = set(sizes) - set(SIZE_KEYS)
    if unknown:
        raise PlanError([f"unknown size key(s) {sorted(unknown)}; use {', '.join(SIZE_KEYS)}"])
    s = Shape(**{k: sizes.get(k) if sizes.get(k) is not None else getattr(t, k) for k in SIZE_KEYS})
    problems = check_shape(cfg, s, align)
    if problems:
        raise PlanError(problems)
    return Plan(s, count_params(cfg, s), count_params(cfg), ["explicit sizes", _embedding_reason(cfg, s)])


def _heads_for(t: Shape, scale: float) -> tuple[int, int]:
    """(query heads, KV heads) at about ``scale`` of the teacher's, keeping whole, equal groups."""
    g = t.num_attention_heads // t.num_key_value_heads
    want = max(1, round(t.num_attention_heads * scale))
    best = None
    for kv in range(1, t.num_key_value_heads + 1):
        for per in range(1, g + 1):
            nh = kv * per
            # prefer the head count nearest the target, then more KV heads (GQA quality), then fewer query heads
            key = (abs(nh - want), -kv, nh)
            if best is None or key < best[0]:
                best = (key, nh, kv)
    return best[1], best[2]


def _hidden_step(cfg: dict, heads: int, align: int) -> int:
    """The step a planned hidden size moves in: ``align``, or lcm(align, heads) where the family's config
    needs hidden % heads == 0 (Llama)."""
    return math.lcm(align, heads) if FAMILIES[cfg["model_type"]].hidden_multiple_of_heads else align


def _fill_width(cfg: dict, t: Shape, found: Plan, budget: int, align: int) -> Plan:
    """Spend what alignment left of the budget. One width factor moves hidden in steps of ``h_align``
    (lcm(align, heads) where the family needs hidden % heads == 0: 72 on SmolLM2 with 9 heads kept), so the
    shape can fall far below the budget (SmolLM2, 9 heads, 0.35: 0.263x). With the bisection's heads fixed,
    every aligned hidden size gets the largest aligned MLP that fits; the most balanced shape wins (the
    largest min(hidden / teacher's, MLP / teacher's), the bisection's own criterion), then the larger one.
    The bisection's shape is a candidate, so the result is never less balanced and, at equal balance,
    never smaller."""
    s0 = found.shape
    h_align = _hidden_step(cfg, s0.num_attention_heads, align)
    hiddens = set(range(h_align, t.hidden_size + 1, h_align)) | {t.hidden_size}
    mlps = sorted(set(range(align, t.intermediate_size + 1, align)) | {t.intermediate_size})

    def shape(h: int, i: int) -> Shape:
        return Shape(h, i, s0.num_attention_heads, s0.num_key_value_heads, s0.num_hidden_layers)

    best_key, best = None, found
    for h in sorted(hiddens):
        if count_params(cfg, shape(h, mlps[0])) > budget:
            break  # parameters grow with hidden
        lo, hi = 0, len(mlps) - 1  # the largest MLP size that fits (parameters grow with it)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count_params(cfg, shape(h, mlps[mid])) <= budget:
                lo = mid
            else:
                hi = mid - 1
        s = shape(h, mlps[lo])
        if check_shape(cfg, s, align):
            continue
        p = count_params(cfg, s)
        key = (min(h / t.hidden_size, s.intermediate_size / t.intermediate_size), p)
        if best_key is None or key > best_key:
            best_key, best = key, Plan(s, p, found.teacher_params, list(found.reasons))
    if best.shape != s0:
        best.reasons.append(
            f"filled the budget: hidden {s0.hidden_size} -> {best.shape.hidden_size}, MLP "
            f"{s0.intermediate_size} -> {best.shape.intermediate_size} (one factor left "
            f"{found.params:,} parameters, {found.fraction:.3f}x)"
        )
    return best


def _fixed_hidden(cfg: dict, t: Shape, found: Plan, budget: int, align: int, hidden_fraction: float) -> Plan:
    """``found``'s heads and depth at hidden ``hidden_fraction`` of the teacher's (aligned down; the family's
    step), with the largest aligned MLP that fits the budget (raises PlanError when none does)."""
    s0 = found.shape
    h = min(
        t.hidden_size, _align_down(t.hidden_size * hidden_fraction, _hidden_step(cfg, s0.num_attention_heads, align))
    )
    mlps = [m for m in sorted(set(range(align, t.intermediate_size + 1, align)) | {t.intermediate_size}, reverse=True)]
    for m in mlps:
        s = Shape(h, m, s0.num_attention_heads, s0.num_key_value_heads, s0.num_hidden_layers)
        if count_params(cfg, s) <= budget and not check_shape(cfg, s, align):
            return Plan(
                s,
                count_params(cfg, s),
                found.teacher_params,
                [
                    *found.reasons,
                    f"hidden_fraction={hidden_fraction}: hidden {h} ({h / t.hidden_size:.3f} of the teacher's), the MLP "
                    f"fills the budget: {m} ({m / t.intermediate_size:.3f}); the balanced fill gave hidden "
                    f"{s0.hidden_size}, MLP {s0.intermediate_size}",
                ],
            )
    smallest = Shape(h, align, s0.num_attention_heads, s0.num_key_value_heads, s0.num_hidden_layers)
    raise PlanError(
        [
            f"hidden_fraction={hidden_fraction} (hidden {h}) leaves no MLP inside the budget of {budget:,} parameters "
            f"(the smallest MLP gives {count_params(cfg, smallest):,}): lower hidden_fraction, raise the budget, or "
            "leave hidden_fraction unset (one factor for hidden and MLP)"
        ]
    )


def plan_budget(
    cfg: dict,
    *,
    params: int | None = None,
    fraction: float | None = None,
    bytes_: int | None = None,
    bytes_per_param: float = 4.0,
    strategy: str = "width",
    align: int = 8,
    prune_heads: bool = True,
    depth: int | None = None,
    hidden_fraction: float | None = None,
) -> Plan:
    """The largest uniform shape whose parameter count fits the budget.

    ``strategy="width"`` scales hidden, MLP and (if ``prune_heads``) attention heads by one factor
    (Minitron: width pruning retains more accuracy than depth pruning at the same size), at the teacher's
    depth or at ``depth`` layers (the layers whose blocks change the residual stream most are kept; the
    width then fills what the dropped layers free: Minitron's combined depth + width);
    ``"depth"`` drops whole layers and keeps widths. Exactly one of params / fraction / bytes_.
    ``hidden_fraction`` (width only): the hidden size (residual stream) at that share of the teacher's and
    the MLP filling the rest of the budget, instead of the most balanced shape.
    """
    given = [x is not None for x in (params, fraction, bytes_)]
    if sum(given) != 1:
        raise PlanError(["give exactly one budget: params, fraction or bytes"])
    if cfg.get("model_type") not in FAMILIES:
        raise PlanError(
            [f"model_type {cfg.get('model_type')!r} is not supported for pruning; supported: {families.supported()}"]
        )
    teacher_params = count_params(cfg)
    budget = (
        params
        if params is not None
        else (int(fraction * teacher_params) if fraction is not None else int(bytes_ / bytes_per_param))
    )
    t = teacher_shape(cfg)
    if strategy not in ("width", "depth"):
        raise PlanError([f"strategy {strategy!r}: use width or depth"])
    if depth is not None:
        if strategy == "depth":
            raise PlanError(
                [
                    f"depth={depth} with strategy=depth: that strategy picks the depth from the budget; "
                    "use strategy=width to fill the budget at that depth, or leave depth unset"
                ]
            )
        if not 1 <= depth <= t.num_hidden_layers:
            raise PlanError([f"depth={depth}: must be between 1 and the teacher's {t.num_hidden_layers}"])
    if hidden_fraction is not None:
        if strategy != "width":
            raise PlanError(
                [f"hidden_fraction={hidden_fraction} with strategy={strategy}: it sets a width; use strategy=width"]
            )
        if not 0 < hidden_fraction <= 1:
            raise PlanError(
                [f"hidden_fraction={hidden_fraction}: must be in (0, 1], a share of the teacher's hidden size"]
            )
    layers = depth or t.num_hidden_layers
    if budget >= teacher_params and layers == t.num_hidden_layers:
        return Plan(
            t, teacher_params, teacher_params, [f"budget {budget:,} >= teacher {teacher_params:,}: nothing to prune"]
        )
    best: Plan | None = None
    if strategy == "depth":
        for n in range(t.num_hidden_layers, 0, -1):
            s = Shape(t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, n)
            p = count_params(cfg, s)
            if p <= budget:
                best = Plan(
                    s, p, teacher_params, [f"depth: keep {n} of {t.num_hidden_layers} layers, widths unchanged"]
                )
                break
    else:
        lo, hi = 0.0, 1.0
        for _ in range(40):  # bisection on the width factor
            mid = (lo + hi) / 2
            nh, kv = _heads_for(t, mid) if prune_heads else (t.num_attention_heads, t.num_key_value_heads)
            h_align = _hidden_step(cfg, nh, align)
            s = Shape(
                _align_down(t.hidden_size * mid, h_align),
                _align_down(t.intermediate_size * mid, align),
                nh,
                kv,
                layers,
            )
            p = count_params(cfg, s)
            if p <= budget:
                lo = mid
                if best is None or p > best.params:
                    best = Plan(
                        s,
                        p,
                        teacher_params,
                        [
                            f"width: hidden, MLP{' and heads' if prune_heads else ''} scaled by "
                            f"{mid:.3f}, aligned to multiples of {align}; "
                            + (
                                "depth unchanged"
                                if layers == t.num_hidden_layers
                                else f"depth: {layers} of {t.num_hidden_layers} layers, the ones that change the residual stream most"
                            )
                        ],
                    )
            else:
                hi = mid
        if best is not None:
            best = _fill_width(cfg, t, best, budget, align)
            if hidden_fraction is not None:
                best = _fixed_hidden(cfg, t, best, budget, align, hidden_fraction)
    if best is None:
        if strategy == "depth":
            narrow = Shape(t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, 1)
        else:
            narrow = Shape(align, align, 1, 1, layers)
        raise PlanError(
            [
                f"no {strategy} shape of this {cfg['model_type']} model fits {budget:,} parameters "
                f"({budget / teacher_params:.3f} of {teacher_params:,}); the smallest {strategy} shape has "
                f"{count_params(cfg, narrow):,}; raise the budget or use another strategy"
            ]
        )
    family_problems = FAMILIES[cfg["model_type"]].shape_problems(cfg, best.shape.as_dict())
    if family_problems:
        raise PlanError([f"the {strategy} budget's shape {best.shape.as_dict()}: {p}" for p in family_problems])
    best.reasons.append(
        f"{best.params:,} parameters = {best.fraction:.3f} of the teacher's {teacher_params:,} "
        f"(budget {budget:,}, {budget / teacher_params:.3f})"
    )
    if not math.isclose(best.fraction, budget / teacher_params, rel_tol=0.05):
        best.reasons.append("alignment and whole heads keep the shape below the budget")
    best.reasons.append(_embedding_reason(cfg, best.shape))
    return best
