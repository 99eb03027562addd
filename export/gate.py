"""The release gate: thresholds against numbers measured on the shipped artifact -> a verdict with reasons.

Pure Python (no torch, no onnxruntime): it only compares numbers, so a nightly job or a notebook can
re-judge a ``metrics.json`` with other thresholds.

Each check compares one number of a variant (e.g. ``onnx_int8``) with its threshold. ``relative``
checks divide the variant's number by the teacher's own (PyTorch) number first: "keep at least 97% of
the teacher's exact match" is ``exact_match`` relative, at least 0.97. A check reads the in-distribution
``test`` split (the top level of a variant's metrics) or the ``heldout`` split (requests unlike training:
``metrics["heldout"]``), and a ``per`` slice check one number for each value of a slice of that split:
each part of the held-out split (``metrics["heldout"]["slices"]["part"]``: unseen values, unseen
phrasings, both), so a student that copies no unseen name fails however well it does on the rest; single-
and multi-turn conversations of function-calling data (``slices["turns"]``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# the per-example metrics (each example right or wrong) whose checks state their evaluation's own error:
# a 95% Wilson interval from the number of examples the number comes from
PER_EXAMPLE = ("exact_match", "tool_accuracy", "openvino_match")
# those measured on a part of their split keep their own count beside them, ``<metric>_n`` (OpenVINO runs
# on the first export.openvino_examples of each split); without it a check states no error
OWN_COUNT = ("openvino_match",)
Z95 = 1.959964


@dataclass
class Check:
    variant: str
    metric: str  # e.g. exact_match, agreement, kl; heldout/exact_match, heldout[values]/exact_match
    value: float  # what was measured (relative to the teacher where ``relative``)
    threshold: float
    op: str  # ">=" or "<="
    relative: bool
    passed: bool
    note: str = ""  # why a check failed other than by its number (e.g. a teacher with nothing to retain)
    name: str = ""  # the threshold (THRESHOLDS key) this check applies
    n: int | None = None  # examples the value comes from (PER_EXAMPLE metrics)
    error: float | None = None  # half-width of the value's 95% interval from those examples, in its units

    @property
    def uncertain(self) -> bool:
        """The verdict lies within the evaluation's own 95% error: more examples could turn it."""
        return self.error is not None and not self.note and abs(self.margin) < self.error

    @property
    def margin(self) -> float:
        """How far inside (positive) or outside (negative) the threshold the value is."""
        return self.value - self.threshold if self.op == ">=" else self.threshold - self.value

    def describe(self) -> str:
        what = f"{self.metric} / teacher's" if self.relative else self.metric
        verdict = "ok" if self.passed else f"FAILED, {'short' if self.op == '>=' else 'over'} by {abs(self.margin):.4f}"
        if self.note:
            verdict = f"FAILED: {self.note}"
        elif self.uncertain:
            verdict += f" (within the evaluation's 95% error, ±{self.error:.4f} on {self.n} examples)"
        return f"{self.variant}: {what} = {self.value:.4f} (needs {self.op} {self.threshold:.4f}): {verdict}"


@dataclass
class GateResult:
    passed: bool
    checks: list[Check] = field(default_factory=list)
    min_teacher_score: float = 0.0

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    @property
    def uncertain(self) -> list[Check]:
        return [c for c in self.checks if c.uncertain]

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "min_teacher_score": self.min_teacher_score,
            "checks": [{**asdict(c), "margin": c.margin, "uncertain": c.uncertain} for c in self.checks],
            "failed": [c.describe() for c in self.failures],
            "uncertain": [c.describe() for c in self.uncertain],
            "summary": self.describe(),
        }

    def describe(self) -> str:
        head = (
            "release gate PASSED"
            if self.passed
            else f"release gate FAILED ({len(self.failures)} of {len(self.checks)} checks)"
        )
        if self.uncertain:
            head += (
                f" ({len(self.uncertain)} within the evaluation's 95% error: more examples (eval.num_test) would "
                "settle them)"
            )
        return "\n".join([head, *(f"  - {c.describe()}" for c in self.checks)])


@dataclass(frozen=True)
class Threshold:
    """One gate check: the measured ``metric``, compared with ``op`` against the threshold, after dividing
    by the teacher's own number when ``relative``. ``unit``: the threshold lies in [0, 1]. ``tool_calls``:
    the metric exists only on tool-call data (``distill.metrics.TOOL_CALL_METRICS``)."""

    metric: str
    op: str  # ">=" or "<="
    relative: bool
    unit: bool
    tool_calls: bool = False
    split: str = "test"  # test (in distribution) | heldout (unlike training)
    per: str = (
        ""  # one check per value of this slice of the split (e.g. "part": slices["part"]); the whole split if none
    )


