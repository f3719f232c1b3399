"""The dissimilarity maps every method weights: shapes, zeros, invariances, and MONAI's values at Ŝ ≡ 1."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceLoss, GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.utils import one_hot

from adacs_lightning import AdaCS, LocalNCC, MutualInformation, SquaredError
from adacs_lightning.losses import masked_mean
from adacs_lightning.methods import ClosedFormRobust

from .helpers.training import tiny_backbone


def smooth_image(shape, seed: int) -> torch.Tensor:
    """A textured image in [0, 1] of shape ``(1, 1, *shape)``."""
    noise = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(seed))
    pool = torch.nn.functional.avg_pool2d if len(shape) == 2 else torch.nn.functional.avg_pool3d
    image = pool(noise, 5, stride=1, padding=2)
    return (image - image.min()) / (image.max() - image.min())


def smooth_pair_batch() -> dict[str, torch.Tensor]:
    """A batch of two identical textured 32² pairs."""
    return {
        "source": smooth_image((32, 32), 0).repeat(2, 1, 1, 1),
        "target": smooth_image((32, 32), 1).repeat(2, 1, 1, 1),
    }


SIMILARITIES = {
    "mse": lambda dims: SquaredError(),
    "lncc": lambda dims: LocalNCC(spatial_dims=dims, window=5),
    "mi": lambda dims: MutualInformation(),
}


@pytest.mark.parametrize("name", list(SIMILARITIES))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_maps_have_one_channel_and_the_image_size(name, spatial_dims):
    shape = (24, 20) if spatial_dims == 2 else (12, 10, 8)
    fixed = torch.cat([smooth_image(shape, 0), smooth_image(shape, 1)])  # batch of 2
    moving = torch.cat([smooth_image(shape, 2), smooth_image(shape, 3)])
    r = SIMILARITIES[name](spatial_dims)(moving, fixed)
    assert r.shape == (2, 1, *shape)
    assert torch.isfinite(r).all() and float(r.min()) >= -1e-5


@pytest.mark.parametrize("name", list(SIMILARITIES))
def test_identical_images_give_the_smallest_residual(name):
    fixed, other = smooth_image((32, 32), 0), smooth_image((32, 32), 1)
    similarity = SIMILARITIES[name](2)
    same, different = similarity(fixed, fixed).mean(), similarity(other, fixed).mean()
    assert same < different
    if name in ("mse", "lncc"):
        assert float(same) == pytest.approx(0.0, abs=1e-4)


def test_lncc_is_invariant_to_an_affine_intensity_change():
    """Away from the border (where MONAI's filtering pads windows with zeros) the map ignores gain and offset."""
    fixed, moving = smooth_image((32, 32), 0), smooth_image((32, 32), 1)
    lncc = LocalNCC(spatial_dims=2, window=9)
    inner = (..., slice(4, -4), slice(4, -4))
    torch.testing.assert_close(lncc(0.3 * moving + 0.5, fixed)[inner], lncc(moving, fixed)[inner], atol=2e-4, rtol=1e-3)
    assert float(lncc(fixed.clone(), 0.6 * fixed + 0.2)[inner].abs().max()) < 2e-4


def test_mi_is_invariant_to_a_monotone_intensity_change():
    """I ↦ I² permutes nothing about which intensities co-occur: MI (up to binning) stays the same."""
    fixed = smooth_image((48, 48), 0)
    moving = (fixed + 0.15 * smooth_image((48, 48), 5)).clamp(0, 1)
    mi = MutualInformation(bins=32)
    plain, remapped = mi(moving, fixed).mean(), mi(moving.pow(2), fixed).mean()
    assert float(remapped) == pytest.approx(float(plain), rel=0.1)
    # squared error, by contrast, changes by half
    mse = SquaredError()
    assert float(mse(moving.pow(2), fixed).mean()) > 1.4 * float(mse(moving, fixed).mean())


def test_mean_of_each_map_is_monais_loss():
    """With Ŝ ≡ 1: LNCC's mean is 1 + MONAI's loss; MI's is H(target) + MONAI's loss (−MI)."""
    fixed = torch.cat([smooth_image((32, 32), 0), smooth_image((32, 32), 1)])
    moving = torch.cat([smooth_image((32, 32), 2), smooth_image((32, 32), 3)])
    monai_lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=9)(moving, fixed)
    assert float(LocalNCC(2, window=9)(moving, fixed).mean()) == pytest.approx(1.0 + float(monai_lncc), abs=1e-5)

    mi = MutualInformation(bins=23)
    monai_mi = GlobalMutualInformationLoss(num_bins=23)(moving, fixed)
    _, _, weights, p_b = mi.mi.parzen_windowing(moving, fixed)
    entropy = -(p_b * torch.log(p_b + mi.mi.smooth_dr)).sum(-1).mean()  # H(target), batch mean
    assert float(mi(moving, fixed).mean()) == pytest.approx(float(entropy + monai_mi), abs=1e-5)


