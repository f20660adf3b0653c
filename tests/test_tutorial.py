"""tutorial.ipynb runs top to bottom without an error (nbclient, a fresh kernel, no network)."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tutorial_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    # Any exception in a cell raises CellExecutionError here, with the cell and the traceback.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # The plots are there (heatmap, ratio histogram, curves, reward hacking).
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
