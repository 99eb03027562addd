"""Imports point one way: core <- families <- prune / quantize / export <- distill.

Two checks: every import statement in the source (module level and inside functions) names only its own
layer or a lower one; and every library module imports in a fresh interpreter with the layers above it
blocked. A ``__main__`` module is never imported as a library.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "families", "prune", "quantize", "export", "distill")
# What each package may import from this project (itself included).
ALLOWED = {
    "core": {"core"},
    "families": {"core", "families"},
    "prune": {"core", "families", "prune"},
    "quantize": {"core", "families", "quantize"},
    "export": {"core", "families", "export"},
    "distill": set(PACKAGES),
}
# Command-line edges compose packages of their own layer (never imported by library code):
CLI_EXTRA = {
    "prune/__main__.py": {"distill"},  # the data of a run (--run), or the built-in demo data (with a warning)
    "export/__main__.py": {"quantize"},  # python -m export --quantize int8 int4
}


def _modules(pkg: str, root: Path = ROOT) -> list[Path]:
    return sorted((root / pkg).rglob("*.py"))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``path``, at any depth (lazy imports included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def _upward_imports(pkg: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in _modules(pkg, root):
        rel = str(path.relative_to(root))
        allowed = ALLOWED[pkg] | CLI_EXTRA.get(rel, set())
        for line, mod in _imports(path):
            top = mod.split(".")[0]
            if top in PACKAGES and top not in allowed:
                bad.append(f"{rel}:{line} imports {mod}")
            if mod.endswith("__main__"):
                bad.append(f"{rel}:{line} imports the command-line module {mod} as a library")
    return bad


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_point_one_way(pkg):
    bad = _upward_imports(pkg)
    assert not bad, "\n".join(bad)


def _module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the project modules it imports (lazy imports included; ``from pkg import mod`` is an edge
    to ``pkg.mod``, ``from pkg import name`` one to ``pkg``)."""
    mods = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for pkg in PACKAGES
        for p in _modules(pkg, root)
    }
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names
                ]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_between_modules():
    """Within a layer too: two modules that import each other (even lazily, inside a function) are one
    module in two files, and a package ``__init__`` whose submodules import it back is a circle."""
    assert _cycles(_module_graph()) == []


def test_a_planted_import_circle_is_caught(tmp_path):
    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    (tmp_path / "export" / "a.py").write_text("from export.b import f\n")
    (tmp_path / "export" / "b.py").write_text("def f():\n    from export import a\n")
    (tmp_path / "export" / "c.py").write_text("from export import a\n")
    assert _cycles(_module_graph(tmp_path)) == [["export.a", "export.b"]]


def test_no_bench_or_notebook_imports_a_cli_module_as_a_library():
    """(Tests may import a ``__main__`` to test that command line itself.)"""
    bad = []
    for path in ROOT.glob("bench/*.py"):
        bad += [f"{path.name}:{line} {mod}" for line, mod in _imports(path) if mod.endswith("__main__")]
    for nb in ROOT.glob("notebooks/*.ipynb"):
        bad += [f"{nb.name}" for line in nb.read_text().splitlines() if ".__main__ import" in line]
    assert not bad, bad


@pytest.mark.parametrize("pkg", PACKAGES[:-1])
def test_each_layer_imports_with_the_layers_above_blocked(pkg):
    above = [p for p in PACKAGES if p not in ALLOWED[pkg]]
    mods = [
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for p in _modules(pkg)
        if p.name != "__main__.py"
    ]
    code = textwrap.dedent(f"""
        import importlib, importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {above!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        for m in {mods!r}:
            importlib.import_module(m)
        print("torch" in sys.modules)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if pkg in ("core", "families"):
        assert proc.stdout.strip() == "False", f"importing {pkg} imported torch"


def test_the_embeddable_runtime_agrees_with_core_on_folder_names():
    """export/runtime.py is copied into applications alone, so it repeats two names from core."""
    from core import onnx_files
    from export import runtime

    assert (runtime.ONNX_FILE, runtime.CONFIG_FILE) == (onnx_files.ONNX_FILE, onnx_files.CONFIG_FILE)


def test_a_planted_upward_import_is_caught(tmp_path):
    """The direction check itself, on a copy of the tree (nothing is written into the source): a core
    module that imports distill is reported."""
    shutil.copytree(ROOT / "core", tmp_path / "core", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "core" / "_planted_upward.py").write_text("def f():\n    from distill import pipeline\n")
    assert _upward_imports("core", tmp_path) == ["core/_planted_upward.py:2 imports distill"]
    assert _upward_imports("core") == []


def test_the_trainer_imports_no_export_quantize_or_prune_code():
    code = "import sys, distill.train; print(sorted({m.split('.')[0] for m in sys.modules} & {'export', 'quantize', 'prune'}))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"
