"""The fair comparison: each method at its validation-best λ, equal backbone budgets, paired tests, the trade-off."""

from __future__ import annotations

import json

import pytest

from adacs_lightning.evaluation.fair import (
    choose_lambda,
    differing_overrides,
    draw_tradeoff,
    grid_edges,
    validation_table,
)

from .helpers.fakes import make_folder
from .helpers.tables import read_csv
from .helpers.training import adacs_train

TINY_SWEEP = ["method=baseline,adacs_normalised,robust", "method.lam=0.01,0.05", "seed=0"]


def test_lambda_is_chosen_on_mean_validation_dice_per_method():
    rows = [
        {"backbone": "vm", "method": "baseline", "lam": 0.01, "dice_mean": 0.70},
        {"backbone": "vm", "method": "baseline", "lam": 0.05, "dice_mean": 0.74},
        {"backbone": "vm", "method": "adacs", "lam": 0.01, "dice_mean": 0.73},
        {"backbone": "vm", "method": "adacs", "lam": 0.05, "dice_mean": 0.73},  # a tie: the smaller λ
    ]
    assert choose_lambda(rows) == {("vm", "baseline"): 0.05, ("vm", "adacs"): 0.01}


def test_an_optimum_at_the_grids_edge_is_named_with_the_way_out():
    rows = [
        {"backbone": "vm", "method": "baseline", "lam": 0.01, "dice_mean": 0.70},
        {"backbone": "vm", "method": "baseline", "lam": 0.05, "dice_mean": 0.74},
        {"backbone": "vm", "method": "baseline", "lam": 0.1, "dice_mean": 0.72},  # inside: no note
        {"backbone": "vm", "method": "adacs", "lam": 0.01, "dice_mean": 0.75},  # the smallest: a note
        {"backbone": "vm", "method": "adacs", "lam": 0.05, "dice_mean": 0.73},
        {"backbone": "vm", "method": "robust", "lam": 0.05, "dice_mean": 0.73},  # one λ: nothing to say
    ]
    notes = grid_edges(rows, choose_lambda(rows))
    assert len(notes) == 1 and notes[0].startswith("vm/adacs: the chosen λ = 0.01 is the smallest")
    assert "add a smaller λ" in notes[0]


def tradeoff_rows(folding: float) -> list[dict]:
    return [
        {"backbone": "vm", "method": method, "lam": lam, "dice_mean": 0.7 + lam, "smoothness_mean": 0.1 / lam,
         "folding_pct_mean": folding * (method == "baseline")}
        for method in ("baseline", "adacs") for lam in (0.01, 0.05)
    ]  # fmt: skip


@pytest.mark.parametrize("folding", [0.0, 0.3])
def test_tradeoff_figure_plots_folding_only_when_some_run_folds(folding):
    import matplotlib.pyplot as plt

    rows = tradeoff_rows(folding)
    fig = draw_tradeoff(rows, choose_lambda(rows))
    smoothness = fig.axes[0]
    assert len(smoothness.get_lines()) == 2 + 2  # a line per method and a star at each chosen λ
    assert smoothness.get_xscale() == "log" and "λ=0.05" in [t.get_text() for t in smoothness.texts]
    fig.canvas.draw()
    labels = [t.get_text() for t in smoothness.get_xticklabels(minor=True) if t.get_text()]
    assert labels == []  # no minor labels to overlap ("3×10⁻²4×10⁻²")
    if folding:
        folds = fig.axes[1]
        assert len(fig.axes) == 2 and len(folds.get_lines()) == 4
        assert max(x for line in folds.get_lines() for x in line.get_xdata()) == pytest.approx(0.3)
    else:  # every point would sit on x = 0: one panel, and its title says why
        assert len(fig.axes) == 1
        assert "no folding in any of the 4" in smoothness.get_title()
    plt.close(fig)


@pytest.mark.slow
def test_fair_comparison_on_the_synthetic_data(tmp_path):
    sweep = tmp_path / "sweep"
    result = adacs_train(
        "-m", "experiment=fair_comparison", "debug=tiny", "backbone_epochs=2", *TINY_SWEEP,
        f"hydra.sweep.dir={sweep}", "logger=none", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("validation.md", "validation.csv", "tradeoff.png", "comparison.md", "paired_tests.csv"):
        assert (sweep / name).is_file(), name
    validation = read_csv(sweep / "validation.csv")
    assert {(r["method"], r["lam"]) for r in validation} == {
        (m, lam) for m in ("baseline", "adacs_normalised", "robust") for lam in (0.01, 0.05)
    }
    comparison = read_csv(sweep / "comparison.csv")
    assert {r["method"] for r in comparison} == {"baseline", "adacs_normalised", "robust"}
    assert all(r["lam"] in (0.01, 0.05) for r in comparison)
    tests = read_csv(sweep / "paired_tests.csv")
    assert {(t["method"], t["reference"]) for t in tests if t["metric"] == "dice"} == {
        ("adacs_normalised", "baseline"),
        ("robust", "baseline"),
    }
    # equal budgets: AdaCS's warm-up B is added to its epochs; the backbone gets 2 epochs of updates everywhere
    epochs = {}
    for run in sweep.iterdir():
        if (run / "summary.json").is_file():
            method = (run / ".hydra" / "overrides.yaml").read_text().split("method=")[1].split()[0]
            epochs[method] = json.loads((run / "summary.json").read_text())["epochs"]
    assert epochs == {"baseline": 2, "adacs_normalised": 3, "robust": 2}


@pytest.mark.slow
def test_fair_comparison_on_a_folder_of_labelled_pairs(tmp_path):
    csv = make_folder(tmp_path / "data", rows=8, shape=(16, 16), formats=(".nii.gz",))
    sweep = tmp_path / "sweep"
    result = adacs_train(
        "-m", "experiment=fair_comparison", "debug=tiny", "backbone_epochs=1", "data=folder", f"data.csv={csv}",
        "data.image_size=[16,16]", "data.batch_size=2", *TINY_SWEEP, f"hydra.sweep.dir={sweep}", "logger=none",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / "comparison.md").is_file() and (sweep / "tradeoff.png").is_file()
    assert "Chosen λ" in result.stdout + result.stderr
    # Two λ per arm: every chosen λ is at an edge, and the report says so.
    assert "λ at the grid's edge" in (sweep / "validation.md").read_text()


def test_arms_are_labelled_by_the_overrides_that_differ(tmp_path):
    folders = []
    for index, overrides in enumerate(
        (["method=adacs", "scorer=unet", "seed=0"], ["method=adacs", "scorer=voxelmorph", "seed=1"])
    ):
        folder = tmp_path / str(index)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        folders.append(folder)
    assert differing_overrides(folders, ignore=("method", "seed")) == [["scorer=unet"], ["scorer=voxelmorph"]]
    assert validation_table([]) == []
