"""The notebooks run top to bottom (with small settings) and produce what they promise."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, workdir: Path, **parameters) -> nbformat.NotebookNode:
    """Execute ``notebooks/<name>`` in ``workdir``, its ``parameters`` cell replaced by ``parameters``."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    tagged[0].source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    ).execute()
    return notebook


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_committed_notebooks_carry_no_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: strip outputs before committing"


@pytest.mark.slow
def test_quickstart(tmp_path):
    out = tmp_path / "quickstart"
    run_notebook(
        "quickstart.ipynb",
        tmp_path,
        IMAGE_SIZE=32,
        TRAIN_PAIRS=16,
        EPOCHS=3,
        WARMUP_EPOCHS=1,
        OUTPUT_DIR=str(out),
        SEED=0,
    )
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"identity", "baseline", "adacs"}
    assert all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in results.values())
    for figure in ("panels.png", "momentum.png"):
        assert (out / figure).stat().st_size > 1000
    assert (out / "adacs" / "metrics.csv").exists() and (out / "baseline" / "metrics.csv").exists()


@pytest.mark.slow
def test_own_data(tmp_path):
    workdir = tmp_path / "own"
    run_notebook(
        "own_data.ipynb", tmp_path, N_PAIRS=10, IMAGE_SIZE=32, EPOCHS=3, WARMUP_EPOCHS=1, WORKDIR=str(workdir), SEED=0
    )
    run_dir = workdir / "run"
    assert (run_dir / "splits.json").exists() and (run_dir / "backbone.pt").exists()
    with open(run_dir / "evaluation" / "cases.csv") as f:
        cases = list(csv.DictReader(f))
    assert cases and all(math.isfinite(float(case["dice"])) for case in cases)
    for name in ("warped.nii.gz", "displacement.nii.gz", "warped_labels.nii.gz"):
        assert (workdir / "registered" / name).exists()
    assert (workdir / "registered.png").stat().st_size > 1000