def test_mi_gradient_equals_monais_at_uniform_score():
    """H(target) does not depend on the moving image: minimising mean(r) is maximising MONAI's MI."""
    fixed = smooth_image((24, 24), 0)
    moving = smooth_image((24, 24), 1).requires_grad_()
    (ours,) = torch.autograd.grad(MutualInformation()(moving, fixed).mean(), moving)
    (theirs,) = torch.autograd.grad(GlobalMutualInformationLoss()(moving, fixed), moving)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-7)


def test_mi_histogram_follows_the_field_of_view():
    """Voxels outside the mask neither count in the histogram nor change the map inside it."""
    fixed, moving = smooth_image((32, 32), 0), smooth_image((32, 32), 1)
    mask = torch.zeros_like(fixed)
    mask[..., 4:28, 4:28] = 1
    garbage = moving.clone()
    garbage[mask == 0] = torch.rand(int((mask == 0).sum()), generator=torch.Generator().manual_seed(9))
    mi = MutualInformation()
    inside = mask.bool()
    torch.testing.assert_close(mi(moving, fixed, mask)[inside], mi(garbage, fixed, mask)[inside])


@pytest.mark.parametrize("similarity", [LocalNCC(2, window=5), MutualInformation()], ids=["lncc", "mi"])
def test_adacs_trains_on_the_map_it_is_given(similarity):
    model = AdaCS(tiny_backbone(), similarity=similarity, warmup_epochs=0)
    batch = smooth_pair_batch()
    directions = model._register(batch)
    torch.testing.assert_close(
        directions[0].residual, similarity(model.warp(batch["source"], directions[0].output.ddf), batch["target"])
    )
    assert model.momentum.kappa.item() == pytest.approx(similarity.kappa)


