"""Every notebook runs top to bottom at smoke sizes (nbclient), and is stored without outputs."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_notebooks_are_stored_without_outputs():
    assert len(NOTEBOOKS) == 3
    for path in NOTEBOOKS:
        for cell in json.loads(path.read_text())["cells"]:
            assert not cell.get("outputs") and not cell.get("execution_count"), path.name


@pytest.fixture(scope="module")
def notebook_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("notebooks")
    return {"DISTILL_CACHE": str(base / "cache"), "NOTEBOOK_RUNS": str(base / "runs"), "NOTEBOOK_EXP": "smoke"}


def execute(nb, folder) -> list[str]:
    """Run every cell (errors recorded, not raised, so all are reported); each error as cell, source,
    exception and the end of its traceback."""
    from nbclient import NotebookClient

    NotebookClient(
        nb, timeout=900, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(folder)}}
    ).execute()
    return [
        f"cell {i}:\n{c.source}\n-> {o['ename']}: {o['evalue']}\n" + "\n".join(o.get("traceback", [])[-3:])
        for i, c in enumerate(nb.cells)
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, notebook_env, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    for k, v in notebook_env.items():
        monkeypatch.setenv(k, v)  # the kernel inherits this process's environment
    nb = nbformat.read(path, as_version=4)
    errors = execute(nb, path.parent)
    assert not errors, "\n\n".join(errors)
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 1, f"{path.name} shows no plot"


def test_a_failing_cell_is_reported_by_name(tmp_path):
    """The check above can fail: a planted error in a middle cell is found, and later cells still ran."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell(src) for src in ("x = 1", "raise ValueError('planted')", "y = x + 1")]
    )
    errors = execute(nb, tmp_path)
    assert len(errors) == 1 and errors[0].startswith("cell 1:") and "ValueError: planted" in errors[0]
