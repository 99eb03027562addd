"""Recipes compared over training seeds: ``python -m distill.seeds NAME=RUN,RUN... NAME=RUN,RUN...``.

One run of a recipe is one draw of its seeds. On the SmolLM2 experiment two seeds of one recipe differ by
3-6 held-out points on 600 requests (BENCHMARKS.md section 24), more than most recipe changes, and
``python -m distill.compare``'s paired test on two runs says whether those two students differ, not
whether their recipes do. This reads several runs per recipe (runs that differ only in ``distill.compare.SEED_KEYS``)
and reports, per recipe and metric (exact match and tool accuracy, on the test split, the held-out split
and each held-out part): the mean over seeds, its share of the teacher's score, the seeds' spread (sample
standard deviation, min-max) beside one score's standard error from its number of examples (binomial), and for every
recipe against the first: the difference of means, Welch's t-test over the seeds (each run one
observation) and how many seeds per recipe would tell a difference that large at that spread (two-sided
5%, power 80%).

Runs of different recipes must share data, teacher and ``eval.num_test`` (else: exit 2 naming the run);
the config keys that make the artifact (``STUDENT_SECTIONS``, plus ``ONNX_SECTIONS`` for an ONNX variant)
and differ between recipes are listed (what the recipe changes); those that differ inside one recipe,
beyond the seeds, are warned about. Exit 0, or 2 on bad input::

    python -m distill.seeds logits=runs/a0,runs/a1,runs/a2 features=runs/b0,runs/b1,runs/b2 --plot seeds.png

A sweep whose jobs differ in a seed key (``python -m distill -m ... distill.train.seed=0,1,2``) gets the
same table and plot in its summary (``distill.sweep``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from statistics import NormalDist, fmean, variance

from distill.compare import SEED_KEYS, RunError, load_run
from export.gate import PER_EXAMPLE, examples_of

# the config sections that make a PyTorch student (the rest names, evaluates, exports or gates it); an ONNX
# artifact is also made by these two
STUDENT_SECTIONS, ONNX_SECTIONS = ("data", "teacher", "student", "distill"), ("export", "quantize")
METRICS = PER_EXAMPLE
# the stages whose minutes make a student (an ONNX variant adds its QAD, "qad:<variant>"): recipes compare at
# equal wall time on these, each as long as it took when it ran (a cached pool: when it was built)
MAKING_STAGES = (
    "augment",
    "general",
    "prune",
    "distill",
)  # compared on the test split, the held-out split and its parts
ALPHA, POWER = 0.05, 0.80  # the seeds-needed estimate: two-sided test at ALPHA with this power


class SeedsError(ValueError):
    pass


# ---- statistics (no scipy: Student's t from the regularized incomplete beta) ----


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (modified Lentz), as in Numerical Recipes' ``betacf``."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
            last = d * c
        if abs(last - 1.0) < 1e-14:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom (any real df > 0)."""
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def welch(a: list[float], b: list[float]) -> dict:
    """Welch's t-test of mean(b) - mean(a), each value one seed: {"diff", "t", "df", "p"}; p None with
    fewer than two seeds on either side, or no spread on both."""
    diff = fmean(b) - fmean(a)
    if len(a) < 2 or len(b) < 2:
        return {"diff": diff, "t": None, "df": None, "p": None}
    va, vb = variance(a) / len(a), variance(b) / len(b)
    if va + vb == 0.0:
        return {"diff": diff, "t": None, "df": None, "p": None if diff else 1.0}
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return {"diff": diff, "t": t, "df": df, "p": t_two_sided(t, df)}


def seeds_needed(diff: float, sd_a: float | None, sd_b: float | None) -> int | None:
    """Seeds per recipe for a two-sample test at ``ALPHA`` with ``POWER`` to tell ``diff`` at these spreads
    (normal approximation: 2 (z + z)^2 sd^2 / diff^2, sd^2 the mean of the two variances)."""
    if sd_a is None or sd_b is None or diff == 0.0:
        return None
    var = (sd_a**2 + sd_b**2) / 2
    normal = NormalDist()
    z = normal.inv_cdf(1 - ALPHA / 2) + normal.inv_cdf(POWER)
    return max(2, math.ceil(2 * z**2 * var / diff**2))


