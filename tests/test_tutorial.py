"""tutorial.ipynb runs top to bottom without an error (nbclient, a fresh kernel, no network).

It draws its plots and shows no progress bar (its first cell sets `TQDM_DISABLE=1`, which every bar
of the modules obeys)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tutorial_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "tutorial.ipynb", as_version=4)
    # Any exception in a cell raises CellExecutionError here, with the cell and the traceback.
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    # The plots are there (heatmap, ratio histogram, curves, reward hacking).
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    # The first cell's TQDM_DISABLE=1 holds for every bar the modules
    # draw: no progress bar in any output.
    streams = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert not re.search(r"\d+%\|", streams), "a progress bar in the notebook's output"
