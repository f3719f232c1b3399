"""Finding what has no correspondence: the masks, the metrics, the scorer's target, its calibration, and a trained scorer."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from adacs_lightning import AdaCS, SyntheticDataModule
from adacs_lightning.correspondence import REFERENCE_LEVEL, integer_shifts, patch_mean, shift_min_residual, shifted
from adacs_lightning.data import FolderDataModule, Nuisances, make_pair
from adacs_lightning.errors import ConfigError
from adacs_lightning.metrics import dice_near_and_away, localisation
from adacs_lightning.similarity import LocalNCC, MutualInformation, SquaredError

from .helpers.fakes import make_folder, write_nifti
from .helpers.training import tiny_backbone, tiny_trainer

#: Target-only corruptions, frequent and deep: drop-outs, extra structures and shadows in the target alone.
STRONG = Nuisances(
    shadow_frames="target",
    shadow_prob=0.9,
    dropout_prob=0.9,
    extra_structure_prob=0.9,
    shadow_attenuation=0.95,
    dropout_attenuation=0.95,
)


# ---------------------------------------------------------------------------- the masks
def test_nocorr_marks_target_only_changes_and_nothing_else(clean_nuisance):
    gen = torch.Generator().manual_seed(3)
    clean = make_pair((48, 48), clean_nuisance, gen)
    assert clean.nocorr is not None and not clean.nocorr.any()
    # Shadows on both frames keep every voxel's counterpart: not in the mask.
    both = make_pair((48, 48), Nuisances(shadow_prob=1.0, dropout_prob=0.0, extra_structure_prob=0.0), gen)
    assert not both.nocorr.any()
    found = 0
    for seed in range(4):
        pair = make_pair((48, 48), STRONG, torch.Generator().manual_seed(seed))
        inside = pair.nocorr > 0
        assert set(torch.unique(pair.nocorr).tolist()) <= {0.0, 1.0}
        assert not (inside & (pair.mask == 0)).any()  # never outside the field of view
        found += int(inside.any())
    assert found == 4


def test_nocorr_is_where_the_target_changed():
    """The drop-out's mask covers the voxels it darkened most: the same pair without it differs there."""
    only_dropout = dict(noise="none", drift=0.0, shadow_prob=0.0, extra_structure_prob=0.0, fov=False)
    with_dropout = make_pair((48, 48), Nuisances(dropout_prob=1.0, **only_dropout), torch.Generator().manual_seed(5))
    without = make_pair((48, 48), Nuisances(dropout_prob=0.0, **only_dropout), torch.Generator().manual_seed(5))
    change = (without.target - with_dropout.target).abs()
    inside = with_dropout.nocorr > 0
    assert inside.any()
    assert change[inside].mean() > 4 * change[~inside].mean()
    assert torch.equal(with_dropout.source, without.source)


def test_synthetic_batches_carry_the_mask():
    dm = SyntheticDataModule(image_size=32, train_pairs=2, val_pairs=2, test_pairs=2, batch_size=2, nuisance=STRONG)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["nocorr"].shape == batch["target"].shape and batch["nocorr"].dtype == torch.float32


def test_folder_csv_takes_a_nocorr_column(tmp_path):
    csv_path = make_folder(tmp_path, rows=4, formats=(".nii.gz",))
    lines = csv_path.read_text().splitlines()
    region = np.zeros((16, 12), np.uint8)
    region[4:8, 3:6] = 1
    write_nifti(tmp_path / "nocorr.nii.gz", region, (1.0, 1.0))
    write_nifti(tmp_path / "empty.nii.gz", np.zeros((16, 12), np.uint8), (1.0, 1.0))
    cells = ["empty.nii.gz", "nocorr.nii.gz", "", "nocorr.nii.gz"]  # an empty cell: no lesion marked
    rows = [f"{line},{cell}" for line, cell in zip(lines[1:], cells)]
    csv_path.write_text("\n".join([lines[0] + ",target_nocorr", *rows]) + "\n")
    dm = FolderDataModule(str(csv_path), image_size=16, batch_size=2)
    dm.setup(None)
    items = [*dm.datasets["train"], *dm.datasets["val"], *dm.datasets["test"]]
    assert len(items) == 4  # an empty region, or none, is allowed (a pair without lesion)
    assert sorted(int(i["nocorr"].sum()) for i in items) == [0, 0, 12, 12]
    assert all(i["nocorr"].shape == i["target"].shape for i in items)