# ---- runs ----


def scores(metrics: dict, who: str) -> dict[str, tuple[float, int | None]]:
    """``{metric name: (value, examples)}`` of one artifact of a run's metrics.json: ``METRICS`` on the test
    split, the held-out split and each held-out part (``heldout[values].exact_match``); examples as the gate
    counts them (``export.gate.examples_of``; None where a run kept no slices)."""

    s = metrics[who]
    out = {}
    for name, split in (("", s), ("heldout.", s.get("heldout") or {})):
        n = examples_of(split)
        for m in METRICS:
            if isinstance(split.get(m), int | float):
                out[name + m] = (float(split[m]), n)
        for part, x in (split.get("slices") or {}).get("part", {}).items() if name else ():
            for m in METRICS:
                if isinstance(x.get(m), int | float):
                    out[f"heldout[{part}].{m}"] = (float(x[m]), x.get("n"))
    return out


def making_minutes(metrics: dict, artifact: str = "student") -> float:
    """Minutes the stages that make ``artifact`` took (``MAKING_STAGES``, and ``qad:<variant>`` for an ONNX
    variant), from a run's metrics.json."""
    variant = artifact.removeprefix("onnx_")
    total = 0.0
    for name, st in metrics.get("stages", {}).items():
        if name in MAKING_STAGES or (artifact != "student" and name == f"qad:{variant}"):
            total += st.get("seconds") or st.get("ran_seconds") or 0.0
    return total / 60


def _recipe_keys(run: dict, artifact: str) -> dict:
    """The config keys that make ``artifact`` (``STUDENT_SECTIONS``, and ``ONNX_SECTIONS`` for an ONNX
    variant), less the seeds."""
    from core.hashing import flatten

    sections = STUDENT_SECTIONS + (ONNX_SECTIONS if artifact != "student" else ())
    flat = flatten({k: v for k, v in run["config"].items() if k in sections})
    return {k: v for k, v in flat.items() if k not in SEED_KEYS}


def _seed_of(run: dict) -> str:
    from core.hashing import flatten

    flat = flatten(run["config"])
    return ",".join(f"{k.rsplit('.', 2)[-2]}={flat[k]}" for k in SEED_KEYS if k in flat and flat[k] != 0) or "0"


