"""``python -m distill.compare RUN_A RUN_B``: what changed between two runs, and whether B regressed.

Prints the config keys that differ, the data / teacher / student hashes and library versions, then every
metric of the student and its ONNX variants side by side (A, B, change; accuracy on the heldout split too),
sizes and latency, and the gate.
Exit code 1 when a metric of B is worse than A's by more than its tolerance (or B's gate failed where A's
passed), 0 otherwise, 2 when a run folder cannot be read. For use after a nightly run::

    python -m distill.compare outputs/car_assistant/2026-11-22 outputs/car_assistant/2026-11-23

Tolerances (``--tolerance NAME=VALUE``, repeatable): absolute drops for accuracy-like metrics, relative
increases for costs. Latency is measured on shared machines: its default tolerance is loose (25%).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from core.hashing import flatten

# metric -> (direction, kind, default tolerance): "up" = higher is better; "abs" / "rel" tolerance
RULES: dict[str, tuple[str, str, float]] = {
    "exact_match": ("up", "abs", 0.01),
    "tool_accuracy": ("up", "abs", 0.01),
    "arg_f1": ("up", "abs", 0.01),
    "valid_json": ("up", "abs", 0.01),
    "schema_validity": ("up", "abs", 0.01),
    "missed_call_rate": ("down", "abs", 0.01),
    "extra_call_rate": ("down", "abs", 0.01),
    "hallucinated_function_rate": ("down", "abs", 0.01),
    "agreement": ("up", "abs", 0.01),
    "kl": ("down", "rel", 0.25),
    "perplexity": ("down", "rel", 0.05),
    "bytes": ("down", "rel", 0.05),
    "ms_per_token": ("down", "rel", 0.25),
    "prefill_ms": ("down", "rel", 0.25),
}
HELDOUT = ("exact_match", "tool_accuracy", "arg_f1", "agreement", "kl")  # also compared on the heldout split
# Below these absolute changes a relative increase is noise (KL of a near-perfect student, a few bytes).
FLOORS = {"kl": 0.002, "perplexity": 0.01, "bytes": 4096, "ms_per_token": 0.05, "prefill_ms": 0.2}


# the keys that draw a recipe's randomness without changing the recipe (the order of batches, the extra pools'
# draws, a from-scratch student's initialisation); data.seed changes the data and the teacher. Two runs that
# differ only in these are one recipe twice (distill.seeds compares recipes over them).
SEED_KEYS = ("distill.train.seed", "distill.augment.seed", "distill.general.seed", "student.seed")
ALPHA = 0.05  # a paired difference with McNemar's p above this is reported as possibly noise


class RunError(ValueError):
    pass


def load_run(folder: str | Path) -> dict:
    import yaml

    folder = Path(folder)
    if not folder.is_dir():
        raise RunError(f"{folder} is not a folder; give two run folders (hydra.run.dir of each run)")
    mf = folder / "metrics.json"
    if not mf.is_file():
        raise RunError(f"{folder} has no metrics.json: the run did not finish (rerun it, it resumes) or is not a run")
    try:
        metrics = json.loads(mf.read_text())
    except json.JSONDecodeError as err:
        raise RunError(f"{mf} is not valid JSON ({err})") from err
    cfg_path, man_path = folder / "config.yaml", folder / "manifest.json"
    return {
        "folder": folder,
        "metrics": metrics,
        "config": yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {},
        "manifest": json.loads(man_path.read_text()) if man_path.is_file() else {},
    }


def artifacts(metrics: dict) -> list[str]:
    return ["student"] + [k for k in metrics if k.startswith("onnx_")]


def judge(metric: str, a: float, b: float, tolerance: float) -> str:
    """``regressed`` / ``improved`` / ``same`` for one metric of B against A."""
    direction, kind, _ = RULES[metric]
    worse = (a - b) if direction == "up" else (b - a)  # positive = B is worse
    if kind == "abs":
        limit = tolerance
    else:
        limit = max(tolerance * abs(a), FLOORS.get(metric, 0.0))
    if worse > limit:
        return "regressed"
    if -worse > limit:
        return "improved"
    return "same"


def mcnemar_p(lost: int, gained: int) -> float:
    """McNemar's exact two-sided p-value for paired right / wrong answers: the chance of a split of the
    ``lost + gained`` discordant examples at least this uneven if each were equally likely either way
    (binomial with p = 1/2). Examples both runs get right, or both wrong, say nothing about the difference."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _miss_keys(rows: list[dict]) -> Counter:
    return Counter(json.dumps([m.get("request"), m.get("reference")], sort_keys=True, default=str) for m in rows)


