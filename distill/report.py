"""Run outputs: metrics.json, report.md, loss-curve plot, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

COLUMNS = ("exact_match", "tool_accuracy", "arg_f1", "valid_json", "perplexity")


def write_json(path: str | Path, obj) -> None:
    """Write JSON under a temporary name, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=float))
    tmp.replace(path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return "-" if v is None else str(v)


def plot_history(history: list[dict], path: str | Path, title: str) -> Path | None:
    """Loss terms (and validation loss) against step, as a PNG."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in history]
    for i, key in enumerate(("loss", "kd", "ce", "feat")):
        ys = [r.get(key, 0.0) for r in history]
        if not any(ys):
            continue
        color = f"C{i}"
        ax.plot(steps, ys, color=color, alpha=0.2, linewidth=0.6)
        smooth, acc = [], None
        for y in ys:  # exponential moving average: the trend through per-step noise
            acc = y if acc is None else 0.95 * acc + 0.05 * y
            smooth.append(acc)
        ax.plot(steps, smooth, color=color, label=f"{key} (EMA)", linewidth=1.5)
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation CE", linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per response token)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def render_report(metrics: dict, plots: list[str]) -> str:
    t, s = metrics["teacher"], metrics["student"]
    lines = [
        f"# Distillation report: {metrics['name']}",
        "",
        f"Data `{metrics['data_hash']}`, teacher `{metrics['teacher_hash']}` ({metrics['teacher_dir']}).",
        "",
    ]
    lines += [
        "| model | split | params | " + " | ".join(COLUMNS) + " | agreement | KL |",
        "|---|---|---:|" + "---:|" * (len(COLUMNS) + 2),
    ]
    for name, m in (("teacher", t), ("student", s)):
        for split, row in (("test", m), ("hard", m.get("hard", {}))):
            if not row:
                continue
            cells = [_fmt(row.get(c)) for c in COLUMNS] + [_fmt(row.get("agreement")), _fmt(row.get("kl"))]
            lines.append(f"| {name} | {split} | {_fmt(m['num_params'])} | " + " | ".join(cells) + " |")
    r = metrics["retention"]
    lines += [
        "",
        f"- Student size: **{r['param_ratio']:.3f}x** the teacher's parameters.",
        f"- Test exact-match retention: **{r['exact_match']:.3f}** of the teacher "
        f"(target {r['target']:.2f}: {'met' if r['met'] else 'NOT met'}); hard split: {r['hard_exact_match']:.3f}.",
        f"- Training: {metrics['train']['steps']} steps, {metrics['train']['seconds']:.0f} s, "
        f"{metrics['train']['tokens_per_s']:.0f} tokens/s, {metrics['train']['skipped_steps']} skipped steps.",
        "",
    ]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)