def compare_recipes(recipes: dict[str, list[str | Path]], artifact: str = "student") -> dict:
    """The comparison over seeds of ``recipes`` ({name: run folders}), the first the reference. Raises
    ``SeedsError`` (naming the run) when a folder cannot be read, lacks ``artifact``, or was scored on
    other data, another teacher or another ``eval.num_test`` than the first run."""
    if not recipes or any(not runs for runs in recipes.values()):
        raise SeedsError("give at least one recipe, each as NAME=RUN[,RUN...] (run folders)")
    loaded: dict[str, list[dict]] = {}
    first = None
    for name, folders in recipes.items():
        loaded[name] = []
        for folder in folders:
            try:
                run = load_run(folder)
            except RunError as err:
                raise SeedsError(f"recipe {name}: {err}") from None
            if artifact not in run["metrics"]:
                have = ", ".join(k for k in run["metrics"] if k == "student" or k.startswith("onnx_"))
                raise SeedsError(f"recipe {name}: {folder} has no {artifact!r} in metrics.json (it has: {have})")
            first = first or run
            for key, what in (("data_hash", "data"), ("teacher_hash", "teacher")):
                if run["metrics"].get(key) != first["metrics"].get(key):
                    raise SeedsError(
                        f"recipe {name}: {folder} was scored with other {what} ({key} {run['metrics'].get(key)}) "
                        f"than {first['folder']} ({first['metrics'].get(key)}): recipes compare on one data set "
                        "and one teacher; rerun it with the same data and teacher"
                    )
            nt = run["config"].get("eval", {}).get("num_test")
            if nt != first["config"].get("eval", {}).get("num_test"):
                raise SeedsError(
                    f"recipe {name}: {folder} has eval.num_test={nt}, {first['folder']} "
                    f"{first['config'].get('eval', {}).get('num_test')}: score every run on the same examples"
                )
            twin = next((r for r in loaded[name] if _seed_of(r) == _seed_of(run)), None)
            if twin is not None:
                raise SeedsError(
                    f"recipe {name}: {twin['folder']} and {folder} have the same seeds ({_seed_of(run)}): one draw "
                    "counted twice; give each recipe runs of different seeds (distill.train.seed=...)"
                )
            loaded[name].append(run)

    teacher = scores(first["metrics"], "teacher")
    per = {name: [scores(r["metrics"], artifact) for r in runs] for name, runs in loaded.items()}
    names = list(per)
    metrics = [m for m in per[names[0]][0] if all(m in s for runs in per.values() for s in runs)]
    table = []
    ref = names[0]
    for m in metrics:
        for name in names:
            values = [s[m][0] for s in per[name]]
            n_eval = per[name][0][m][1]
            mean = fmean(values)
            sd = math.sqrt(variance(values)) if len(values) > 1 else None
            row = {
                "metric": m,
                "recipe": name,
                "seeds": len(values),
                "values": values,
                "mean": mean,
                "of_teacher": mean / teacher[m][0] if m in teacher and teacher[m][0] else None,
                "sd": sd,
                "eval_sd": math.sqrt(mean * (1 - mean) / n_eval) if n_eval else None,
                "min": min(values),
                "max": max(values),
            }
            if name != ref:
                a = [s[m][0] for s in per[ref]]
                w = welch(a, values)
                ref_sd = math.sqrt(variance(a)) if len(a) > 1 else None
                row |= {"vs": ref, "ref_seeds": len(a), "diff": w["diff"], "p": w["p"], "df": w["df"]}
                row["seeds_needed"] = seeds_needed(w["diff"], ref_sd, sd)
            table.append(row)

    recipe_keys = {name: [_recipe_keys(r, artifact) for r in runs] for name, runs in loaded.items()}
    within = {}
    for name, keys in recipe_keys.items():
        differ = sorted({k for cfg in keys[1:] for k in cfg.keys() | keys[0].keys() if cfg.get(k) != keys[0].get(k)})
        if differ:
            within[name] = differ
    base = recipe_keys[ref][0]
    changes = {}
    for name in names[1:]:
        cfg = recipe_keys[name][0]
        changes[name] = [
            (k, base.get(k), cfg.get(k)) for k in sorted(base.keys() | cfg.keys()) if base.get(k) != cfg.get(k)
        ]
    return {
        "artifact": artifact,
        "reference": ref,
        "runs": {
            name: [
                {"folder": str(r["folder"]), "seed": _seed_of(r), "minutes": making_minutes(r["metrics"], artifact)}
                for r in runs
            ]
            for name, runs in loaded.items()
        },
        "teacher": {m: v for m, (v, _) in teacher.items()},
        "rows": table,
        "changes": changes,
        "within": within,
    }


def verdict(row: dict) -> str:
    if "vs" not in row:
        return "reference"
    if row["p"] is None:
        return "one seed: cannot tell" if min(row["seeds"], row["ref_seeds"]) < 2 else "no spread between seeds"
    return "differs" if row["p"] < ALPHA else "within the seeds' spread"


def _f(x, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x * 100:+.1f}" if pct else f"{x:.3f}"