def paired(misses_a: dict, misses_b: dict) -> dict:
    """Per split, on the same examples: ``lost`` (A right, B wrong), ``gained`` (A wrong, B right) and
    McNemar's exact p. ``misses_*``: an evaluation folder's ``misses.json`` ({split: [miss, ...]}; a miss is
    keyed by its request and reference)."""
    out = {}
    for split in sorted(misses_a.keys() & misses_b.keys()):
        ka, kb = _miss_keys(misses_a[split]), _miss_keys(misses_b[split])
        lost, gained = sum((kb - ka).values()), sum((ka - kb).values())
        out[split] = {"lost": lost, "gained": gained, "p": mcnemar_p(lost, gained)}
    return out


def paired_runs(a: dict, b: dict) -> tuple[dict, str | None]:
    """``paired`` for every artifact both runs evaluated, or ({}, why not) when the runs were not scored on
    the same examples (data, or ``eval.num_test``, differ) or kept no misses files."""
    from distill.stages.measure import MISSES

    ma, mb = a["metrics"], b["metrics"]
    if ma.get("data_hash") != mb.get("data_hash"):
        return {}, "the runs' data differ (data_hash): no paired comparison"
    na, nb = (x["config"].get("eval", {}).get("num_test") for x in (a, b))
    if na != nb:
        return {}, f"eval.num_test differs ({na} -> {nb}): no paired comparison"
    out = {}
    for who in artifacts(mb):
        folder = "pytorch" if who == "student" else who
        fa, fb = (Path(x["folder"]) / "eval" / folder / MISSES for x in (a, b))
        if who in ma and fa.is_file() and fb.is_file():
            out[who] = paired(json.loads(fa.read_text()), json.loads(fb.read_text()))
    return out, None if out else "no misses files in both runs' eval folders: no paired comparison"


def compare(a: dict, b: dict, tolerances: dict[str, float] | None = None) -> dict:
    tol = {k: r[2] for k, r in RULES.items()} | (tolerances or {})
    ca, cb = flatten(a["config"]), flatten(b["config"])
    config = [(k, ca.get(k), cb.get(k)) for k in sorted(ca.keys() | cb.keys()) if ca.get(k) != cb.get(k)]
    ma, mb = a["metrics"], b["metrics"]
    inputs = [
        (k, ma.get(k), mb.get(k)) for k in ("data_hash", "teacher_hash", "student_hash") if ma.get(k) != mb.get(k)
    ]
    va, vb = a["manifest"].get("versions", {}), b["manifest"].get("versions", {})
    versions = [(k, va.get(k), vb.get(k)) for k in sorted(va.keys() | vb.keys()) if va.get(k) != vb.get(k)]
    rows = []
    for who in ["teacher", *artifacts(mb)]:
        if who not in ma or who not in mb:
            if who != "teacher":
                rows.append({"artifact": who, "metric": "-", "a": None, "b": None, "verdict": "only in B"})
            continue
        for split, metric in [("test", m) for m in RULES] + [("heldout", m) for m in HELDOUT]:
            xa, xb = (ma[who], mb[who]) if split == "test" else (ma[who].get(split, {}), mb[who].get(split, {}))
            x, y = xa.get(metric), xb.get(metric)
            if not isinstance(x, int | float) or not isinstance(y, int | float):
                continue
            verdict = judge(metric, x, y, tol[metric]) if who != "teacher" else "reference"
            name = metric if split == "test" else f"{split}.{metric}"
            rows.append({"artifact": who, "metric": name, "a": x, "b": y, "verdict": verdict})
    ga, gb = ma.get("gate", {}).get("passed"), mb.get("gate", {}).get("passed")
    pairs, no_pairs = paired_runs(a, b)

    def noise(r: dict) -> str:  # an exact-match change the paired test cannot tell from chance says so
        split, _, metric = r["metric"].rpartition(".")
        got = pairs.get(r["artifact"], {}).get(split or "test")
        if metric != "exact_match" or got is None:
            return ""
        verdict = "possibly noise" if got["p"] > ALPHA else "significant"
        return f" (paired: {got['lost']} lost, {got['gained']} gained, McNemar p = {got['p']:.3g}: {verdict})"

    regressions = [
        f"{r['artifact']}.{r['metric']}: {r['a']:.4g} -> {r['b']:.4g}{noise(r)}"
        for r in rows
        if r["verdict"] == "regressed"
    ]
    if ga is True and gb is False:
        regressions.append("gate: passed -> FAILED (" + "; ".join(mb["gate"].get("failed", [])) + ")")
    return {
        "a": str(a["folder"]),
        "b": str(b["folder"]),
        "config": config,
        "seeds_only": bool(config) and all(k in SEED_KEYS for k, _, _ in config),
        "inputs": inputs,
        "versions": versions,
        "rows": rows,
        "gate": (ga, gb),
        "paired": pairs,
        "paired_note": no_pairs,
        "regressions": regressions,
    }