def test_a_nocorr_column_that_names_an_image_is_refused(tmp_path):
    """A float image where a mask belongs (the target itself, say) ends the case with one paragraph naming the file."""
    from adacs_lightning.data.bad_cases import DataError
    from adacs_lightning.data.transforms import check_values

    image = np.random.default_rng(0).random((16, 12)).astype(np.float32)
    with pytest.raises(DataError, match="not a mask of the voxels without correspondence") as caught:
        check_values(image, tmp_path / "target.nii.gz", "region")
    assert "target.nii.gz" in str(caught.value)
    for usable in (np.zeros((4, 4)), np.eye(4), 255 * np.eye(4, dtype=np.uint8)):
        check_values(usable, "mask.nii.gz", "region")


# ---------------------------------------------------------------------------- the metrics
def test_localisation_metrics_on_hand_made_maps():
    nocorr = torch.zeros(1, 1, 8, 8)
    nocorr[..., 2:4, 2:4] = 1
    perfect = 1.0 - nocorr  # scored 0 exactly where correspondence is lost
    result = localisation(perfect, nocorr)
    assert result["auroc"].item() == 1.0 and result["score_nocorr"].item() == 0 and result["score_corr"].item() == 1
    assert localisation(nocorr, nocorr)["auroc"].item() == 0.0  # the inverse ranking
    assert localisation(torch.full_like(nocorr, 0.7), nocorr)["auroc"].item() == 0.5  # a constant: chance
    mask = torch.ones_like(nocorr)
    mask[..., 2:4, 2:4] = 0  # the region outside the field of view: nothing left to find
    assert torch.isnan(localisation(perfect, nocorr, mask)["auroc"]).all()


def test_dice_near_and_away_split_the_image():
    target = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    target[..., 2:6, 2:6] = 1
    target[..., 10:14, 10:14] = 1
    warped = target.clone()
    warped[..., 2:6, 2:4] = 0  # wrong only near the lesion
    nocorr = torch.zeros(1, 1, 16, 16)
    nocorr[..., 3, 3] = 1
    near, away = dice_near_and_away(warped, target, nocorr, [1], margin=3)
    assert away.item() == 1.0 and near.item() < 0.8


# ---------------------------------------------------------------------------- the scorer's target
def test_shifted_moves_the_image_by_whole_voxels():
    image = torch.arange(25.0).view(1, 1, 5, 5)
    assert shifted(image, (1, 0))[0, 0, 0, 0] == image[0, 0, 1, 0]
    assert shifted(image, (0, -1))[0, 0, 2, 2] == image[0, 0, 2, 1]
    assert torch.equal(shifted(image, (0, 0)), image)
    assert len(integer_shifts(2, 2)) == 25 and integer_shifts(3, 1)[0] == (0, 0, 0)


