"""The summary of a Hydra multirun sweep: one table and Pareto plots (size and latency against accuracy)
over every combination and ONNX variant, marking which pass the release gate.

Written automatically when ``python -m distill -m ...`` ends (``SweepSummary``, a Hydra callback in
``conf/config.yaml``), or by hand: ``python -m distill.sweep multirun/NAME``. Outputs in the sweep folder:
``summary.md``, ``summary.csv``, ``summary.json`` and ``pareto.png``.

Every ONNX variant of every job is a point; its gate verdict is the job's own thresholds applied to that
variant (the gate of a job judges only ``gate.variants``; here every variant is judged so that the plot
shows which quantization schemes would pass).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

log = logging.getLogger("distill")
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


def _overrides(job: Path) -> str:
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return job.name
    import yaml

    items = [o for o in yaml.safe_load(path.read_text()) or [] if not o.startswith(("+exp=", "hydra."))]
    return ",".join(items) or job.name


def collect(sweep_dir: str | Path) -> list[dict]:
    """One row per (job, ONNX variant); a job without metrics.json is one row with ``gate: "job failed"``."""
    from export.gate import evaluate_gate, thresholds_of

    sweep_dir = Path(sweep_dir)
    rows = []
    # job folders are named by their overrides; a path-valued override nests them, hence rglob
    for job in sorted(p.parent for p in sweep_dir.rglob(".hydra") if p.is_dir()):
        label = _overrides(job)
        mf = job / "metrics.json"
        if not mf.is_file():
            rows.append({"job": label, "variant": "-", "gate": "job failed", "folder": str(job)})
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


def write_summary(sweep_dir: str | Path, rows: list[dict] | None = None) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir) if rows is None else rows
    out = {"json": sweep_dir / "summary.json", "csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md"}
    out["json"].write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    with out["csv"].open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS, "shipped", "folder"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    plot = plot_pareto(rows, sweep_dir / "pareto.png", sweep_dir.name)
    if plot:
        out["png"] = plot
    out["md"].write_text(render(rows, sweep_dir.name, plot.name if plot else None))
    return out


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


class SweepSummary(Callback):
    """Hydra callback: writes the sweep summary when a multirun ends."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        out = write_summary(sweep_dir)
        log.info("sweep summary: %s", out["md"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distill.sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep_dir", help="a multirun folder (its job folders hold .hydra/ and metrics.json)")
    args = ap.parse_args(argv)
    d = Path(args.sweep_dir)
    if not d.is_dir():
        print(f"error: {d} is not a folder", file=sys.stderr)
        return 2
    rows = collect(d)
    if not rows:
        print(f"error: {d} holds no job folders (subfolders with .hydra/)", file=sys.stderr)
        return 2
    out = write_summary(d, rows)
    print(out["md"].read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
