"""Which recipe makes a pruned student generalize like its teacher? Each recipe is one pipeline run (its own
run folder, sharing the cached teacher, its augmented requests and general text); the table compares them
on the heldout split (unseen names / places / artists / messages, unseen phrasings, both) beside the
in-distribution test split, with the minutes each spent making extra data and distilling.

    python bench/heldout_recipes.py --exp car_assistant_smollm2 --root runs/recipes \\
        --common export.enabled=false eval.num_test=200 \\
        --recipe baseline= \\
        --recipe augment=distill.augment.examples=3000,distill.train.steps=260 \\
        --out bench/results/heldout_recipes_smollm2.json

A recipe whose folder holds a finished run (``metrics.json``) is read, not run again. Equal wall time: give
each recipe the distillation steps that its extra data's minutes leave (see BENCHMARKS.md section 15).

One seed cannot rank recipes a few points apart (two seeds of one recipe differ by 3-6 heldout points on
600 SmolLM2 requests, BENCHMARKS.md section 24): ``--seeds 0,1,2`` runs each recipe once per
``distill.train.seed`` (folders ``NAME`` for seed 0, ``NAME-seedK`` for the others) and adds
``distill.seeds``' comparison over them (mean, spread, Welch's t, seeds needed; ``*_seeds.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distill.seeds import MAKING_STAGES

ROOT = Path(__file__).resolve().parent.parent
EXTRA_STAGES = (*MAKING_STAGES, "qad")  # "qad:<variant>" counts as "qad"


def split_overrides(text: str) -> list[str]:
    """``a=1,b=[[0,0],[1,1]]`` -> ``["a=1", "b=[[0,0],[1,1]]"]``: commas inside brackets belong to a value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [o for o in [*out, cur] if o]


def run_recipe(exp: str, folder: Path, overrides: list[str], log: Path) -> float:
    """Run the pipeline once (a fresh process, as a user would); the wall seconds."""
    cmd = [sys.executable, "-m", "distill", f"+exp={exp}", f"hydra.run.dir={folder}", *overrides]
    t = time.time()
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode not in (0, 3):  # 3: the gate failed, the run is complete
        raise SystemExit(f"{folder}: the run failed (exit {proc.returncode}); see {log}")
    return time.time() - t


def summary(name: str, overrides: list[str], folder: Path, wall: float | None) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    t, s = m["teacher"], m["student"]
    th, sh = t.get("heldout", {}), s.get("heldout", {})
    parts = {}
    for p, row in th.get("slices", {}).get("part", {}).items():
        srow = sh.get("slices", {}).get("part", {}).get(p, {})
        parts[p] = {
            "teacher": row["exact_match"],
            "student": srow.get("exact_match"),
            "retention": srow.get("exact_match", 0.0) / row["exact_match"] if row["exact_match"] else None,
        }
    seconds = {
        k: v.get("seconds") or v.get("ran_seconds")
        for k, v in m["stages"].items()
        if k.partition(":")[0] in EXTRA_STAGES
    }
    info = m.get("train", {})
    prepared = next((o.split("=", 1)[1] for o in overrides if o.startswith("student.path=")), None)
    if prepared and (Path(prepared) / "recover_info.json").is_file():  # bench/minitron_order.py's preparation
        recover = json.loads((Path(prepared) / "recover_info.json").read_text())["seconds"]
        seconds.update({f"minitron_{k}": v for k, v in recover.items()})
    history = json.loads((folder / "student" / "distill_info.json").read_text()).get("history", [])
    t_val, t_held = info.get("teacher_val_exact_match"), info.get("teacher_heldout_exact_match")
    before = sum(v for k, v in seconds.items() if k != "distill" and v)  # extra data, pruning: before step 1
    curve = [
        {
            "step": h["step"],
            "minutes": (before + h["elapsed_s"] - h.get("probe_s", 0.0)) / 60,  # probes are not training time
            "val_retention": h["val_exact_match"] / t_val if t_val else None,
            "heldout_retention": h["heldout_exact_match"] / t_held if t_held else None,
        }
        for h in history
        if "heldout_exact_match" in h
    ]
    return {
        "recipe": name,
        "curve": curve,
        "overrides": overrides,
        "folder": str(folder),
        "wall_s": wall,
        "stage_seconds": seconds,
        "minutes": sum(v for v in seconds.values() if v) / 60,
        "steps": info.get("steps"),
        "param_ratio": m["retention"]["param_ratio"],
        "teacher_test": t["exact_match"],
        "student_test": s["exact_match"],
        "test_retention": m["retention"]["exact_match"],
        "teacher_heldout": th.get("exact_match"),
        "student_heldout": sh.get("exact_match"),
        "heldout_retention": m["retention"].get("heldout_exact_match"),
        "parts": parts,
        "kl_heldout": sh.get("kl"),
        **({"gate": m["gate"]["passed"]} if "gate" in m else {}),
    }


