"""``python -m prune SRC DEST --fraction 0.25 --data calib.jsonl``: prune any local HF folder into a
standard HF folder.

Activation importance is measured on ``--data`` (JSONL: chat ``messages`` or ``prompt``/``completion``
lines), or on the training data of a pipeline run (``--run DIR``: the data its ``config.yaml`` names,
system prompt included): give your own task data. Without either the built-in car-assistant demo data is
used, with a warning, since channels that matter for your task may rank low on it. Defaults come from
``conf/student/small.yaml`` (``prune:``), the same values the pipeline uses.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from prune.plan import SIZE_KEYS

log = logging.getLogger("prune")
CONF = Path(__file__).resolve().parent.parent / "conf" / "student" / "small.yaml"


def conf_defaults() -> dict:
    """The pipeline's pruning defaults (``prune:`` in conf/student/small.yaml): one home for them."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(CONF).prune)


def demo_records(n: int) -> list[dict]:
    """Built-in car-assistant training examples: the fallback calibration set (the CLI warns)."""
    from distill.data.car_assistant import GeneratorSettings, generate

    return [e.to_record() for e in generate("train", GeneratorSettings(num_train=max(n, 64)))]


def run_records(run_dir: str) -> list[dict]:
    """The training split of the pipeline run in ``run_dir``, read from the data its config.yaml names."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from core.jsonl import DataError

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise DataError(f"--run: {run_dir} has no config.yaml; give the folder of a pipeline run (hydra.run.dir)")
    from distill.data import load_records

    data = OmegaConf.to_container(OmegaConf.load(path))["data"]
    defaults = OmegaConf.to_container(OmegaConf.load(CONF.parent.parent / "data" / "car_assistant.yaml"))
    return load_records(SimpleNamespace(**{**defaults, **data}), "train")  # keys an older run did not have


def main(argv: list[str] | None = None) -> int:
    d = conf_defaults()
    ap = argparse.ArgumentParser(
        prog="python -m prune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("src", help="local Hugging Face model folder (any family in families.FAMILIES)")
    ap.add_argument("dest", help="output folder (written atomically)")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--fraction", type=float, help="parameter budget as a fraction of the source model")
    budget.add_argument("--bytes", dest="bytes_", type=int, help="budget in bytes at 4 bytes per parameter")
    for k in SIZE_KEYS:
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, help="explicit target size")
    ap.add_argument("--strategy", choices=("width", "depth"), default=d["strategy"], help="for budgets")
    ap.add_argument("--method", choices=("activation", "magnitude"), default=d["method"])
    ap.add_argument("--align", type=int, default=d["align"], help="hidden / MLP sizes are multiples of this")
    ap.add_argument("--keep-heads", action="store_true", help="budget pruning leaves attention heads alone")
    ap.add_argument("--depth", type=int, help="with a budget: keep this many layers; the width fills the budget")
    ap.add_argument(
        "--hidden-fraction",
        type=float,
        help="with a budget: keep this share of the hidden size (residual stream); the MLP fills the budget",
    )
    ap.add_argument("--calib-examples", type=int, default=d["calib_examples"])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", help="JSONL calibration data: your task's examples (default: the built-in demo data)")
    src.add_argument("--run", help="a pipeline run folder: calibrate on the training data its config.yaml names")
    ap.add_argument(
        "--tools-file",
        help="with --data: the tools of every line (a JSON list of function schemas), as data.tools_file",
    )
    ap.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin (pickle) weights")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from core.jsonl import DataError, read_jsonl, read_tools
    from prune import PlanError, prune_folder

    sizes = {k: getattr(a, k) for k in SIZE_KEYS if getattr(a, k) is not None}
    if a.tools_file and not a.data:
        print("error: --tools-file goes with --data (a run's own tools_file is read with --run)", file=sys.stderr)
        return 2
    try:
        records = None
        if a.method == "activation":
            if a.data:
                tools = read_tools(a.tools_file, "--tools-file") if a.tools_file else None
                records = read_jsonl(a.data, key="--data", tools=tools)
            elif a.run:
                records = run_records(a.run)
                log.info("calibrating on the training data of the run in %s (%d examples)", a.run, len(records))
            else:
                log.warning(
                    "no --data or --run: ranking channels on the built-in car-assistant demo data, NOT on your "
                    "task; pass --data your_task.jsonl or --run RUN_DIR (or --method magnitude)"
                )
                records = demo_records(a.calib_examples)
        report = prune_folder(
            a.src,
            a.dest,
            sizes=sizes,
            fraction=a.fraction,
            bytes_=a.bytes_,
            strategy=a.strategy,
            method=a.method,
            align=a.align,
            prune_heads=not a.keep_heads,
            depth=a.depth,
            hidden_fraction=a.hidden_fraction,
            calib_examples=a.calib_examples,
            records=records,
            allow_pickle=a.allow_pickle,
        )
    except (PlanError, DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: report[k] for k in ("shape", "params", "teacher_params", "fraction")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
