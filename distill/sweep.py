"""The summary of a Hydra multirun sweep: one table and Pareto plots (size and latency against accuracy)
over every combination and ONNX variant, marking which pass the release gate.

Written automatically when ``python -m distill -m ...`` ends (``SweepSummary``, a Hydra callback in
``conf/config.yaml``), or by hand: ``python -m distill.sweep multirun/NAME``. Outputs in the sweep folder:
``summary.md``, ``summary.csv``, ``summary.json`` and ``pareto.png``.

Every ONNX variant of every job is a point; its gate verdict is the job's own thresholds applied to that
variant (the gate of a job judges only ``gate.variants``; here every variant is judged so that the plot
shows which quantization schemes would pass).

Whatever the launcher (basic, ``joblib``, ``submitit_local`` / ``submitit_slurm``), every job refreshes the
summary when it ends (under a file lock), so a sweep whose launcher died, or a job killed by the scheduler,
still leaves a summary of everything that finished; a job that failed is marked with its error
(``failed.json`` in its folder), one killed or still running as ``unfinished``. Running the same sweep
again reruns only what is not finished (each job's finished stages are skipped).

A sweep whose jobs differ in a seed key (``distill.compare.SEED_KEYS``: ``distill.train.seed=0,1,2``) also
gets ``distill.seeds``' comparison of its recipes over their seeds (``seeds.json``, ``seeds.png``, a table
in ``summary.md``).

Nightly: ``python -m distill.sweep multirun/nightly/2026-12-04 --last-good`` also compares the sweep with
the last good sweep beside it (or ``--baseline DIR``) per job and variant (exact match, retention, held-out
exact match and retention, size, latency, gate), adds the comparison to ``summary.md`` (and
``nightly.png``), records the verdict in ``nightly.json`` and exits 1 on a regression beyond tolerance or
a job that did not finish, 0 otherwise, 2 on bad input.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from pathlib import Path

from hydra.experimental.callback import Callback

from core.files import write_json, write_text

log = logging.getLogger("distill")
FAILED = "failed.json"  # in a sweep job's folder: the job ended with an error (exit code, message)
NIGHTLY = "nightly.json"  # in a sweep folder: the nightly verdict against its baseline
NOT_FINISHED = ("job failed", "unfinished")  # the ``gate`` of a job's one row when it has no metrics to show
COLUMNS = (
    "job",
    "variant",
    "params",
    "bytes",
    "ms_per_token",
    "exact_match",
    "retention",
    "heldout_exact_match",
    "heldout_retention",
    "agreement",
    "kl",
    "gate",
    "pareto",
)


def _overrides(job: Path) -> list[str]:
    """The job's command-line overrides (``hydra.*`` left out), or [] without ``.hydra/overrides.yaml``."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    import yaml

    return [o for o in yaml.safe_load(path.read_text()) or [] if not o.startswith("hydra.")]


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per (job, ONNX variant); a job that failed (``failed.json``) is one row with ``gate: "job
    failed"`` and its error, one without metrics.json (killed, or still running) one with ``unfinished``."""
    from export.gate import evaluate_gate, thresholds_of

    sweep_dir = Path(sweep_dir)
    rows = []
    # job folders are named by their overrides; a path-valued override nests them, hence rglob
    for job in sorted(p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()):
        overrides = _overrides(job)
        label = ",".join(o for o in overrides if not o.startswith("+exp=")) or job.name
        mf, failed = job / "metrics.json", job / FAILED
        if failed.is_file() or not mf.is_file():
            why = json.loads(failed.read_text()).get("error", "") if failed.is_file() else ""
            status = NOT_FINISHED[0] if failed.is_file() else NOT_FINISHED[1]
            rows.append(
                {"job": label, "variant": "-", "gate": status, "error": why, "folder": str(job), "overrides": overrides}
            )
            continue
        m = json.loads(mf.read_text())
        cfg = _config(job)
        thresholds = thresholds_of(cfg.get("gate", {}))
        t_em = m["teacher"]["exact_match"]
        t_held = m["teacher"].get("heldout", {}).get("exact_match", 0.0)
        variants = [k for k in m if k.startswith("onnx_")] or ["student"]
        for v in variants:
            s = m[v]
            floor = m.get("gate", {}).get("min_teacher_score", 0.0)  # not a knob: this job's own, as recorded
            verdict = evaluate_gate(m["teacher"], {v: s}, thresholds, floor) if v != "student" else None
            rows.append(
                {
                    "job": label,
                    "variant": v.removeprefix("onnx_"),
                    "params": m["student"]["num_params"],
                    "bytes": s.get("bytes"),
                    "ms_per_token": s.get("ms_per_token"),
                    "exact_match": s["exact_match"],
                    "retention": s["exact_match"] / max(t_em, 1e-9),
                    "heldout_exact_match": s.get("heldout", {}).get("exact_match"),
                    "heldout_retention": s["heldout"]["exact_match"] / max(t_held, 1e-9) if "heldout" in s else None,
                    "agreement": s.get("agreement"),
                    "kl": s.get("kl"),
                    "gate": "-" if verdict is None else ("pass" if verdict.passed else "fail"),
                    "shipped": v.removeprefix("onnx_") in cfg.get("gate", {}).get("variants", []),
                    "folder": str(job),
                    "overrides": overrides,
                }
            )
    _mark_pareto(rows)
    return rows