def pair_with_first(rows: list[dict]) -> None:
    """Each recipe against the first on the same examples: answers it lost / gained per split and McNemar's
    exact p (``distill.compare.paired``), so a difference of a few answers is not read as a finding."""
    from distill.compare import paired
    from distill.stages.measure import MISSES

    if not rows:
        return
    first = Path(rows[0]["folder"]) / "eval" / "pytorch" / MISSES
    for r in rows[1:]:
        mine = Path(r["folder"]) / "eval" / "pytorch" / MISSES
        if first.is_file() and mine.is_file():
            r["paired_vs_first"] = {
                "recipe": rows[0]["recipe"],
                **paired(*(json.loads(f.read_text()) for f in (first, mine))),
            }
            print(
                f"{r['recipe']:<28} vs {rows[0]['recipe']}: "
                + "  ".join(
                    f"{k} lost {v['lost']} gained {v['gained']} (McNemar p {v['p']:.3g})"
                    for k, v in r["paired_vs_first"].items()
                    if k != "recipe"
                )
            )


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Three panels: retention per split and heldout part; heldout retention against minutes (the probes);
    retention against student size (filled: heldout, hollow: test), each recipe in its own colour."""
    from matplotlib.figure import Figure

    parts = sorted({p for r in rows for p in r["parts"]})
    fig = Figure(figsize=(15, 4.8))
    a, b, c = fig.subplots(1, 3)
    width = 0.8 / max(len(rows), 1)
    groups = ["test", *parts]
    for i, r in enumerate(rows):
        ys = [r["test_retention"], *(r["parts"].get(p, {}).get("retention") or 0 for p in parts)]
        a.bar([g + i * width for g in range(len(groups))], ys, width, label=r["recipe"], color=f"C{i}")
        if r["curve"]:  # the probes during training: heldout retention against minutes spent so far
            b.plot(
                [x["minutes"] for x in r["curve"]], [x["heldout_retention"] for x in r["curve"]], "o-", color=f"C{i}"
            )
        else:
            b.scatter(r["minutes"], r["heldout_retention"], color=f"C{i}", s=50)
        c.scatter(r["param_ratio"], r["heldout_retention"], color=f"C{i}", s=50)
        c.scatter(r["param_ratio"], r["test_retention"], facecolors="none", edgecolors=f"C{i}", s=50)

    a.set_xticks([g + width * (len(rows) - 1) / 2 for g in range(len(groups))])
    a.set_xticklabels(["test", *(f"heldout:\n{p}" for p in parts)], fontsize=8)
    a.set_ylabel("student / teacher exact match")
    b.set_xlabel("minutes: extra data + pruning + distillation")
    b.set_ylabel("heldout retention (probed examples)")
    c.set_xlabel("student parameters / teacher's")
    c.set_ylabel("retention (filled: heldout, hollow: test)")
    for ax in (a, b, c):
        ax.axhline(0.95, color="gray", linestyle="--", linewidth=0.8)
        ax.grid(alpha=0.3)
    fig.legend(*a.get_legend_handles_labels(), loc="lower center", ncol=min(len(rows), 9), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exp", default="car_assistant_smollm2")
    ap.add_argument("--root", default="runs/recipes", help="one run folder per recipe under it")
    ap.add_argument("--common", nargs="*", default=[], help="overrides for every recipe")
    ap.add_argument("--recipe", action="append", default=[], metavar="NAME=OVERRIDE,OVERRIDE")
    ap.add_argument(
        "--seeds", default=None, help="comma-separated distill.train.seed values: each recipe once per seed"
    )
    ap.add_argument("--out", default=None, help="results JSON (and a PNG beside it)")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else [None]
    rows, groups = [], {}
    for item, seed in ((i, s) for i in a.recipe for s in seeds):
        name, _, rest = item.partition("=")
        overrides = split_overrides(rest) + ([f"distill.train.seed={seed}"] if seed is not None else [])
        label = name if not seed else f"{name}-seed{seed}"
        folder = Path(a.root) / label
        groups.setdefault(name, []).append(folder)
        wall = None
        if not (folder / "metrics.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            wall = run_recipe(a.exp, folder, [*a.common, *overrides], folder.with_suffix(".log"))
        rows.append(summary(label, [*a.common, *overrides], folder, wall))
        r = rows[-1]
        print(
            f"{label:<28} {r['minutes']:6.1f} min  test {r['student_test']:.3f} ({r['test_retention']:.3f})  heldout "
            f"{r['student_heldout']:.3f} ({r['heldout_retention']:.3f})  "
            + "  ".join(f"{p} {v['student']:.3f}/{v['teacher']:.3f}" for p, v in r["parts"].items()),
            flush=True,
        )
    pair_with_first(rows)
    over_seeds = None
    if len(seeds) > 1:
        from distill.seeds import compare_recipes, render
        from distill.seeds import plot as plot_seeds

        over_seeds = compare_recipes(groups)
        print(render(over_seeds))
    if a.out:
        out = Path(a.out)
        out.write_text(json.dumps({"exp": a.exp, "common": a.common, "rows": rows, "seeds": over_seeds}, indent=2))
        plot(rows, out.with_suffix(".png"), f"{a.exp}: what the student keeps of the teacher")
        if over_seeds:
            plot_seeds(over_seeds, out.with_name(f"{out.stem}_seeds.png"))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
