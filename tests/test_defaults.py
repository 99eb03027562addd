"""Defaults live in conf/ only: no Python default may disagree with the YAML value of the knob it names.

Scanned (AST, every package module): keyword defaults of function parameters, ``x.get("name", default)``,
``getattr(x, "name", default)`` and ``x.name if x else default``, wherever ``name`` is a leaf key of the
composed default config. A literal that is none of that key's YAML values is a Python default shadowing
the YAML one (e.g. calibration examples 256 in a CLI, 512 in conf/). A line that says "not a knob" is a
library default on purpose (e.g. the embeddable ONNX runner's batch size) and is skipped.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.hashing import flatten

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "families", "prune", "quantize", "export", "distill")
# Names that are not one knob: Hugging Face config.json fields (the student / bootstrap sizes reuse their
# names on purpose; code reading a model's own config.json follows HF's defaults), and ``alpha``, which is
# LoRA's scale in conf/ but skew-KL's mixing weight (distill.skew_alpha) in distill.losses.
NOT_KNOBS = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "tie_word_embeddings",
    "alpha",
}


def yaml_values() -> dict[str, set]:
    """Leaf name -> the values it has at any path of the default configs."""
    from dataclasses import asdict

    from distill.config import compose

    seen: dict[str, set] = {}
    for overrides in ([], ["+exp=car_assistant"]):
        for key, value in flatten(asdict(compose(overrides))).items():
            if isinstance(value, bool | int | float | str):
                seen.setdefault(key.rsplit(".", 1)[-1], set()).add(value)
    return {k: v for k, v in seen.items() if k not in NOT_KNOBS}


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return ...


def shadowing_defaults(paths, values: dict) -> list[str]:
    """Every Python default in ``paths`` that names a config knob with a different literal value."""
    out = []

    def check(where, name, node):
        if "not a knob" in lines[node.lineno - 1]:  # a deliberate library default, said so on its line
            return
        if name in values and not any(isinstance(v, str) for v in values[name]):
            lit = _literal(node)
            if lit is not ... and lit is not None and lit not in values[name]:
                out.append(f"{where}: {name}={lit!r} in Python, {sorted(values[name])} in conf/")

    for path in paths:
        text = Path(path).read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            where = f"{Path(path).relative_to(ROOT) if Path(path).is_relative_to(ROOT) else path}:{node.__dict__.get('lineno')}"
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                pos = a.posonlyargs + a.args
                for arg, default in zip(pos[len(pos) - len(a.defaults) :], a.defaults, strict=True):
                    check(where, arg.arg, default)
                for arg, default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
                    if default is not None:
                        check(where, arg.arg, default)
            elif isinstance(node, ast.Call) and len(node.args) >= 2:
                f = node.func
                is_get = isinstance(f, ast.Attribute) and f.attr == "get" and len(node.args) == 2
                is_getattr = isinstance(f, ast.Name) and f.id == "getattr" and len(node.args) == 3
                key = node.args[0] if is_get else node.args[1] if is_getattr else None
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    check(where, key.value, node.args[-1])
            elif isinstance(node, ast.IfExp) and isinstance(node.body, ast.Attribute):
                check(where, node.body.attr, node.orelse)
    return out


def test_no_python_default_shadows_a_yaml_one():
    paths = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    problems = shadowing_defaults(paths, yaml_values())
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        "def f(calib_examples=256):\n    pass\n",
        "def f(cfg):\n    return cfg.chunk_size if cfg else 1024\n",
        "def f(d):\n    return d.get('block_size', 64)\n",
    ],
)
def test_a_planted_shadowing_default_is_caught(tmp_path, source):
    planted = tmp_path / "planted.py"
    planted.write_text(source)
    assert len(shadowing_defaults([planted], yaml_values())) == 1