def _config(job: Path) -> dict:
    import yaml

    path = job / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def pareto(points: list[tuple[float, float]]) -> list[bool]:
    """Which (cost, accuracy) points no other point beats: no cost as low with accuracy as high, one strictly."""
    out = []
    for i, (c, a) in enumerate(points):
        dominated = any((c2 <= c and a2 >= a) and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


def _mark_pareto(rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("bytes") is not None]
    for r, front in zip(ok, pareto([(r["bytes"], r["exact_match"]) for r in ok]), strict=True):
        r["pareto"] = front


def write_summary(
    sweep_dir: str | Path, rows: list[dict] | None = None, nightly: dict | None = None
) -> dict[str, Path]:
    """summary.json / .csv / .md and pareto.png (each written under a temporary name, then renamed); with
    ``nightly`` (``compare_sweeps``), its table and plot too."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) if rows is None else rows
    out = {"json": sweep_dir / "summary.json", "csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md"}
    write_json(out["json"], rows)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*COLUMNS, "shipped", "folder"], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_text(out["csv"], buf.getvalue())
    plot = plot_pareto(rows, sweep_dir / "pareto.png", sweep_dir.name)
    if plot:
        out["png"] = plot
    text = render(rows, sweep_dir.name, plot.name if plot else None)
    seeds = seeds_section(sweep_dir, rows)
    if seeds is not None:
        text += "\n" + seeds[0]
        out |= seeds[1]
    if nightly is not None:
        night = plot_nightly(nightly, sweep_dir / "nightly.png")
        text += "\n" + render_nightly(nightly, night.name if night else None)
    write_text(out["md"], text)
    return out


def recipes_of(rows: list[dict]) -> dict[str, list[Path]]:
    """``collect``'s finished jobs grouped into recipes: jobs whose overrides agree apart from the seed keys
    (``distill.compare.SEED_KEYS``); {the other overrides, or "(defaults)": job folders}."""
    from distill.compare import SEED_KEYS

    groups: dict[str, list[Path]] = {}
    for r in rows:
        if r["gate"] in NOT_FINISHED or "overrides" not in r:
            continue
        job = Path(r["folder"])
        kept = [o for o in r["overrides"] if o.lstrip("+~").partition("=")[0] not in SEED_KEYS]
        jobs = groups.setdefault(",".join(kept) or "(defaults)", [])
        if job not in jobs:  # one row per ONNX variant, one job
            jobs.append(job)
    return groups


def seeds_section(sweep_dir: Path, rows: list[dict]) -> tuple[str, dict[str, Path]] | None:
    """When some recipe of the sweep ran with several seeds (``rows``' jobs that differ only in
    ``distill.compare.SEED_KEYS``): ``distill.seeds``' table over the recipes (the first the reference),
    ``seeds.json`` and ``seeds.png``; None otherwise."""
    from distill import seeds

    recipes = recipes_of(rows)
    if not any(len(jobs) > 1 for jobs in recipes.values()):
        return None
    try:
        c = seeds.compare_recipes(recipes)
    except seeds.SeedsError as err:  # e.g. a sweep over the data: its jobs are not one data set's recipes
        return f"## Recipes over seeds\n\nNot compared: {err}\n", {}
    for runs in c["runs"].values():  # job folders named from the sweep folder, as in its other tables
        for r in runs:
            r["folder"] = str(Path(r["folder"]).relative_to(sweep_dir))
    write_json(sweep_dir / "seeds.json", c)
    out = {"seeds_json": sweep_dir / "seeds.json"}
    png = seeds.plot(c, sweep_dir / "seeds.png")
    if png:
        out["seeds_png"] = png
    return seeds.render(c, png.name if png else None), out


def refresh_summary(sweep_dir: str | Path) -> None:
    """Rewrite the summary from every job folder now; several jobs ending at once take turns (a file lock
    in the sweep folder). Never fails the job that calls it."""
    from filelock import FileLock

    sweep_dir = Path(sweep_dir)
    try:
        with FileLock(sweep_dir / ".summary.lock", timeout=300):
            write_summary(sweep_dir)
    except Exception as err:  # the job's own results are written already; the summary can be made by hand
        log.warning("sweep summary not refreshed (%s); make it with python -m distill.sweep %s", err, sweep_dir)


def _cell(r: dict, k: str) -> str:
    v = r.get(k)
    if v is None:
        return ""
    if k == "bytes":
        return f"{v / 1e6:.2f}"
    if k == "params":
        return f"{v / 1e6:.2f}M"
    if k == "pareto":
        return "**yes**" if v else ""
    if isinstance(v, float):
        return f"{v:.4f}" if k in ("kl", "agreement") else f"{v:.3f}"
    return str(v)


def render(rows: list[dict], title: str, plot: str | None) -> str:
    heads = {"bytes": "size MB", "ms_per_token": "ms/token", "exact_match": "exact match"}
    lines = [
        f"# Sweep summary: {title}",
        "",
        f"{len({r['job'] for r in rows})} jobs, {len(rows)} artifacts. `gate`: the job's thresholds applied to "
        "that variant; `pareto`: no other artifact is at least as small and at least as accurate.",
        "",
        "| " + " | ".join(heads.get(c, c) for c in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in sorted(rows, key=lambda r: (r.get("bytes") is None, r.get("bytes") or 0)):
        lines.append("| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |")
    if plot:
        lines += ["", f"![Pareto]({plot})"]
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict], path: str | Path, title: str) -> Path | None:
    """Size and decode latency against exact match; filled = passes the gate, x = fails; the line joins
    the Pareto front."""
    pts = [r for r in rows if r.get("bytes") is not None]
    if not pts:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8))
    axes = fig.subplots(1, 2)
    jobs = sorted({r["job"] for r in pts})
    for ax, key, label in ((axes[0], "bytes", "size on disk (MB)"), (axes[1], "ms_per_token", "decode ms / token")):
        sub = [r for r in pts if r.get(key) is not None]
        for r in sub:
            x = r[key] / 1e6 if key == "bytes" else r[key]
            color = f"C{jobs.index(r['job']) % 10}"
            passed = r["gate"] == "pass"
            ax.scatter(
                x,
                r["exact_match"],
                s=60,
                marker="o" if passed else "x",
                color=color,
                edgecolors="black" if r.get("shipped") else color,
            )
            ax.annotate(r["variant"], (x, r["exact_match"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        xs = [(r[key] / 1e6 if key == "bytes" else r[key], r["exact_match"]) for r in sub]
        front = sorted(p for p, f in zip(xs, pareto(xs), strict=True) if f)
        if front:
            ax.plot(*zip(*front, strict=True), "k--", linewidth=1, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("test exact match")
        ax.grid(alpha=0.3)
    for i, j in enumerate(jobs):
        axes[0].scatter([], [], color=f"C{i % 10}", label=j[:60])
    axes[0].scatter([], [], marker="o", color="gray", label="passes gate")
    axes[0].scatter([], [], marker="x", color="gray", label="fails gate")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: size and latency vs accuracy over the sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


# ---- nightly: tonight's sweep against the last good one ----

# metric -> the distill.compare rule whose direction and tolerance it takes
NIGHTLY_METRICS = {
    "exact_match": "exact_match",
    "retention": "exact_match",
    "heldout_exact_match": "exact_match",
    "heldout_retention": "exact_match",
    "bytes": "bytes",
    "ms_per_token": "ms_per_token",
}


def _finished(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["job"], r["variant"]): r for r in rows if r["gate"] not in NOT_FINISHED}


def compare_sweeps(base_dir: str | Path, rows: list[dict], tolerances: dict[str, float] | None = None) -> dict:
    """Tonight's ``rows`` against the sweep in ``base_dir``, per (job, variant): every metric of
    ``NIGHTLY_METRICS`` judged with ``distill.compare``'s rules and tolerances, a gate that passed and now
    fails, and a job that finished there and did not tonight are regressions (``nightly`` adds which jobs
    did not finish)."""
    from distill.compare import RULES, judge

    tol = {k: r[2] for k, r in RULES.items()} | (tolerances or {})
    base_rows = json.loads((Path(base_dir) / "summary.json").read_text())
    base, now = _finished(base_rows), _finished(rows)
    table, regressions = [], []
    for (job, variant), b in sorted(base.items()):
        n = now.get((job, variant))
        if n is None:
            status = next((r["gate"] for r in rows if r["job"] == job), "missing")
            regressions.append(f"{job} [{variant}]: finished in the baseline, {status} tonight")
            table.append({"job": job, "variant": variant, "metric": "-", "a": None, "b": None, "verdict": status})
            continue
        for metric, rule in NIGHTLY_METRICS.items():
            x, y = b.get(metric), n.get(metric)
            if not isinstance(x, int | float) or not isinstance(y, int | float):
                continue
            verdict = judge(rule, x, y, tol[rule])
            table.append({"job": job, "variant": variant, "metric": metric, "a": x, "b": y, "verdict": verdict})
            if verdict == "regressed":
                regressions.append(f"{job} [{variant}] {metric}: {x:.4g} -> {y:.4g}")
        if b.get("gate") == "pass" and n.get("gate") == "fail":
            regressions.append(f"{job} [{variant}] gate: pass -> fail")
            table.append(
                {"job": job, "variant": variant, "metric": "gate", "a": "pass", "b": "fail", "verdict": "regressed"}
            )
    new = sorted({j for j, _ in now} - {j for j, _ in base})
    return {"baseline": str(base_dir), "rows": table, "regressions": regressions, "new": new}


def last_good(sweep_dir: str | Path) -> Path | None:
    """The most recently checked sweep beside ``sweep_dir`` whose nightly verdict was good."""
    sweep_dir = Path(sweep_dir).resolve()
    found = []
    for d in sweep_dir.parent.iterdir():
        v = d / NIGHTLY
        if d.resolve() == sweep_dir or not v.is_file() or not (d / "summary.json").is_file():
            continue
        try:
            verdict = json.loads(v.read_text())
        except json.JSONDecodeError:
            continue
        if verdict.get("good"):
            found.append((verdict.get("checked_at", 0.0), d))
    return max(found)[1] if found else None


def render_nightly(c: dict, plot: str | None) -> str:
    lines = [f"## Against the baseline: {c['baseline'] or 'none (first good sweep)'}", ""]
    if c["regressions"]:
        lines += [f"**REGRESSED ({len(c['regressions'])})**:", ""] + [f"- {r}" for r in c["regressions"]]
    else:
        lines.append("No regression beyond tolerance.")
    if c["unfinished"]:
        lines += ["", "Jobs that did not finish tonight: " + ", ".join(c["unfinished"])]
    if c["new"]:
        lines += ["", "Jobs new tonight (no baseline): " + ", ".join(c["new"])]
    if c["rows"]:
        lines += ["", "| job | variant | metric | baseline | tonight | verdict |", "|---|---|---|---|---|---|"]
        for r in c["rows"]:
            a, b = (_cell({r["metric"]: r[k]}, r["metric"]) for k in "ab")
            lines.append(f"| {r['job']} | {r['variant']} | {r['metric']} | {a} | {b} | {r['verdict']} |")
    if plot:
        lines += ["", f"![baseline vs tonight]({plot})"]
    return "\n".join(lines) + "\n"


def plot_nightly(c: dict, path: str | Path) -> Path | None:
    """Exact match and size of every artifact, baseline against tonight (the diagonal: unchanged)."""
    pts = {m: [r for r in c["rows"] if r["metric"] == m] for m in ("exact_match", "bytes")}
    if not any(pts.values()):
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.4))
    for ax, (metric, rows) in zip(fig.subplots(1, 2), pts.items(), strict=True):
        scale = 1e6 if metric == "bytes" else 1.0
        for r in rows:
            bad = r["verdict"] == "regressed"
            ax.scatter(r["a"] / scale, r["b"] / scale, marker="x" if bad else "o", color="C3" if bad else "C0")
            ax.annotate(f"{r['job'][:24]} {r['variant']}", (r["a"] / scale, r["b"] / scale), fontsize=6)
        lo = min([min(r["a"], r["b"]) / scale for r in rows], default=0)
        hi = max([max(r["a"], r["b"]) / scale for r in rows], default=1)
        ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
        unit = " (MB)" if metric == "bytes" else ""
        ax.set_xlabel(f"baseline {metric}{unit}")
        ax.set_ylabel(f"tonight {metric}{unit}")
        ax.grid(alpha=0.3)
    fig.suptitle("tonight against the last good sweep (x: regressed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def nightly(
    sweep_dir: str | Path,
    baseline: str | Path | None,
    tolerances: dict[str, float] | None = None,
    rows: list[dict] | None = None,
) -> dict:
    """Summary, comparison with ``baseline`` (None: the first good sweep), verdict in ``nightly.json``.
    ``rows``: ``collect(sweep_dir)`` when the caller has it already."""
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) if rows is None else rows
    if baseline is not None:
        c = compare_sweeps(baseline, rows, tolerances)
    else:
        c = {"baseline": None, "rows": [], "regressions": [], "new": []}
    c["unfinished"] = sorted({r["job"] for r in rows if r["gate"] in NOT_FINISHED})
    c["good"] = not c["regressions"] and not c["unfinished"]
    c["checked_at"] = time.time()
    write_summary(sweep_dir, rows, c)
    write_json(sweep_dir / NIGHTLY, c)
    return c


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        out = write_summary(sweep_dir)
        log.info("sweep summary: %s", out["md"])


def main(argv: list[str] | None = None) -> int:
    from distill.compare import parse_tolerances

    ap = argparse.ArgumentParser(prog="python -m distill.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="a multirun folder (its job folders hold .hydra/ and metrics.json)")
    base = ap.add_mutually_exclusive_group()
    base.add_argument("--baseline", help="nightly check against this sweep folder")
    base.add_argument(
        "--last-good", action="store_true", help="nightly check against the last good sweep beside this one"
    )
    ap.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="as for python -m distill.compare (exact_match also sets retention's; bytes, ms_per_token relative)",
    )
    args = ap.parse_args(argv)
    d = Path(args.sweep_dir)
    if not d.is_dir():
        print(f"error: {d} is not a folder", file=sys.stderr)
        return 2
    rows = collect(d)
    if not rows:
        print(f"error: {d} holds no job folders (subfolders with .hydra/)", file=sys.stderr)
        return 2
    try:
        tolerances = parse_tolerances(args.tolerance)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not (args.baseline or args.last_good):
        print(write_summary(d, rows)["md"].read_text())
        return 0
    baseline = Path(args.baseline) if args.baseline else last_good(d)
    if baseline is not None and not (baseline / "summary.json").is_file():
        print(
            f"error: --baseline {baseline}: no summary.json (not a sweep folder, or never summarized)", file=sys.stderr
        )
        return 2
    c = nightly(d, baseline, tolerances, rows)
    print((d / "summary.md").read_text())
    return 0 if c["good"] else 1


if __name__ == "__main__":
    sys.exit(main())
