"""adacs-eval: metrics against hand-computed cases, paired tests against SciPy, the reports it writes."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats
from torch import nn

from adacs_lightning.cli import evaluate as evaluate_cli
from adacs_lightning.evaluation import CaseEvaluator, iterate_pairs, paired_test
from adacs_lightning.metrics import dice_per_label, folding_percentage, surface_distances_per_label

from .helpers.runs import make_run_folder, save_tiny_checkpoint
from .helpers.tables import read_csv
from .helpers.training import BIN, run_command

SPACING = (2.0, 0.5)  # mm along axis 0 and axis 1


def _square(rows: slice, cols: slice, shape=(24, 24)) -> torch.Tensor:
    label = torch.zeros((1, 1, *shape), dtype=torch.long)
    label[0, 0, rows, cols] = 1
    return label


# The two 8×8 squares below differ by 2 rows (4 mm). Distances from each edge voxel of one to the
# nearest edge voxel of the other, in mm: the far row (8 voxels) 4 mm; the row inside the other
# square: 0 at both corners, then 0.5, 1, 1.5, 1.5, 1, 0.5 mm along the 0.5 mm axis; the side
# columns: 2 mm for the row next to the far row, 0 for the 5 rows on the other's sides.
HAND_DISTANCES = [4.0] * 8 + [0, 0.5, 1, 1.5, 1.5, 1, 0.5, 0] + [2.0, 0, 0, 0, 0, 0] * 2


def test_dice_hausdorff_and_surface_distance_of_shifted_squares_in_mm():
    a, b = _square(slice(4, 12), slice(4, 12)), _square(slice(6, 14), slice(4, 12))
    assert dice_per_label(a, b, [1]).item() == pytest.approx(2 * 48 / 128)  # 6×8 overlap of two 8×8
    distances = surface_distances_per_label(a, b, [1], spacing=SPACING)
    assert len(HAND_DISTANCES) == 28  # the edge ring of an 8×8 square
    assert distances["hd"].item() == pytest.approx(4.0)
    assert distances["hd95"].item() == pytest.approx(np.percentile(HAND_DISTANCES, 95))
    # The shift is symmetric, so both directions give the same 28 distances.
    assert distances["asd"].item() == pytest.approx(sum(HAND_DISTANCES) / 28)  # 1.5 mm


def test_hd95_ignores_an_outlier_that_the_maximum_hausdorff_distance_sees():
    reference = _square(slice(4, 12), slice(4, 12))
    prediction = reference.clone()
    prediction[0, 0, 20, 8] = 1  # 9 rows below the square's edge voxel (11, 8): 18 mm
    distances = surface_distances_per_label(prediction, reference, [1], spacing=torch.tensor([SPACING]))
    assert distances["hd"].item() == pytest.approx(18.0)
    assert distances["hd95"].item() == pytest.approx(0.0)  # 1 of 29 distances is non-zero
    assert distances["asd"].item() == pytest.approx(18.0 / (29 + 28))


def test_surface_distances_are_nan_for_a_missing_label():
    present = _square(slice(4, 12), slice(4, 12))
    distances = surface_distances_per_label(torch.zeros_like(present), present, [1], spacing=SPACING)
    assert all(math.isnan(v.item()) for v in distances.values())


class ConstantShift(nn.Module):
    """A stand-in backbone returning one displacement everywhere (voxels)."""

    spatial_dims, in_channels = 2, 1

    def __init__(self, shift: tuple[float, float]) -> None:
        super().__init__()
        self.shift = torch.tensor(shift).view(1, 2, 1, 1)

    def forward(self, moving, fixed):
        return self.shift.expand(moving.shape[0], 2, *moving.shape[2:]).clone()


def test_case_evaluator_registers_with_the_warp_convention_and_measures_in_mm():
    source_label = _square(slice(6, 14), slice(4, 12))
    target_label = _square(slice(4, 12), slice(4, 12))
    batch = {
        "source": source_label.float(),
        "target": target_label.float(),
        "source_label": source_label,
        "target_label": target_label,
        "meta": {"case_id": ["c0"], "spacing": torch.tensor([SPACING])},
    }
    (pair,) = list(iterate_pairs([batch]))
    # moving(x + u(x)) = fixed(x): u = +2 rows brings the lower square onto the upper one.
    row = CaseEvaluator(ConstantShift((2.0, 0.0)), [1], {1: "square"}).evaluate(pair)
    assert row["case_id"] == "c0"
    assert row["dice_square"] == row["dice"] == pytest.approx(1.0)
    assert row["hd95"] == row["hd"] == row["asd"] == pytest.approx(0.0)
    assert row["dice_initial"] == pytest.approx(0.75)
    assert row["folding_pct"] == 0.0 and row["time_ms"] > 0.0
    unregistered = CaseEvaluator(ConstantShift((0.0, 0.0)), [1]).evaluate(pair)
    assert unregistered["hd_label1"] == pytest.approx(4.0) and unregistered["asd"] == pytest.approx(1.5)


def test_folding_percentage_of_a_known_field():
    ddf = torch.zeros(1, 2, 8, 8)
    ddf[0, 0] = -2.0 * torch.arange(8.0).view(8, 1)  # x ↦ x − 2x: det = 1 − 2 = −1 everywhere
    assert folding_percentage(ddf).item() == pytest.approx(100.0)
    ddf[0, 0, :4] = 0.0  # identity in the top half (the boundary rows mix both)
    assert 0.0 < folding_percentage(ddf).item() < 100.0


def test_paired_tests_match_scipy_and_hand_values():
    a = [0.70, 0.75, 0.80, 0.72, 0.78]
    b = [0.72, 0.78, 0.81, 0.76, 0.79]  # b − a: 0.02, 0.03, 0.01, 0.04, 0.01, all positive
    result = paired_test(a, b)
    diff = np.subtract(b, a)
    assert result.n == 5 and result.mean_difference == pytest.approx(0.022)
    assert result.t_statistic == pytest.approx(diff.mean() / (diff.std(ddof=1) / math.sqrt(5)))
    assert result.t_pvalue == pytest.approx(2 * stats.t.sf(result.t_statistic, df=4))
    assert result.t_pvalue == pytest.approx(stats.ttest_rel(b, a).pvalue)
    # Exact Wilcoxon: all 5 differences positive is 1 of 2^5 sign patterns, two-sided p = 2/32.
    assert result.wilcoxon_pvalue == pytest.approx(2 / 32)
    assert paired_test([1.0, float("nan"), 3.0], [2.0, 5.0, 3.5]).n == 2  # NaN pairs dropped
    assert math.isnan(paired_test([1.0, 2.0], [1.0, 2.0]).t_pvalue)  # no difference: no test


@pytest.fixture
def two_runs(tmp_path):
    return [
        make_run_folder(tmp_path / "runs" / "a", method="baseline"),
        make_run_folder(tmp_path / "runs" / "b", method="adacs"),
    ]


def test_eval_writes_cases_summary_and_comparison(two_runs, tmp_path, capsys):
    out = tmp_path / "report"
    files = evaluate_cli.run([str(p) for p in two_runs] + ["--output", str(out), "--figures", "1", "--device", "cpu"])
    assert set(files) >= {"cases", "summary", "summary_md", "comparison", "comparison_md", "paired_tests"}
    cases = read_csv(out / "cases.csv")
    assert len(cases) == 8  # 2 runs × 4 test pairs
    assert {c["method"] for c in cases} == {"baseline", "adacs"}
    for column in ("dice_myocardium", "hd95_myocardium", "hd_myocardium", "asd_myocardium", "folding_pct", "time_ms"):
        assert all(math.isfinite(c[column]) for c in cases), column
    assert all(c["hd95"] <= c["hd"] for c in cases)
    summary = read_csv(out / "summary.csv")
    baseline = [c["dice"] for c in cases if c["method"] == "baseline"]
    row = next(r for r in summary if r["method"] == "baseline")
    assert row["dice_mean"] == pytest.approx(np.mean(baseline)) and row["dice_std"] == pytest.approx(
        np.std(baseline, ddof=1)
    )
    tests = read_csv(out / "paired_tests.csv")
    dice_test = next(t for t in tests if t["metric"] == "dice")
    adacs = [c["dice"] for c in cases if c["method"] == "adacs"]
    assert dice_test["n"] == 4 and dice_test["reference"] == "baseline"
    assert dice_test["mean_difference"] == pytest.approx(np.mean(np.subtract(adacs, baseline)))
    markdown = (out / "comparison.md").read_text()
    assert "| backbone | method | runs | cases | Dice (%) ↑ | HD95 (mm) ↓ | ASD (mm) ↓ |" in markdown
    assert "| voxelmorph | adacs | 1 | 4 |" in markdown and "Wilcoxon p" in markdown
    assert f"{100 * np.mean(adacs):.2f} ± {100 * np.std(adacs, ddof=1):.2f}" in markdown
    assert len(list((out / "figures").rglob("*.png"))) == 2  # one case per run
    printed = capsys.readouterr().out
    assert "# Comparison" in printed and "# Evaluation" in printed


def test_data_overrides_and_a_bare_checkpoint(tmp_path, two_runs):
    files = evaluate_cli.run([str(two_runs[0]), "data.test_pairs=2", "--figures", "0"])
    assert files["cases"] == two_runs[0] / "evaluation" / "cases.csv"
    assert len(read_csv(files["cases"])) == 2
    bare = tmp_path / "bare.ckpt"
    save_tiny_checkpoint(bare, scoring=False)
    with pytest.raises(Exception, match="--data synthetic"):
        evaluate_cli.run([str(bare), "--figures", "0"])
    files = evaluate_cli.run(
        [str(bare), "data=synthetic", "data.image_size=32", "data.test_pairs=3", "--figures", "0", "-o", str(tmp_path)]
    )
    assert len(read_csv(files["cases"])) == 3


def test_cases_pair_only_within_the_same_data(tmp_path):
    runs = [
        make_run_folder(tmp_path / f"{method}{seed}", method=method, seed=seed)
        for method in ("baseline", "adacs")
        for seed in (0, 1)
    ]
    evaluate_cli.run([str(r) for r in runs] + ["-o", str(tmp_path / "out"), "--figures", "0"])
    tests = read_csv(tmp_path / "out" / "paired_tests.csv")
    assert {t["n"] for t in tests if t["metric"] == "dice"} == {8}  # 4 cases × 2 seeds, paired per seed
    table = read_csv(tmp_path / "out" / "comparison.csv")
    assert [(r["method"], r["runs"], r["n"]) for r in table] == [("baseline", 2, 8), ("adacs", 2, 8)]


def test_multirun_callback_writes_the_comparison_into_the_sweep_folder(tmp_path):
    for i, method in enumerate(("baseline", "adacs")):
        make_run_folder(tmp_path / str(i), method=method)
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # a failed job: config but no checkpoint
    (tmp_path / "2" / ".hydra" / "config.yaml").write_text("seed: 0\n")
    callback = evaluate_cli.CompareOnMultirunEnd(figures=0, device="cpu")
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert (tmp_path / "comparison.md").is_file() and (tmp_path / "comparison.csv").is_file()
    assert len(read_csv(tmp_path / "cases.csv")) == 8


def test_clear_errors_for_missing_and_corrupt_checkpoints(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "No checkpoint or run folder at" in capsys.readouterr().err
    corrupt = tmp_path / "broken.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        evaluate_cli.main([str(corrupt), "--data", "synthetic"])
    assert "could not be read as a checkpoint" in capsys.readouterr().err
    empty_run = tmp_path / "run"
    (empty_run / ".hydra").mkdir(parents=True)
    (empty_run / ".hydra" / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(SystemExit):
        evaluate_cli.main([str(empty_run)])
    assert "has no checkpoint" in capsys.readouterr().err


def test_console_script_help(tmp_path):
    result = run_command([str(BIN / "adacs-eval"), "--help"], tmp_path)
    assert result.returncode == 0 and "paired t-test" in result.stdout and "data.KEY=VALUE" in result.stdout


@pytest.mark.slow
def test_tiny_synthetic_benchmark_writes_the_comparison(tmp_path):
    from .helpers.training import adacs_train

    sweep = tmp_path / "sweep"
    result = adacs_train(
        "-m",
        "experiment=synthetic_benchmark",
        "debug=tiny",
        "hydra.sweeper.params.backbone=voxelmorph",
        "hydra.sweeper.params.seed=0",
        "trainer.max_epochs=3",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = read_csv(sweep / "comparison.csv")
    assert sorted(r["method"] for r in table) == ["adacs", "baseline"]
    assert all(r["n"] == 4 for r in table)  # debug=tiny: 4 test pairs
    markdown = (sweep / "comparison.md").read_text()
    assert "| voxelmorph | adacs |" in markdown and "Wilcoxon p" in markdown
    assert list(sweep.glob("*/figures/momentum.png"))  # the AdaCS run's μ_T / m_T curves


def test_data_key_ignores_loading_settings_but_not_the_pairs():
    from adacs_lightning.evaluation.runs import data_key

    base = {"_target_": "x.Folder", "csv": "/data/pairs.csv", "seed": 0, "image_size": 64}
    same = {**base, "batch_size": 2, "num_workers": 4, "output_dir": "/elsewhere", "cache_workers": 3}
    assert data_key(base) == data_key(same)
    assert data_key(base) != data_key({**base, "seed": 1})


def _blobs(seed: int, shape=(2, 1, 20, 24)) -> torch.Tensor:
    """Label maps with values 0–3 as smoothed random blobs (ragged surfaces, several components)."""
    noise = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    smooth = torch.nn.functional.avg_pool2d(noise, 5, stride=1, padding=2)
    return torch.bucketize(smooth, torch.tensor([0.45, 0.5, 0.55]))


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # inside MONAI
def test_surface_distances_equal_monai_with_one_edge_pass_per_sample_and_label(monkeypatch):
    import monai.metrics.utils as monai_utils
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    from monai.networks.utils import one_hot

    prediction, reference = _blobs(0), _blobs(1)
    labels, spacing = [1, 3], torch.tensor([[2.0, 0.5], [1.0, 1.5]])
    calls = []
    original = monai_utils.get_mask_edges
    monkeypatch.setattr(monai_utils, "get_mask_edges", lambda *a, **k: calls.append(1) or original(*a, **k))
    distances = surface_distances_per_label(prediction, reference, labels, spacing=spacing)
    assert len(calls) == 2 * len(labels)  # one edge/distance pass serves HD95, HD and ASD
    monkeypatch.setattr(monai_utils, "get_mask_edges", original)
    pred, ref = one_hot(prediction, 4)[:, labels], one_hot(reference, 4)[:, labels]
    per_sample = spacing.tolist()
    expected = {
        "hd95": compute_hausdorff_distance(pred, ref, include_background=True, percentile=95, spacing=per_sample),
        "hd": compute_hausdorff_distance(pred, ref, include_background=True, spacing=per_sample),
        "asd": compute_average_surface_distance(pred, ref, include_background=True, symmetric=True, spacing=per_sample),
    }
    for name, value in expected.items():
        assert distances[name].shape == (2, 2)
        torch.testing.assert_close(distances[name], value.float(), rtol=1e-5, atol=1e-5, msg=name)


def _case_rows(method: str, seed: int, values: list[float], data: str = "k") -> list[dict]:
    """Rows as evaluate_run writes them: every metric of case c<i> is values[i]."""
    head = {"run": f"vm/{method}/seed{seed}", "backbone": "vm", "method": method, "seed": seed, "data": data}
    metrics = ("dice", "hd95", "hd", "asd", "folding_pct", "time_ms")
    return [{**head, "case_id": f"c{i}", **dict.fromkeys(metrics, v)} for i, v in enumerate(values)]


def test_seeds_on_one_test_set_are_averaged_per_case_before_pairing():
    from adacs_lightning.evaluation.compare import compare
    from adacs_lightning.evaluation.tables import comparison_markdown

    baseline = {0: [0.60, 0.70, 0.80, 0.65], 1: [0.62, 0.68, 0.84, 0.61], 2: [0.58, 0.75, 0.79, 0.66]}
    adacs = {0: [0.66, 0.71, 0.86, 0.70], 1: [0.64, 0.74, 0.85, 0.69], 2: [0.69, 0.73, 0.88, 0.64]}
    rows = [r for seed, v in baseline.items() for r in _case_rows("baseline", seed, v)]
    rows += [r for seed, v in adacs.items() for r in _case_rows("adacs", seed, v)]
    table, tests = compare(rows)  # three training seeds, one fixed test set of four cases
    a, b = np.mean(list(baseline.values()), axis=0), np.mean(list(adacs.values()), axis=0)
    assert [(r["method"], r["runs"], r["n"]) for r in table] == [("baseline", 3, 4), ("adacs", 3, 4)]
    assert table[1]["dice_mean"] == pytest.approx(b.mean()) and table[1]["dice_std"] == pytest.approx(b.std(ddof=1))
    dice = next(t for t in tests if t["metric"] == "dice")
    assert dice["n"] == 4 and dice["mean_difference"] == pytest.approx((b - a).mean())
    assert dice["t_pvalue"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    markdown = comparison_markdown(table, tests)
    assert "n = 4 distinct test cases" in markdown and "averaged over those runs" in markdown
    with pytest.raises(Exception, match="seed 1"):  # the same run given twice
        compare(rows + _case_rows("adacs", 1, adacs[1]))


def test_a_sweep_of_training_seeds_on_fixed_data_pairs_distinct_cases(tmp_path):
    runs = [
        make_run_folder(tmp_path / f"{method}{seed}", method=method, seed=seed)
        for method in ("baseline", "adacs")
        for seed in (0, 1)
    ]
    evaluate_cli.run([str(r) for r in runs] + ["data.seed=0", "-o", str(tmp_path / "out"), "--figures", "0"])
    cases = read_csv(tmp_path / "out" / "cases.csv")
    assert len(cases) == 16 and len({c["data"] for c in cases}) == 1  # 2 methods × 2 seeds × 4 cases
    tests = read_csv(tmp_path / "out" / "paired_tests.csv")
    assert {t["n"] for t in tests if t["metric"] == "dice"} == {4}
    table = read_csv(tmp_path / "out" / "comparison.csv")
    assert [(r["method"], r["runs"], r["n"]) for r in table] == [("baseline", 2, 4), ("adacs", 2, 4)]
    assert len([c for c in cases if c["method"] == "adacs" and c["case_id"] == cases[0]["case_id"]]) == 2


def test_data_key_of_the_test_split_ignores_other_splits_and_the_split_seed_of_files():
    from adacs_lightning.evaluation.runs import data_key

    synthetic = {"_target_": "adacs_lightning.data.SyntheticDataModule", "seed": 0, "test_pairs": 4}
    assert data_key(synthetic) == data_key({**synthetic, "train_pairs": 8, "val_pairs": 2})
    assert data_key(synthetic) != data_key({**synthetic, "test_pairs": 8})
    assert data_key(synthetic, "val") != data_key({**synthetic, "val_pairs": 2}, "val")
    assert data_key(synthetic) != data_key({**synthetic, "seed": 1})  # the seed draws the images
    acdc = {"_target_": "adacs_lightning.data.ACDCDataModule", "root": "/data/acdc", "seed": 0, "intensity": "minmax"}
    assert data_key(acdc) == data_key({**acdc, "seed": 1})  # the seed only picks which patients are tested
    assert data_key(acdc) != data_key({**acdc, "intensity": "percentile"})


def test_method_is_read_from_the_checkpoint_and_from_older_files(tmp_path):
    from adacs_lightning.checkpoint import METHOD_KEY, save_backbone
    from adacs_lightning.evaluation.runs import resolve_run

    from .helpers.training import tiny_model

    for scoring, name in ((True, "adacs"), (False, "baseline")):
        stored: dict = {}
        tiny_model(scoring=scoring).on_save_checkpoint(stored)
        assert stored[METHOD_KEY] == name
        old = tmp_path / f"{name}.ckpt"  # written without the method entry: told by its networks
        save_tiny_checkpoint(old, scoring=scoring)
        assert resolve_run(old).method == name
        exported = save_backbone(old, tmp_path / f"{name}_backbone.pt")
        assert torch.load(exported, weights_only=False)[METHOD_KEY] == name
        assert resolve_run(exported).method == name  # no run folder, no scorer: the stored name
    bare = torch.load(tmp_path / "adacs_backbone.pt", weights_only=False)
    del bare[METHOD_KEY]
    torch.save(bare, tmp_path / "old_backbone.pt")
    assert resolve_run(tmp_path / "old_backbone.pt").method == "unknown"  # not guessed as baseline


@pytest.mark.slow
def test_a_two_value_sweep_is_compared_by_what_differs(tmp_path):
    """The README's sweep command, then adacs-eval over its runs: labelled arms, a paired test, the axis plot."""
    from adacs_lightning.cli import evaluate as evaluate_cli

    from .helpers.training import adacs_train

    sweep = tmp_path / "sweep"
    result = adacs_train("-m", "method.alpha=0.01,0.04", "debug=tiny", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = (sweep / "sweep_summary.md").read_text()  # every multirun gets one
    assert "method.alpha=0.01" in summary and "method.alpha=0.04" in summary
    assert "| run | label | seed |" in summary  # two seeds of one arm read apart
    assert re.search(r"\| 0\.01 \| 1 \| \d\.\d{4}", summary), summary  # per-axis values to 4 decimals
    files = evaluate_cli.run([str(sweep / "0"), str(sweep / "1"), "-o", str(tmp_path / "eval"), "--figures", "0"])
    comparison = (tmp_path / "eval" / "comparison.md").read_text()
    assert "adacs method.alpha=0.01" in comparison and "adacs method.alpha=0.04" in comparison
    tests = [r for r in read_csv(files["paired_tests"]) if r["metric"] == "dice"]
    assert [(t["method"], t["reference"]) for t in tests] == [("adacs method.alpha=0.04", "adacs method.alpha=0.01")]
    assert files["parameter_plot"].is_file() and "## method.alpha" in files["axes_md"].read_text()
    reverse = evaluate_cli.run(
        [str(sweep / "0"), str(sweep / "1"), "-o", str(tmp_path / "eval2"), "--figures", "0"]
        + ["--reference", "adacs method.alpha=0.04"]
    )
    tests = [r for r in read_csv(reverse["paired_tests"]) if r["metric"] == "dice"]
    assert [(t["method"], t["reference"]) for t in tests] == [("adacs method.alpha=0.01", "adacs method.alpha=0.04")]


def test_the_default_reference_is_the_baseline_whatever_its_label_carries():
    from adacs_lightning.evaluation.compare import _comparisons

    groups = [("voxelmorph", "adacs method.lam=0.002"), ("voxelmorph", "baseline method.lam=0.01")]
    assert _comparisons(groups) == [(groups[1], groups[0])]
    without = [("voxelmorph", "adacs"), ("voxelmorph", "robust")]
    assert _comparisons(without) == [(without[0], without[1])]  # no baseline: the first run