def test_shift_min_removes_misalignment_but_not_a_missing_structure():
    """A blob moved by two voxels leaves a residual that a shift removes; a blob in the target only does not."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")

    def blob(cy, cx):
        return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)[None, None]

    warped = blob(10, 10)
    target = blob(10, 12) + blob(24, 24)  # the first blob misaligned by 2 voxels; the second has no counterpart
    plain = SquaredError()(warped, target)
    target_only = shift_min_residual(SquaredError(), warped, target, radius=2, patch=3)
    assert plain[..., 8:13, 8:15].max() > 0.3  # misalignment: a large residual ...
    assert target_only[..., 8:13, 8:15].max() < 0.01  # ... that a small shift removes
    assert target_only[..., 24, 24] > 0.95 * patch_mean(plain, 3)[..., 24, 24]  # the extra blob keeps its residual
    lncc = shift_min_residual(LocalNCC(2, window=5), warped, target, radius=2, patch=1)  # any similarity
    assert lncc.shape == plain.shape and not lncc.requires_grad


# ---------------------------------------------------------------------------- settings and calibration
@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(scorer_target="nearest"), "scorer_target"),
        (dict(calibration="auto"), "calibration"),
        (dict(shift_patch=2), "shift_radius"),
        (dict(calibration="data", kappa="auto"), "kappa"),
        (dict(scorer_target="shift_min", reference_leak=True), "reference_leak"),
    ],
)
def test_bad_settings_name_themselves(settings, named):
    with pytest.raises(ConfigError, match=named):
        AdaCS(tiny_backbone(), **settings)


@pytest.fixture(scope="module")
def strong_data():
    dm = SyntheticDataModule(image_size=32, train_pairs=16, val_pairs=8, test_pairs=2, batch_size=8, nuisance=STRONG)
    dm.setup("fit")
    return dm


def _train(dm, epochs=6, **settings) -> AdaCS:
    L.seed_everything(0, verbose=False)
    model = AdaCS(tiny_backbone(), warmup_epochs=2, lr=1e-3, data_weighting="normalised", lam=0.05, **settings)
    tiny_trainer(epochs, limit_val_batches=0).fit(model, dm)
    return model.eval()


def test_data_calibration_measures_warmup_a_and_sets_kappa(strong_data):
    model = _train(strong_data, epochs=3, calibration="data", scorer_target="shift_min")
    levels = model.levels
    assert levels.measured and levels.observed == 2  # the two steps of the last warm-up-A epoch
    torch.testing.assert_close(model.momentum.kappa, 1.0 / levels.data)
    # The scorer sees its target at the paper's level, whatever the data's.
    target = torch.full((1, 1, 4, 4), float(levels.scorer))
    torch.testing.assert_close(
        model.correspondence.on_scorer_scale(target, model.hparams.alpha), torch.full_like(target, REFERENCE_LEVEL)
    )
    state = model.state_dict()
    assert {"levels.scorer", "levels.data"} <= set(state)  # checkpoints hold the calibration


def _val_maps(model: AdaCS, dm) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        score = model.scorer(batch["target"])
    return score, batch["target"], batch["nocorr"], batch["mask"]


def _pooled_auroc(weight, nocorr, mask) -> float:
    inside = mask > 0.5
    return float(binary_auroc(1.0 - weight[inside], (nocorr[inside] > 0.5).long()))


@pytest.fixture(scope="module")
def extra_structures():
    """Every target has a structure its source lacks; nothing else removes correspondence.

    Structures only, because the other target-only changes are dark: with drop-outs and shadows,
    a "scorer" that returns the target's intensity already ranks them at AUROC 0.78–0.91 here.
    """
    only_structures = Nuisances(shadow_prob=0.0, dropout_prob=0.0, extra_structure_prob=1.0)
    dm = SyntheticDataModule(
        image_size=64, train_pairs=16, val_pairs=8, test_pairs=2, batch_size=4, nuisance=only_structures
    )
    dm.setup("fit")
    return dm


@pytest.mark.slow
@pytest.mark.parametrize("settings", [dict(calibration="data", scorer_target="shift_min"), dict()])
def test_a_briefly_trained_scorer_finds_the_target_only_structures(extra_structures, settings):
    """Measured (64², 16 pairs, 10 epochs): pooled AUROC of the trained maps 0.73–0.76.

    A scorer that outputs a constant scores 0.5 and one that outputs the target's intensity 0.27
    (the structures are bright); the trained map must reach 0.65 and beat the intensity by 0.3. One
    that outputs the inverted intensity scores 0.73 here: on these phantoms much of what the scorer
    learns is "bright inside the cavity", which the target alone shows.
    """
    L.seed_everything(0, verbose=False)
    model = AdaCS(tiny_backbone(), warmup_epochs=1, lr=1e-3, data_weighting="normalised", lam=0.05, **settings)
    tiny_trainer(10, limit_val_batches=0).fit(model, extra_structures)
    score, target, nocorr, mask = _val_maps(model.eval(), extra_structures)
    trained = _pooled_auroc(score, nocorr, mask)
    assert _pooled_auroc(torch.full_like(score, 0.5), nocorr, mask) == 0.5
    intensity = _pooled_auroc(target, nocorr, mask)
    assert trained > 0.65 and trained > intensity + 0.3, (trained, intensity)
    per_pair = localisation(score, nocorr, mask)
    assert float(per_pair["score_nocorr"].nanmean()) < float(per_pair["score_corr"].nanmean())


# ---------------------------------------------------------------------------- evaluation
def test_adacs_eval_reports_where_the_score_falls(tmp_path):
    from adacs_lightning.cli import evaluate as evaluate_cli

    from .helpers.runs import make_run_folder
    from .helpers.tables import read_csv

    runs = [make_run_folder(tmp_path / "a", method="baseline"), make_run_folder(tmp_path / "b", method="adacs")]
    out = tmp_path / "report"
    evaluate_cli.run([str(p) for p in runs] + ["--output", str(out), "--device", "cpu"])
    cases = read_csv(out / "cases.csv")
    adacs = [c for c in cases if c["method"] == "adacs"]
    baseline = [c for c in cases if c["method"] == "baseline"]
    # The synthetic test pairs mark their target-only drop-outs and structures: Dice near them for every method ...
    assert all(np.isfinite(c["dice_away"]) for c in cases)
    # ... and, for the method with a score map, whether it falls there (a pair without such voxels has no AUROC).
    assert any(np.isfinite(c["auroc"]) for c in adacs)
    assert all(0.0 <= c["auroc"] <= 1.0 for c in adacs if np.isfinite(c["auroc"]))
    assert not any(np.isfinite(c["auroc"]) for c in baseline)
    # The share of the data term the score leaves, for every case of the run with a map.
    assert all(0.0 < c["kept_mass"] <= 1.0 and 0.0 <= c["score_mean"] <= 1.0 for c in adacs)
    assert not any(np.isfinite(c.get("kept_mass", math.nan)) for c in baseline)
    # adacs-register's quality figures and flag, per case, for every method (the score's share with a map only).
    assert all(c["flag"] in ("ok", "review") and c["det_jacobian_min"] <= c["det_jacobian_p1"] for c in cases)
    assert all(0.0 <= c["score_low_share"] <= 1.0 for c in adacs)
    assert not any(np.isfinite(c.get("score_low_share", math.nan)) for c in baseline)
    markdown = (out / "comparison.md").read_text()
    assert "## Where correspondence is lost" in markdown and "AUROC of 1 − Ŝ" in markdown
    assert "kept mass" in markdown


def test_validation_logs_where_the_score_falls_for_methods_with_a_map(strong_data):
    logged = {}
    for scoring in (True, False):
        L.seed_everything(0, verbose=False)
        model = AdaCS(tiny_backbone(), scoring=scoring, warmup_epochs=1, lr=1e-3)
        trainer = tiny_trainer(3)
        trainer.fit(model, strong_data)
        logged[scoring] = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert 0.0 <= logged[True]["val/auroc"] <= 1.0
    assert 0.0 <= logged[True]["val/score_nocorr"] <= 1.0 and 0.0 <= logged[True]["val/score_corr"] <= 1.0
    assert not any(k in logged[False] for k in ("val/auroc", "val/score_nocorr"))  # Ŝ ≡ 1: nothing to localise


def _average_pool(residual, patch):
    """The box mean as average pooling computes it, the padding not counted (independent of :func:`patch_mean`)."""
    if patch == 1:
        return residual
    pool = torch.nn.functional.avg_pool2d if residual.ndim == 4 else torch.nn.functional.avg_pool3d
    return pool(residual, kernel_size=patch, stride=1, padding=patch // 2, count_include_pad=False)


def _shift_min_one_by_one(similarity, warped, fixed, mask, radius, patch):
    """The definition: each shift padded on its own (:func:`shifted`), average-pooled on its own, folded by a minimum."""
    best = None
    for offset in integer_shifts(warped.ndim - 2, radius):
        candidate = _average_pool(similarity(shifted(warped, offset), fixed, mask), patch)
        best = candidate if best is None else torch.minimum(best, candidate)
    return best


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("patch", [1, 3, 5, 7])
def test_patch_mean_is_average_pooling_without_the_padding(spatial_dims, patch):
    residual = torch.rand((2, 1) + (8,) * spatial_dims)
    torch.testing.assert_close(patch_mean(residual, patch), _average_pool(residual, patch))
    with pytest.raises(ValueError, match="odd"):
        patch_mean(residual, 2)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("radius, patch", [(1, 1), (1, 3), (2, 1), (2, 3)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("shifts_at_once", ["one", "grouped"])
def test_the_fast_shift_min_equals_its_definition(spatial_dims, radius, patch, masked, shifts_at_once, monkeypatch):
    if shifts_at_once == "one":  # as large images go: one shift at a time; small ones stack them
        monkeypatch.setattr("adacs_lightning.correspondence.SHIFT_GROUP_VOXELS", 1)
    torch.manual_seed(spatial_dims + radius + patch)
    shape = (2, 1) + (10,) * spatial_dims
    warped, fixed = torch.rand(shape), torch.rand(shape)
    mask = (torch.rand(shape) > 0.3).float() if masked else None
    for similarity in (SquaredError(), LocalNCC(spatial_dims=spatial_dims), MutualInformation(bins=8)):
        fast = shift_min_residual(similarity, warped, fixed, mask, radius, patch)
        torch.testing.assert_close(fast, _shift_min_one_by_one(similarity, warped, fixed, mask, radius, patch))