# export.openvino_arithmetic: what ONNX Runtime's answers come from in the OpenVINO check that
# min_openvino_match judges. matched: the same file at the accuracy_level whose activation arithmetic OpenVINO
# uses on this CPU (the check judges the file, not this CPU's int8 instructions); shipped: the file as shipped.
OPENVINO_ARITHMETIC = ("matched", "shipped")

# The one list of gate thresholds: conf/gate/default.yaml sets each (null disables it), the config
# schema's GateConfig, the CLI below, sweeps and notebooks are derived from it.
THRESHOLDS: dict[str, Threshold] = {
    "min_exact_match_retention": Threshold("exact_match", ">=", relative=True, unit=False),
    "min_tool_accuracy_retention": Threshold("tool_accuracy", ">=", relative=True, unit=False, tool_calls=True),
    "min_arg_f1_retention": Threshold("arg_f1", ">=", relative=True, unit=False, tool_calls=True),
    "min_token_f1_retention": Threshold("token_f1", ">=", relative=True, unit=False),
    "min_valid_json": Threshold("valid_json", ">=", relative=False, unit=True, tool_calls=True),
    "min_agreement": Threshold("agreement", ">=", relative=False, unit=True),
    "max_kl": Threshold("kl", "<=", relative=False, unit=False),
    "min_openvino_match": Threshold("openvino_match", ">=", relative=False, unit=True),
    "min_heldout_exact_match_retention": Threshold("exact_match", ">=", relative=True, unit=False, split="heldout"),
    "min_heldout_tool_accuracy_retention": Threshold(
        "tool_accuracy", ">=", relative=True, unit=False, tool_calls=True, split="heldout"
    ),
    "min_heldout_part_retention": Threshold(
        "exact_match", ">=", relative=True, unit=False, split="heldout", per="part"
    ),
    # function calling (BFCL-style, distill.metrics): measured where references make calls
    "min_schema_validity": Threshold("schema_validity", ">=", relative=False, unit=True, tool_calls=True),
    "max_hallucinated_function_rate": Threshold(
        "hallucinated_function_rate", "<=", relative=False, unit=True, tool_calls=True
    ),
    "max_missed_call_rate": Threshold("missed_call_rate", "<=", relative=False, unit=True, tool_calls=True),
    "max_extra_call_rate": Threshold("extra_call_rate", "<=", relative=False, unit=True, tool_calls=True),
    "min_turns_retention": Threshold("exact_match", ">=", relative=True, unit=False, per="turns"),
}
SPLITS = ("test", "heldout")


def _numbers(m: dict, spec: Threshold) -> dict[str, dict]:
    """Label -> the metrics a check of ``spec`` reads in ``m`` (a variant's or the teacher's metrics)."""
    where = m if spec.split == "test" else (m.get("heldout") or {})
    prefix = "" if spec.split == "test" else "heldout"
    if not spec.per:
        return {f"{prefix}/{spec.metric}" if prefix else spec.metric: where}
    groups = where.get("slices", {}).get(spec.per)
    if not groups:
        return {f"{prefix}/{spec.metric}" if prefix else spec.metric: where}
    return {f"{prefix or spec.split}[{v}]/{spec.metric}": row for v, row in groups.items()}


def examples_of(split: dict) -> int | None:
    """How many examples a split's numbers (or a slice row's) come from: its ``n``, else the sum over its
    first slice (every example is in one value of each slice); None where neither was kept."""
    if isinstance(split.get("n"), int):
        return split["n"]
    first = next(iter((split.get("slices") or {}).values()), None)
    return sum(row["n"] for row in first.values()) if first else None


def examples_for(row: dict, metric: str) -> int | None:
    """How many examples ``row``'s ``metric`` comes from, for a ``PER_EXAMPLE`` metric; else None."""
    if metric not in PER_EXAMPLE:
        return None
    if metric in OWN_COUNT:
        n = row.get(f"{metric}_n")
        return n if isinstance(n, int) else None
    return examples_of(row)


def wilson_error(p: float, n: int) -> float:
    """Half-width of the 95% Wilson score interval of a proportion ``p`` of ``n`` examples (not 0 at p = 0 or 1:
    8 right of 8 is not a certain 1.0)."""
    z2 = Z95 * Z95
    return Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)


