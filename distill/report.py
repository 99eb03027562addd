"""Run outputs: metrics.json, report.md, loss-curve plot, written atomically."""

from __future__ import annotations

from pathlib import Path

COLUMNS = ("exact_match", "tool_accuracy", "arg_f1", "valid_json", "perplexity")
# function-calling columns (distill.metrics.TOOL_CALL_METRICS), shown where the teacher was measured on them
CALL_COLUMNS = ("schema_validity", "missed_call_rate", "extra_call_rate", "hallucinated_function_rate")


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
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
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
    return Path(path)


def plot_retention(
    history: list[dict], teacher_em: float | None, path: str | Path, title: str, teacher_heldout: float | None = None
) -> Path | None:
    """Student exact match on the probed validation examples / the teacher's, and on the probed heldout
    examples (requests unlike training) / the teacher's there, against minutes and tokens of distillation
    (``train.eval_generate``): what more compute buys, in distribution and beyond it."""
    pts = [r for r in history if "val_exact_match" in r]
    if not pts or not teacher_em:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6))
    a, b = fig.subplots(1, 2, sharey=True)
    series = [("val_exact_match", teacher_em, "validation (like training)")]
    if teacher_heldout and any("heldout_exact_match" in r for r in pts):
        series.append(("heldout_exact_match", teacher_heldout, "heldout (unlike training)"))
    for i, (key, ref, label) in enumerate(series):
        rows = [r for r in pts if key in r]
        ret = [r[key] / ref for r in rows]
        a.plot([r["elapsed_s"] / 60 for r in rows], ret, "o-", color=f"C{i}", label=label)
        b.plot([r["tokens"] / 1e6 for r in rows], ret, "o-", color=f"C{i}", label=label)
    a.set_xlabel("distillation minutes")
    b.set_xlabel("training tokens (millions)")
    a.set_ylabel("exact match / teacher's")
    a.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_training(history: list[dict], path: str | Path, title: str) -> Path | None:
    """Learning rate, gradient norm, throughput and memory against step: is the run healthy?"""
    panels = [
        ("lr", "learning rate"),
        ("grad_norm", "gradient norm (before clipping)"),
        ("tokens_per_s", "tokens / s"),
        ("memory_mb", "memory MB (RSS on CPU, peak on GPU)"),
    ]
    panels = [(k, label) for k, label in panels if any(k in r for r in history)]
    if not history or not panels:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 6))
    axes = fig.subplots(2, 2).ravel()
    for ax, (key, label) in zip(axes, panels, strict=False):
        pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), int | float)]
        if pts:
            ax.plot(*zip(*pts, strict=True), linewidth=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return Path(path)


def render_report(metrics: dict, plots: list[str], misses: dict | None = None) -> str:
    """report.md: scores per split, retention, the release table, scores per slice, the misses, the plots.
    ``misses``: split -> the shipped artifact's misses (``distill.stages.measure.misses``)."""
    t, s = metrics["teacher"], metrics["student"]
    lines = [
        f"# Distillation report: {metrics['name']}",
        "",
        f"Data `{metrics['data_hash']}`, teacher `{metrics['teacher_hash']}` ({metrics['teacher_dir']}).",
        "",
    ]
    cols = COLUMNS + tuple(c for c in CALL_COLUMNS if c in t)
    lines += [
        "| model | split | params | " + " | ".join(cols) + " | agreement | KL |",
        "|---|---|---:|" + "---:|" * (len(cols) + 2),
    ]
    for name, m in (("teacher", t), ("student", s)):
        for split, row in (("test", m), ("heldout", m.get("heldout", {}))):
            if not row:
                continue
            cells = [_fmt(row.get(c)) for c in cols] + [_fmt(row.get("agreement")), _fmt(row.get("kl"))]
            lines.append(f"| {name} | {split} | {_fmt(m['num_params'])} | " + " | ".join(cells) + " |")
    r = metrics["retention"]
    lines += [
        "",
        f"- Student size: **{r['param_ratio']:.3f}x** the teacher's parameters.",
        f"- Test exact-match retention: **{r['exact_match']:.3f}** of the teacher "
        f"(target {r['target']:.2f}: {'met' if r['met'] else 'NOT met'}); heldout split (unlike training): "
        + (
            f"**{r['heldout_exact_match']:.3f}**"
            + "".join(f", {p} {_fmt(v)}" for p, v in r.get("heldout_parts", {}).items())
            if r.get("heldout_exact_match") is not None
            else "not measured"
        )
        + ".",
        f"- Training: {metrics['train']['steps']} steps, {metrics['train']['seconds']:.0f} s, "
        f"{metrics['train']['tokens_per_s']:.0f} tokens/s, {metrics['train']['skipped_steps']} skipped steps.",
        *_train_data(metrics.get("train_data")),
        "",
    ]
    if "gate" in metrics:
        lines += release_table(metrics)
    lines += slice_table(metrics)
    lines += misses_table(misses or {})
    if metrics.get("stages"):
        lines += [
            "## Stages",
            "",
            "| stage | this run | seconds (reused: when it ran) | output hash |",
            "|---|---|---:|---|",
        ]
        for name, r in metrics["stages"].items():
            secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else ""
            if r.get("ran_seconds") is not None:
                secs = f"({r['ran_seconds']:.1f})"
            lines.append(f"| {name} | {r.get('status')} | {secs} | `{r.get('output_hash') or r.get('hash', '')}` |")
        lines.append("")
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    return "\n".join(lines)


def _train_data(d: dict | None) -> list[str]:
    if not d:
        return []
    parts = [f"{d['task']:,} task examples"]
    if "augment" in d:
        a = d["augment"]
        how = (
            f"each with the call its new values imply ({a['too_long']:,} too long)"
            if a.get("keep") == "implied"
            else f"the teacher answered {a['kept']:,} of {a['candidates']:,} consistently; {a['rejected']:,} rejected"
        )
        parts.append(
            f"{a['kept']:,} augmented requests at {a['share']:.0%} of every batch ({how}){_read(a, a['kept'])}"
        )
    if "general" in d:
        g = d["general"]
        parts.append(
            f"{g['sequences']:,} general-text sequences of {g['length']} tokens at {g['share']:.0%}"
            + _read(g, g["sequences"])
        )
    return ["- Training data: " + "; ".join(parts) + "."]


def _read(pool: dict, size: int) -> str:
    """ ", of which training read N" where it read fewer than the pool holds (the rest cost minutes for nothing)."""
    n = pool.get("read", size)
    return f", of which training read {n:,}" if n < size else ""


def shipped(metrics: dict) -> str | None:
    """The first gated ONNX variant's key (``onnx_<variant>``), or None without a gate."""
    checks = metrics.get("gate", {}).get("checks", [])
    return checks[0]["variant"] if checks else None


def slice_table(metrics: dict) -> list[str]:
    """Exact match per slice of the heldout and test splits (part, language, intent): teacher, PyTorch
    student and the shipped artifact, and the shipped (or PyTorch) student's share of the teacher's."""
    ship = shipped(metrics)
    who = [("teacher", metrics["teacher"]), ("student", metrics["student"])]
    if ship:
        who.append((ship[5:], metrics[ship]))
    lines: list[str] = []
    for split in ("heldout", "test"):
        rows = []
        t_split = metrics["teacher"] if split == "test" else metrics["teacher"].get("heldout", {})
        for key, values in t_split.get("slices", {}).items():
            for value, t_row in values.items():
                cells = []
                for _, m in who:
                    row = (m if split == "test" else m.get("heldout", {})).get("slices", {}).get(key, {}).get(value, {})
                    cells.append(row.get("exact_match"))
                last = cells[-1]
                ret = last / t_row["exact_match"] if last is not None and t_row.get("exact_match") else None
                rows.append(
                    f"| {key} | {value} | {t_row['n']} | " + " | ".join(_fmt(c) for c in cells) + f" | {_fmt(ret)} |"
                )
        if rows:
            names = " | ".join(n for n, _ in who)
            lines += [
                f"## Exact match per slice: {split} split" + (" (unlike training)" if split == "heldout" else ""),
                "",
                f"| slice | value | n | {names} | {who[-1][0]} / teacher |",
                "|---|---|---:|" + "---:|" * (len(who) + 1),
                *rows,
                "",
            ]
    return lines


def _cell(text: str, width: int = 70) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def misses_table(misses: dict, limit: int = 15) -> list[str]:
    """The shipped artifact's misses beside the teacher's answers: first those the teacher got right
    (what compression lost), heldout split first; the full lists are in the evaluation folders."""
    lines: list[str] = []
    for split in ("heldout", "test"):
        rows = misses.get(split) or []
        if not rows:
            continue
        lost = sorted(rows, key=lambda m: not m.get("teacher_right"))
        n_lost = sum(1 for m in rows if m.get("teacher_right"))
        lines += [
            f"## Misses on the {split} split: {len(rows)} ({n_lost} that the teacher answers right)",
            "",
            "| part | lang | request | reference | student | teacher |",
            "|---|---|---|---|---|---|",
        ]
        for m in lost[:limit]:
            lines.append(
                f"| {m.get('part', '')} | {m.get('lang', '')} | {_cell(m['request'])} | `{_cell(m['reference'])}` | "
                f"`{_cell(m['answer'])}` | `{_cell(m['teacher'])}`{' ✓' if m.get('teacher_right') else ''} |"
            )
        lines.append("")
    return lines


def plot_slices(metrics: dict, path: str | Path) -> Path | None:
    """Exact match per part of the heldout split (and the test split) for the teacher, the PyTorch
    student and the shipped artifact, as grouped bars: where the student leaves the teacher."""
    t_held = metrics["teacher"].get("heldout", {})
    parts = list(t_held.get("slices", {}).get("part", {}))
    if not parts:
        return None
    from matplotlib.figure import Figure

    ship = shipped(metrics)
    who = [("teacher", metrics["teacher"]), ("student (PyTorch)", metrics["student"])]
    if ship:
        who.append((f"{ship[5:]} (ONNX)", metrics[ship]))
    groups = ["test", *parts]
    fig = Figure(figsize=(8, 3.8))
    ax = fig.subplots()
    width = 0.8 / len(who)
    for i, (name, m) in enumerate(who):
        ys = [m.get("exact_match", 0.0)]
        ys += [m.get("heldout", {}).get("slices", {}).get("part", {}).get(p, {}).get("exact_match", 0.0) for p in parts]
        ax.bar([g + i * width for g in range(len(groups))], ys, width, label=name, color=f"C{i}")
    ax.set_xticks([g + width * (len(who) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels(["test (in distribution)", *(f"heldout: {p}" for p in parts)], fontsize=8)
    ax.set_ylabel("exact match")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    ax.set_title(f"{metrics['name']}: requests like training vs unlike it")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def onnx_variants(metrics: dict) -> list[str]:
    return [k for k in metrics if k.startswith("onnx_")]


def _mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:.2f}"


def release_table(metrics: dict) -> list[str]:
    """One table: the teacher, the PyTorch student and every ONNX variant, with the gate's verdict."""
    gate = metrics["gate"]
    gated = {c["variant"] for c in gate["checks"]}
    failed = {c["variant"] for c in gate["checks"] if not c["passed"]}
    lines = [
        "## Release: the shipped artifact under ONNX Runtime vs the teacher",
        "",
        "| model | runtime | size MB | decode ms/token | prefill ms | exact match | heldout exact match | agreement | KL | gate |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    rows = [("teacher", "PyTorch", metrics["teacher"]), ("student", "PyTorch", metrics["student"])]
    rows += [(f"student {k[5:]}", "ONNX Runtime", metrics[k]) for k in onnx_variants(metrics)]
    for name, runtime, m in rows:
        key = "onnx_" + name.split(" ", 1)[1] if name.startswith("student ") else name
        verdict = ("**FAIL**" if key in failed else "pass") if key in gated else ""
        lines.append(
            f"| {name} | {runtime} | {_mb(m.get('bytes'))} | {_fmt(m.get('ms_per_token'))} | {_fmt(m.get('prefill_ms'))} "
            f"| {_fmt(m.get('exact_match'))} | {_fmt(m.get('heldout', {}).get('exact_match'))} "
            f"| {_fmt(m.get('agreement'))} | {_fmt(m.get('kl'))} | {verdict} |"
        )
    trimmed = next((metrics[k]["vocabulary"] for k in onnx_variants(metrics) if "vocabulary" in metrics[k]), None)
    if trimmed:
        lines += [
            "",
            f"Vocabulary trimmed to {trimmed['kept']} of {trimmed['vocab_size']} tokens in every ONNX file "
            "(export.vocab): a trimmed token is never generated; compare heldout exact match with an untrimmed run.",
        ]
    lines += ["", f"**Release gate: {'PASSED' if gate['passed'] else 'FAILED'}**", ""]
    lines += [f"- {line.strip().removeprefix('- ')}" for line in gate["summary"].splitlines()[1:]]
    ov = [
        (k, split, o)
        for k in onnx_variants(metrics)
        for split, o in (
            ("test", metrics[k].get("openvino")),
            ("heldout", metrics[k].get("heldout", {}).get("openvino")),
        )
        if o
    ]
    if ov:
        lines += ["", "Cross-runtime (same ONNX file under OpenVINO CPU vs ONNX Runtime):", ""]
        lines += [
            "| variant | split | identical greedy answers | exact match ORT / OpenVINO | activations ORT / OpenVINO "
            "| argmax agreement | max logit diff | identical at matched arithmetic |",
            "|---|---|---:|---:|---|---:|---:|---:|",
        ]
        for k, split, o in ov:
            if "error" in o:
                lines.append(f"| {k[5:]} | {split} | OpenVINO could not run it: {o['error']} | | | | | |")
                continue
            em = f"{o['onnxruntime_exact_match']:.3f} / {o['exact_match']:.3f}" if "exact_match" in o else ""
            acts = "{onnxruntime} / {openvino}".format(**o["activations"]) if "activations" in o else ""
            m = o.get("matched")
            same = (
                f"{m['generation_match']:.3f} (ORT at accuracy_level {m['accuracy_level']}; "
                f"max logit diff {m['max_logit_diff']:.1e})"
                if m
                else ""
            )
            lines.append(
                f"| {k[5:]} | {split} | {o['generation_match']:.3f} ({o['examples']}) | {em} | {acts} "
                f"| {o['argmax_agreement']:.4f} | {o['max_logit_diff']:.2e} | {same} |"
            )
        acts = [o["activations"] for *_, o in ov if "activations" in o]
        differ = [a for a in acts if a["onnxruntime"] != a["openvino"]]
        if differ:
            level = 4 if differ[0]["openvino"] == "int8" else 1
            judged = any("matched" in o for *_, o in ov)
            lines += [
                "",
                "The runtimes compute the activations differently on this CPU, so answers part at near-ties: compare their "
                f"exact match. quantize.<variant>.accuracy_level: {level} makes them compute alike here"
                + (" (float activations: slower decode)." if level == 1 else ".")
                + (
                    " gate.min_openvino_match judges the answers at matched arithmetic (export.openvino_arithmetic: "
                    "matched): the file, not this CPU."
                    if judged
                    else " gate.min_openvino_match judges the answers as shipped (export.openvino_arithmetic: shipped)."
                ),
            ]
    return lines + [""]


def plot_variants(metrics: dict, path: str | Path) -> Path | None:
    """Size on disk and decode latency of each artifact against its exact match: what quantization buys."""
    names = ["teacher", "student"] + onnx_variants(metrics)
    rows = [(n, metrics[n]) for n in names if metrics.get(n, {}).get("bytes")]
    if not rows:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, key, label in (
        (axes[0], "bytes", "size on disk (MB)"),
        (axes[1], "ms_per_token", "decode ms / token (batch 1)"),
    ):
        for i, (n, m) in enumerate(rows):
            x = m[key] / 1e6 if key == "bytes" else m[key]
            ax.scatter(x, m["exact_match"], color=f"C{i}", s=60, label=n.replace("onnx_", "onnx "))
            ax.annotate(
                n.replace("onnx_", ""), (x, m["exact_match"]), textcoords="offset points", xytext=(5, 5), fontsize=8
            )
        ax.set_xlabel(label)
        ax.set_ylabel("test exact match")
        ax.grid(alpha=0.3)
    t_em = metrics["teacher"]["exact_match"]
    for g in metrics.get("gate", {}).get("checks", []):
        if g["metric"] == "exact_match" and g["relative"]:
            for ax in axes:
                ax.axhline(g["threshold"] * t_em, color="red", linestyle="--", linewidth=1, label="gate")
            break
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"{metrics['name']}: size and latency vs accuracy (gate: {'passed' if metrics.get('gate', {}).get('passed') else 'FAILED'})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
