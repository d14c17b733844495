"""Every course notebook runs top to bottom from a fresh kernel, headless, on the CPU, at a tiny
budget (NOTEBOOK_ITERS=2: the point is that every cell runs, not what it learns)."""
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: a tiny budget, runs in a temp folder, one CPU thread.
    monkeypatch.setenv("NOTEBOOK_ITERS", "2")
    monkeypatch.setenv("NOTEBOOK_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in cells), "a code cell did not run"
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors
    # The first cell says what the notebook teaches; the last one lists things to try.
    assert nb.cells[0].cell_type == "markdown" and nb.cells[-1].cell_type == "markdown"
    assert "Try this" in nb.cells[-1].source
    # Budget and checkpoint variables near the top, as notebooks/README.md documents them.
    setup = "\n".join(c.source for c in cells[:2])
    assert 'BUDGET = int(os.environ.get("NOTEBOOK_ITERS"' in setup
    assert 'CHECKPOINT_DIR = os.environ.get("NOTEBOOK_RUNS", None)' in setup
    assert not (path.parent / "datasets").exists() and not (path.parent / "runs").exists()