def render(c: dict, plot: str | None = None) -> str:
    lines = [f"## Recipes over seeds ({c['artifact']}; reference: {c['reference']})", ""]
    for name, runs in c["runs"].items():
        minutes = fmean([r["minutes"] for r in runs])
        lines.append(
            f"- {name}: " + ", ".join(f"{r['folder']} (seed {r['seed']})" for r in runs) + f"; {minutes:.1f} minutes "
            f"making the {c['artifact']} on the mean ({', '.join(MAKING_STAGES)}"
            + (", its QAD)" if c["artifact"] != "student" else ")")
        )
    for name, ch in c["changes"].items():
        shown = "; ".join(f"{k}: {a} -> {b}" for k, a, b in ch[:12]) + (
            f"; ... {len(ch) - 12} more" if len(ch) > 12 else ""
        )
        lines.append(f"- {name} changes against {c['reference']}: {shown or 'nothing beyond the seeds'}")
    for name, keys in c["within"].items():
        lines.append(f"- WARNING: the runs of {name} differ beyond the seeds in {', '.join(keys[:12])}")
    lines += [
        "",
        "Each run is one observation: `sd` is the spread between seeds, `eval sd` the standard error of one "
        "run's score from its number of examples (binomial: how far other examples of the same kind could "
        "move it); `p`: Welch's t-test over the seeds against the "
        f"reference; `seeds`: per recipe, to tell that difference at that spread (two-sided {ALPHA:g}, power "
        f"{POWER:g}).",
        "",
        "| metric | recipe | n | mean | of teacher | sd | eval sd | min-max | vs ref (points) | p | verdict | seeds |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|",
    ]
    for r in c["rows"]:
        p = "-" if r.get("p") is None else f"{r['p']:.3g}"
        lines.append(
            f"| {r['metric']} | {r['recipe']} | {r['seeds']} | {_f(r['mean'])} | {_f(r['of_teacher'])} | "
            f"{_f(r['sd'])} | {_f(r['eval_sd'])} | {r['min']:.3f}-{r['max']:.3f} | {_f(r.get('diff'), pct=True)} | "
            f"{p} | {verdict(r)} | {r.get('seeds_needed') or '-'} |"
        )
    if plot:
        lines += ["", f"![recipes over seeds]({plot})"]
    return "\n".join(lines) + "\n"


def plot(c: dict, path: str | Path) -> Path | None:
    """Every seed as a dot and the recipe's mean as a bar, per exact-match metric (test, held-out, parts)."""
    metrics = [m for m in dict.fromkeys(r["metric"] for r in c["rows"]) if m.endswith("exact_match")]
    if not metrics:
        return None
    from matplotlib.figure import Figure

    names = list(c["runs"])
    fig = Figure(figsize=(2.4 * len(metrics) + 1, 3.8))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics, strict=True):
        rows = {r["recipe"]: r for r in c["rows"] if r["metric"] == m}
        for i, name in enumerate(names):
            r = rows[name]
            ax.scatter([i] * len(r["values"]), r["values"], color=f"C{i % 10}", s=22, zorder=3)
            ax.hlines(r["mean"], i - 0.3, i + 0.3, color=f"C{i % 10}", linewidth=2)
        if m in c["teacher"]:
            ax.axhline(c["teacher"][m], color="gray", linestyle="--", linewidth=1, label="teacher")
        ax.set_xticks(range(len(names)), [n[:14] for n in names], rotation=30, fontsize=7)
        ax.set_title(m, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{c['artifact']}: each seed a dot, the mean a bar")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def parse_recipe(item: str) -> tuple[str, list[str]]:
    name, sep, runs = item.partition("=")
    folders = [r for r in runs.split(",") if r]
    if not sep or not name or not folders:
        raise SeedsError(f"{item!r}: give each recipe as NAME=RUN[,RUN...] (run folders, one per seed)")
    return name, folders


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill.seeds", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "recipes", nargs="+", metavar="NAME=RUN,RUN...", help="a recipe's run folders; the first the reference"
    )
    ap.add_argument("--artifact", default="student", help="student (PyTorch) or an ONNX variant, e.g. onnx_int4_qad")
    ap.add_argument("--plot", help="also write the plot to this PNG")
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = ap.parse_args(argv)
    try:
        recipes = dict(parse_recipe(item) for item in args.recipes)
        if len(recipes) != len(args.recipes):
            raise SeedsError("two recipes have one name: name each recipe once")
        c = compare_recipes(recipes, args.artifact)
    except SeedsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    png = plot(c, args.plot) if args.plot else None
    print(json.dumps(c, indent=2) if args.json else render(c, str(png) if png else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