def _v(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def render(c: dict) -> str:
    out = [f"A: {c['a']}", f"B: {c['b']}", ""]
    out.append(f"config: {len(c['config'])} keys differ" + (":" if c["config"] else ""))
    out += [f"  {k}: {_v(x)} -> {_v(y)}" for k, x, y in c["config"]]
    if c.get("seeds_only"):
        out.append(
            "  (only seeds differ: one recipe, two draws; what changes below is the seeds' spread, not a recipe's "
            "effect: compare recipes over several seeds with python -m distill.seeds)"
        )
    out.append("inputs: " + ("unchanged" if not c["inputs"] else ""))
    out += [f"  {k}: {x} -> {y}" for k, x, y in c["inputs"]]
    out.append("versions: " + ("unchanged" if not c["versions"] else ""))
    out += [f"  {k}: {x} -> {y}" for k, x, y in c["versions"]]
    out += ["", f"{'artifact':<14} {'metric':<22} {'A':>12} {'B':>12} {'change':>10}  verdict"]
    for r in c["rows"]:
        a, b = r["a"], r["b"]
        change = ""
        if isinstance(a, int | float) and isinstance(b, int | float):
            rule = RULES[r["metric"].rpartition(".")[2]]
            change = f"{(b - a) / abs(a) * 100:+.1f}%" if rule[1] == "rel" and a else f"{b - a:+.4f}"
        out.append(f"{r['artifact']:<14} {r['metric']:<22} {_v(a):>12} {_v(b):>12} {change:>10}  {r['verdict']}")
    if c.get("paired") or c.get("paired_note"):
        out += ["", "paired exact match (the same examples; lost: A right, B wrong; gained: the reverse):"]
        out += [f"  {c['paired_note']}"] if c.get("paired_note") else []
        for who, splits in c.get("paired", {}).items():
            for split, x in splits.items():
                out.append(
                    f"  {who:<14} {split:<8} lost {x['lost']:>4}  gained {x['gained']:>4}  McNemar p = {x['p']:.3g}"
                    + ("  (possibly noise)" if x["p"] > ALPHA and x["lost"] + x["gained"] else "")
                )
    ga, gb = c["gate"]
    fmt = {True: "passed", False: "FAILED", None: "-"}
    out += ["", f"gate: {fmt[ga]} -> {fmt[gb]}", ""]
    if c["regressions"]:
        out.append(f"REGRESSED ({len(c['regressions'])}):")
        out += [f"  - {r}" for r in c["regressions"]]
    else:
        out.append("no regression beyond tolerance")
    return "\n".join(out)


def parse_tolerances(items: list[str]) -> dict[str, float]:
    """``--tolerance METRIC=VALUE`` items (this command's and ``distill.sweep``'s); ValueError names a bad one."""
    tolerances = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in RULES:
            raise ValueError(f"--tolerance {item}: unknown metric {name!r}; known: {', '.join(RULES)}")
        try:
            tolerances[name] = float(value)
        except ValueError:
            raise ValueError(f"--tolerance {item}: {value!r} is not a number") from None
    return tolerances


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_a", help="the reference run folder (e.g. last night's)")
    ap.add_argument("run_b", help="the new run folder")
    ap.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="allowed worsening: absolute for accuracy metrics, relative for kl, perplexity, bytes, latency; "
        f"defaults: {', '.join(f'{k}={v[2]}' for k, v in RULES.items())}",
    )
    ap.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = ap.parse_args(argv)
    try:
        tolerances = parse_tolerances(args.tolerance)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        a, b = load_run(args.run_a), load_run(args.run_b)
    except RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    c = compare(a, b, tolerances)
    print(json.dumps(c, indent=2, default=str) if args.json else render(c))
    return 1 if c["regressions"] else 0


if __name__ == "__main__":
    sys.exit(main())