def thresholds_of(gate_cfg) -> dict[str, float | None]:
    """Threshold name -> value from a gate config (a dataclass, dict or DictConfig)."""
    get = gate_cfg.get if hasattr(gate_cfg, "get") else lambda k, d=None: getattr(gate_cfg, k, d)
    return {k: get(k) for k in THRESHOLDS}


def evaluate_gate(
    teacher: dict, measured: dict[str, dict], thresholds: dict[str, float | None], min_teacher_score: float
) -> GateResult:
    """Judge each variant in ``measured`` (name -> metrics) against ``thresholds`` (name -> value or
    None to skip). A metric the variant does not have fails its check (a gate must not pass on a
    number nobody measured), and so does a relative check whose teacher scores below
    ``min_teacher_score`` on that metric: there is nothing to retain, whatever the student does."""
    unknown = set(thresholds) - set(THRESHOLDS)
    if unknown:
        raise ValueError(f"unknown gate thresholds {sorted(unknown)}; known: {sorted(THRESHOLDS)}")
    if not measured:
        raise ValueError("the gate needs at least one measured variant")
    checks = []
    for variant, m in measured.items():
        for name, threshold in thresholds.items():
            if threshold is None:
                continue
            spec = THRESHOLDS[name]
            op, relative = spec.op, spec.relative
            mine, theirs = _numbers(m, spec), _numbers(teacher, spec)
            for label in sorted(theirs) if spec.per else mine:  # the slices the teacher was measured on
                row = mine.get(label, {})
                value = row.get(spec.metric)
                n = examples_for(row, spec.metric)
                error = wilson_error(value, n) if n and value is not None else None
                if value is None:
                    checks.append(
                        Check(variant, label, float("nan"), threshold, op, relative, False, "not measured", name)
                    )
                    continue
                if relative:
                    t = theirs.get(label, {}).get(spec.metric) or 0.0
                    if t < min_teacher_score or t <= 0:
                        note = (
                            f"the teacher scores {t:.4f} on {label} (below gate.min_teacher_score={min_teacher_score}): "
                            "there is nothing to retain; fix the teacher (or its data) before gating a student on it"
                        )
                        checks.append(
                            Check(variant, label, float("nan"), float(threshold), op, True, False, note, name)
                        )
                        continue
                    value = value / t
                    error = error / t if error is not None else None  # the teacher's score as the fixed reference
                ok = value >= threshold if op == ">=" else value <= threshold
                checks.append(
                    Check(variant, label, float(value), float(threshold), op, relative, bool(ok), "", name, n, error)
                )
    return GateResult(all(c.passed for c in checks), checks, min_teacher_score)


def main(argv: list[str] | None = None) -> int:
    """``python -m export.gate DIR/metrics.json --max-kl 0.02 ...``: judge a finished run again with other
    thresholds (those not given come from the run's own gate); exit 0 passed, 3 failed."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m export.gate", description=main.__doc__)
    ap.add_argument("metrics", help="a run's metrics.json")
    ap.add_argument("--variants", nargs="+", help="variants to judge, e.g. onnx_int8 onnx_int4")
    for name in THRESHOLDS:
        ap.add_argument("--" + name.replace("_", "-"), type=float, dest=name)
    ap.add_argument("--min-teacher-score", type=float, help="default: the run's own (gate.min_teacher_score)")
    a = ap.parse_args(argv)
    m = json.loads(open(a.metrics).read())
    previous = {c.get("name") or c["metric"]: c for c in m.get("gate", {}).get("checks", [])}
    thresholds = {}
    for name, spec in THRESHOLDS.items():
        given = getattr(a, name)
        old = previous.get(name) or (
            previous.get(spec.metric) if spec.split == "test" else None
        )  # older runs: by metric
        thresholds[name] = given if given is not None else (old["threshold"] if old else None)
    variants = (
        a.variants
        or sorted({c["variant"] for c in m.get("gate", {}).get("checks", [])})
        or [k for k in m if k.startswith("onnx_")]
    )
    missing = [v for v in variants if v not in m]
    if missing:
        print(f"{a.metrics} has no {', '.join(missing)}; it has {', '.join(k for k in m if k.startswith('onnx_'))}")
        return 2
    floor = a.min_teacher_score
    if floor is None:  # the run's own; runs written before the floor existed had none
        floor = m.get("gate", {}).get("min_teacher_score", 0.0)  # not a knob: an older metrics.json
    result = evaluate_gate(m["teacher"], {v: m[v] for v in variants}, thresholds, floor)
    print(result.describe())
    return 0 if result.passed else 3


if __name__ == "__main__":
    raise SystemExit(main())