def test_label_term_is_monais_dice_loss_of_the_warped_one_hot_labels():
    model = AdaCS(tiny_backbone(), label_weight=0.5, scoring=False)
    labels = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    labels[:, :, 8:20, 8:20] = 1
    labels[:, :, 20:28, 10:26] = 2
    moved = torch.roll(labels, shifts=2, dims=-1)
    batch = {"source": labels.float() / 2, "target": moved.float() / 2, "source_label": labels, "target_label": moved}
    direction = model._register(batch)[0]
    warped = model.warp(one_hot(labels, 3).float(), direction.output.ddf)
    expected = DiceLoss(include_background=False)(warped, one_hot(moved, 3).float())
    torch.testing.assert_close(model.objective.label_term(direction), expected)
    loss, _, logs = model.objective([direction], [None], None)
    mse = masked_mean(direction.residual)
    smooth = logs["train/smooth_ddf"]
    torch.testing.assert_close(loss, mse + model.hparams.lam * smooth + 0.5 * expected)
    assert math.isfinite(float(logs["train/label_dice_loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("similarity", ["lncc", "mi"])
@pytest.mark.parametrize("method", ["baseline", "adacs"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_similarities_train_from_the_cli(tmp_path, similarity, method, spatial_dims):
    from .helpers.training import adacs_train

    size = ["data.image_size=16"] if spatial_dims == 3 else []
    run = tmp_path / "run"
    result = adacs_train(
        "debug=tiny", f"similarity={similarity}", f"method={method}", f"data.spatial_dims={spatial_dims}", *size,
        "data.train_pairs=4", "data.batch_size=2", "logger=csv", f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    assert math.isfinite(metrics["val/residual"]) and math.isfinite(metrics["train/data"])
    stored = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["adacs_similarity"]
    assert ("LocalNCC" if similarity == "lncc" else "MutualInformation") in stored


@pytest.mark.slow
def test_label_supervision_trains_from_the_cli(tmp_path):
    from .helpers.training import adacs_train

    run = tmp_path / "run"
    result = adacs_train("debug=tiny", "method.label_weight=0.5", "logger=csv", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    import csv

    with (run / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert any(r.get("train/label_dice_loss_step") for r in rows)


@pytest.mark.parametrize("similarity", [SquaredError(), LocalNCC(2, window=5), MutualInformation()], ids=SIMILARITIES)
def test_scorer_sees_residuals_on_squared_errors_scale(similarity):
    """``L_ucs`` weights ``r·κ/50``, so the paper's α keeps scores mid-range for every map."""
    model = AdaCS(tiny_backbone(), similarity=similarity, warmup_epochs=0, calibration="fixed")
    batch = smooth_pair_batch()
    terms = model._micro_batch(batch)
    residual = terms.directions[0].residual.detach()
    _, logs = model.scorer_terms.loss(
        terms.score, [residual], torch.tensor(0.0), terms.mask, True, model.momentum.kappa
    )
    scaled = residual * similarity.kappa / 50.0
    torch.testing.assert_close(logs["train/ucs"], masked_mean(terms.score * scaled))
    if isinstance(similarity, SquaredError):
        assert torch.equal(similarity.on_scorer_scale(residual), residual)


def test_closed_form_weights_of_a_typical_lncc_residual_stay_mid_range():
    """Unscaled, an LNCC residual of 0.25 (half a poor pair's) would get weight 0 under α = 0.02."""
    model = ClosedFormRobust(tiny_backbone(), similarity=LocalNCC(2, window=5))
    weight = model.weight_map(None, torch.full((1, 1, 4, 4), 0.25))
    torch.testing.assert_close(weight, torch.full_like(weight, 0.75))


@pytest.mark.parametrize("name, kind", [("mse", SquaredError), ("lncc", LocalNCC), ("mi", MutualInformation)])
def test_a_similarity_is_chosen_by_name_in_python_and_on_the_command_line(tmp_path, name, kind):
    from adacs_lightning.training import build, check_settings

    from .helpers.configs import compose_config

    assert type(AdaCS(tiny_backbone(), similarity=name).similarity) is kind
    cfg = compose_config(["data.spatial_dims=3", f"method.similarity={name}"], tmp_path)  # as method.similarity=lncc
    check_settings(cfg)
    model = build(cfg, "method", backbone=build(cfg, "backbone"))
    assert type(model.similarity) is kind
    warped, fixed = torch.rand(1, 1, 12, 12, 12), torch.rand(1, 1, 12, 12, 12)
    assert model.similarity(warped, fixed).shape == (1, 1, 12, 12, 12)  # lncc's window follows the data's dims


def test_an_unknown_similarity_name_lists_the_known_ones(tmp_path):
    from adacs_lightning.errors import ConfigError
    from adacs_lightning.training import build

    from .helpers.configs import compose_config

    with pytest.raises(ValueError, match="'ncc'.*mse, lncc, mi"):
        AdaCS(tiny_backbone(), similarity="ncc")
    # On the command line method.similarity is the similarity group: its options are listed
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="(?s)similarity/ncc.*lncc.*mi.*mse"):
        compose_config(["method.similarity=ncc"], tmp_path)
    # A config that names it as a string (a user's own method config) is told the known names
    cfg = compose_config([], tmp_path)
    cfg.method.similarity = "ncc"
    with pytest.raises(
        ConfigError, match="Setting 'method.similarity': is 'ncc', not a similarity. Use one of mse, lncc"
    ):
        build(cfg, "method", backbone=build(cfg, "backbone"))
