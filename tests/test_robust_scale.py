"""The robust calibrations of the scorer (Tukey point, dead zone), inliers kept, the pair-aware scorer, kept mass."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from adacs_lightning import AdaCS, ScoringNetwork
from adacs_lightning.correspondence import (
    MAD_TO_SIGMA,
    REFERENCE_LEVEL,
    TUKEY_C,
    RobustScale,
    foreground,
    kept_mass,
    robust_location_scale,
    robust_operating_point,
    shift_min_residual,
)
from adacs_lightning.data import Nuisances, make_pair
from adacs_lightning.errors import ConfigError
from adacs_lightning.losses import closed_form_score
from adacs_lightning.similarity import SquaredError
from adacs_lightning.warping import warp_block

from .helpers.training import tiny_backbone, tiny_datamodule, tiny_trainer


def _measured(calibration: str, target: torch.Tensor, **settings) -> RobustScale:
    scale = RobustScale(calibration, **settings)
    scale.observe(target, torch.ones_like(target, dtype=torch.bool))
    scale.fix()
    return scale


def _squared_gaussian_errors(sigma: float = 0.1, n: int = 1 << 16) -> torch.Tensor:
    torch.manual_seed(0)
    return (sigma * torch.randn(1, 1, n)).pow(2)


# ---------------------------------------------------------------------------- closed forms
def test_robust_location_scale_of_a_gaussian_is_its_sigma():
    torch.manual_seed(0)
    values = 3.0 + 0.5 * torch.randn(1 << 16)
    median, sigma = robust_location_scale(values)
    assert abs(float(median) - 3.0) < 0.01 and abs(float(sigma) - 0.5) < 0.01


def test_a_scale_is_never_zero_while_values_differ():
    values = torch.cat([torch.zeros(900), torch.rand(100)])  # more than half equal: MAD 0
    median, sigma = robust_location_scale(values)
    assert float(median) == 0.0 and float(sigma) > 0


def test_tukey_point_halves_the_score_where_the_error_reaches_c_sigma():
    sigma = 0.1
    scale = _measured("tukey", _squared_gaussian_errors(sigma))
    # σ̂² = 1.4826²·median(e²) estimates σ² for Gaussian e: Ŝ* = 0.5 at e = c·σ.
    assert float(scale.threshold) == 0.0
    assert math.isclose(float(scale.midpoint), (TUKEY_C * sigma) ** 2, rel_tol=0.03)
    at = torch.tensor([0.0, (TUKEY_C * sigma) ** 2, 2 * (TUKEY_C * sigma) ** 2])
    torch.testing.assert_close(scale.optimum(at), torch.tensor([1.0, 0.5, 0.0]), atol=0.02, rtol=0)


def test_tukey_point_keeps_almost_all_of_a_gaussian_data_term():
    """Ŝ* = 1 − e²/(2c²σ²): the kept mass is 1 − E[e⁴]/(2c²σ²·E[e²]) = 1 − 3/(2c²) ≈ 0.93."""
    target = _squared_gaussian_errors()
    scale = _measured("tukey", target)
    kept = float(kept_mass(scale.optimum(target), target))
    assert math.isclose(kept, 1 - 3 / (2 * TUKEY_C**2), abs_tol=0.01)


def test_dead_zone_keeps_every_inlier_and_halves_at_five_sigma():
    torch.manual_seed(0)
    target = (0.02 + 0.005 * torch.randn(1, 1, 1 << 14)).abs()  # fewer than a micro-batch's sample: all of it
    scale = _measured("dead_zone", target)
    median, sigma = robust_location_scale(target.flatten())
    torch.testing.assert_close(scale.threshold, median + 3 * sigma)
    torch.testing.assert_close(scale.midpoint, median + 5 * sigma)
    probes = median + sigma * torch.tensor([0.0, 2.9, 3.0, 5.0, 7.0, 9.0])
    torch.testing.assert_close(scale.optimum(probes), torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0, 0.0]), atol=1e-5, rtol=0)
    assert bool(scale.inliers(probes[:3]).all()) and not bool(scale.inliers(probes[3:]).any())
    # The scorer's loss S·t' + α(1 − S)² has its optimum 1 − t'/(2α) there: the same map on the scorer's scale.
    alpha = 0.02
    torch.testing.assert_close(closed_form_score(scale.on_scorer_scale(probes, alpha), alpha), scale.optimum(probes))


def test_a_mean_scale_is_harshest_on_clean_data_and_a_robust_one_is_not():
    """On a χ²(1) data term (squared Gaussian errors, voxel by voxel), Ŝ* keeps: at the *mean* target (the previous
    default) a fifth; Tukey's point 0.93; the dead zone 0.68 (a squared error's MAD is small against its tail;
    on the patch-averaged shift-min target of real pairs it keeps more, see the next test)."""
    target = _squared_gaussian_errors()
    mean_level = float(target.mean())
    by_mean = closed_form_score(target * (REFERENCE_LEVEL / mean_level), REFERENCE_LEVEL)
    assert 0.15 < float(kept_mass(by_mean, target)) < 0.25
    kept = {c: float(kept_mass(_measured(c, target).optimum(target), target)) for c in ("tukey", "dead_zone")}
    assert kept["tukey"] > 0.9 and 0.6 < kept["dead_zone"] < 0.75, kept


def test_outliers_do_not_move_a_robust_operating_point():
    """A fifth of the voxels at a hundred times the noise: the median and MAD barely move, the mean does."""
    clean = _squared_gaussian_errors()
    spoiled = clean.clone()
    spoiled[..., : clean.numel() // 5] *= 100.0
    for calibration in ("tukey", "dead_zone"):
        before, after = _measured(calibration, clean), _measured(calibration, spoiled)
        assert float(after.midpoint) < 2.5 * float(before.midpoint), calibration
    assert float(spoiled.mean()) > 15 * float(clean.mean())


@pytest.mark.parametrize("calibration", ["tukey", "dead_zone"])
def test_a_clean_synthetic_batch_keeps_most_of_its_data_term_at_the_optimum(calibration):
    """The shift-min target of clean MRI-like pairs registered by their true motion: Ŝ* keeps ≥ 0.85 of Σ r."""
    nuisance = Nuisances(noise="rician", noise_level=0.05, drift=0.1, fov=False, shadow_prob=0.0,
                         dropout_prob=0.0, extra_structure_prob=0.0)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    pairs = [make_pair((64, 64), nuisance, gen) for _ in range(4)]
    source = torch.stack([p.source for p in pairs])
    target = torch.stack([p.target for p in pairs])
    warped = warp_block("bilinear", "border")(source, torch.stack([p.ddf for p in pairs]))
    similarity = SquaredError()
    residual = similarity(warped, target)
    shift_min = shift_min_residual(similarity, warped, target)
    scale = RobustScale(calibration)
    scale.observe(shift_min, foreground(target, warped))
    scale.fix()
    assert float(kept_mass(scale.optimum(shift_min), residual)) >= 0.85


def test_robust_statistics_skip_an_empty_background():
    """Over a skull-stripped image most voxels are exact zeros: the foreground keeps the scale from collapsing."""
    image = torch.zeros(1, 1, 32, 32)
    image[..., 8:24, 8:24] = 0.5 + 0.1 * torch.rand(1, 1, 16, 16)
    warped = image.roll(1, dims=-1)
    target = SquaredError()(warped, image)
    everywhere = robust_location_scale(target.flatten())
    inside = foreground(image, warped)
    over_foreground = robust_location_scale(target[inside])
    assert float(everywhere[0]) == 0.0 and float(over_foreground[0]) > 0.0
    assert inside.sum() < image.numel() / 2


def test_robust_operating_point_names_its_calibration():
    with pytest.raises(ValueError, match="robust calibration"):
        robust_operating_point(torch.tensor(1.0), torch.tensor(1.0), "data")
    assert MAD_TO_SIGMA == pytest.approx(1 / 0.6745, rel=1e-3)


# ---------------------------------------------------------------------------- AdaCS with a robust scale
@pytest.fixture(scope="module")
def robust_run():
    """A dead-zone AdaCS that keeps inliers, with a pair-aware scorer, through every phase (tiny)."""
    L.seed_everything(0, verbose=False)
    model = AdaCS(tiny_backbone(), warmup_epochs=1, lr=1e-3, calibration="dead_zone", keep_inliers=True,
                  scorer_input="pair")  # fmt: skip
    trainer = tiny_trainer(3)
    trainer.fit(model, tiny_datamodule())
    return model, trainer


def test_a_robust_run_measures_its_scale_and_logs_the_kept_mass(robust_run):
    model, trainer = robust_run
    scale = model.robust
    assert scale.measured and 0 < float(scale.threshold) < float(scale.midpoint)
    assert {"robust.median", "robust.sigma", "robust.threshold", "robust.midpoint"} <= set(model.state_dict())
    kept = float(trainer.callback_metrics["train/kept_mass"])
    assert 0.0 < kept <= 1.0
    torch.testing.assert_close(model.momentum.kappa, 1.0 / model.levels.data)


def test_kept_inliers_weigh_one_whatever_the_score(robust_run):
    model, _ = robust_run
    threshold = float(model.robust.threshold)
    targets = [torch.tensor([[[[0.0, threshold, 2 * threshold + 1.0]]]])]
    scores = [torch.full((1, 1, 1, 3), 0.3)]
    (weights,) = model.scorer_terms.data_weights(scores, targets)
    torch.testing.assert_close(weights, torch.tensor([[[[1.0, 1.0, 0.3]]]]))


def test_a_pair_aware_scorer_sees_the_warped_source(robust_run):
    model, _ = robust_run
    fixed = torch.rand(2, 1, 32, 32)
    with pytest.raises(ValueError, match="warped source"):
        model.weight_map(fixed, torch.zeros_like(fixed))
    with torch.no_grad():
        a = model.weight_map(fixed, torch.zeros_like(fixed), fixed)
        b = model.weight_map(fixed, torch.zeros_like(fixed), torch.zeros_like(fixed))
    assert a.shape == (2, 1, 32, 32) and not torch.equal(a, b)


@pytest.mark.parametrize(
    "settings, named",
    [
        (dict(keep_inliers=True), "keep_inliers"),  # needs the dead zone
        (dict(calibration="dead_zone", dead_zone=(5.0, 3.0)), "dead_zone"),
        (dict(calibration="tukey", tukey_c=0.0), "tukey_c"),
        (dict(scale_momentum=1.0), "scale_momentum"),
        (dict(scorer_input="both"), "scorer_input"),
        (dict(calibration="tukey", kappa="auto"), "kappa"),
        (dict(scorer_input="pair", scorer=ScoringNetwork(2)), "scorer_input"),  # built for the target alone
    ],
)
def test_bad_robust_settings_name_themselves(settings, named):
    with pytest.raises(ConfigError, match=named):
        AdaCS(tiny_backbone(), **settings)


def test_refinement_scores_the_pair_for_a_pair_aware_run(robust_run):
    from adacs_lightning.refine import Refiner

    model, _ = robust_run
    refiner = Refiner.from_module(model, "score", steps=2)
    assert refiner.scorer_input == "pair"
    moving, fixed = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    refined = refiner.refine(moving, fixed, torch.zeros(1, 2, 32, 32))
    assert refined.ddf.shape == (1, 2, 32, 32)
    with pytest.raises(ValueError, match="warped source"):
        refiner.weight_map(fixed)
