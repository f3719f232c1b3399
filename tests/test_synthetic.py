"""The embedded synthetic data set: determinism, splits, the batch dict and its physics."""

import pytest
import torch
from monai.networks.blocks import Warp

from adacs_lightning.data import Nuisances, SyntheticDataModule, SyntheticPairs, make_pair
from adacs_lightning.data.phantom import BLOOD, MYOCARDIUM


def test_same_seed_same_pairs_other_seed_other_pairs():
    a = SyntheticPairs("train", 3, (32, 32), Nuisances(), seed=1)
    b = SyntheticPairs("train", 3, (32, 32), Nuisances(), seed=1)
    c = SyntheticPairs("train", 3, (32, 32), Nuisances(), seed=2)
    for x, y, z in zip(a.items, b.items, c.items):
        assert torch.equal(x["source"], y["source"]) and torch.equal(x["target"], y["target"])
        assert not torch.equal(x["source"], z["source"])


def test_splits_are_disjoint_streams():
    train = SyntheticPairs("train", 2, (32, 32), Nuisances(), seed=0)
    val = SyntheticPairs("val", 2, (32, 32), Nuisances(), seed=0)
    assert not torch.equal(train[0]["source"], val[0]["source"])
    assert train[0]["meta"]["case_id"] == "synthetic_train_0000"


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_batch_dict_contract(spatial_dims):
    dm = SyntheticDataModule(
        spatial_dims=spatial_dims,
        image_size=16 if spatial_dims == 3 else 32,
        train_pairs=4,
        val_pairs=2,
        test_pairs=2,
        batch_size=2,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    size = (16,) * 3 if spatial_dims == 3 else (32, 32)
    for key in ("source", "target", "mask"):
        assert batch[key].shape == (2, 1, *size) and batch[key].dtype == torch.float32
        assert 0.0 <= float(batch[key].min()) and float(batch[key].max()) <= 1.0
    for key in ("source_label", "target_label"):
        assert batch[key].dtype == torch.long and set(batch[key].unique().tolist()) <= {0, BLOOD, MYOCARDIUM}
    assert batch["meta"]["spacing"].shape == (2, spatial_dims)
    assert len(batch["meta"]["case_id"]) == 2
    # outside the field of view both frames are black
    assert float((batch["source"] * (1 - batch["mask"])).abs().max()) == 0.0


def test_the_true_deformation_explains_the_clean_target(clean_nuisance):
    pair = make_pair((64, 64), clean_nuisance, torch.Generator().manual_seed(3))
    # without nuisances the target is the warped source: the true field explains it
    image = Warp("bilinear", "border")(pair.source[None], pair.ddf[None])[0]
    assert (image - pair.target).abs().mean() < 0.01
    assert (pair.source - pair.target).abs().mean() > 0.02


def test_systole_shrinks_the_cavity_and_keeps_the_myocardium(clean_nuisance):
    for seed in range(4):
        pair = make_pair((64, 64), clean_nuisance, torch.Generator().manual_seed(seed))
        ed_blood, es_blood = (pair.source_label == BLOOD).sum(), (pair.target_label == BLOOD).sum()
        ed_myo, es_myo = (pair.source_label == MYOCARDIUM).sum(), (pair.target_label == MYOCARDIUM).sum()
        assert es_blood < 0.9 * ed_blood
        assert 0.7 < es_myo / ed_myo < 1.3


def test_target_only_nuisances_break_correspondence_in_the_target():
    """With shadow and drop-out certain, the target loses signal that the warped source still has."""
    base = dict(noise="none", drift=0.0, extra_structure_prob=0.0, fov=True, shadow_frames="target")
    clean = make_pair((64, 64), Nuisances(shadow_prob=0.0, dropout_prob=0.0, **base), torch.Generator().manual_seed(5))
    lossy = make_pair((64, 64), Nuisances(shadow_prob=1.0, dropout_prob=1.0, **base), torch.Generator().manual_seed(5))
    assert torch.equal(clean.source, lossy.source)
    assert torch.equal(clean.target_label, lossy.target_label)
    lost = clean.target - lossy.target
    assert float(lost.min()) >= -1e-6 and float(lost.sum()) > 1.0


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 32)])
def test_probe_fixed_shadow_darkens_both_frames_at_the_same_place(shape):
    base = dict(noise="none", drift=0.0, dropout_prob=0.0, extra_structure_prob=0.0, fov=False)
    clean = make_pair(shape, Nuisances(shadow_prob=0.0, **base), torch.Generator().manual_seed(2))
    shadowed = make_pair(
        shape, Nuisances(shadow_prob=1.0, shadow_frames="both", **base), torch.Generator().manual_seed(2)
    )
    source_factor = shadowed.source / clean.source.clamp_min(1e-3)
    target_factor = shadowed.target / clean.target.clamp_min(1e-3)
    dark = (source_factor < 0.5) & (clean.source > 0.05) & (clean.target > 0.05)
    assert dark.sum() > 20  # a real shadow, a cone distal to the occluder
    assert torch.allclose(source_factor[dark], target_factor[dark], atol=1e-3)  # the same place and strength
    assert float(source_factor.max()) <= 1.0 + 1e-4  # a shadow only removes signal


def test_speckle_is_multiplicative_with_unit_mean():
    from adacs_lightning.data.phantom import apply_speckle, speckle_field

    def _speckle(image, level, gen):  # a fresh field, as make_pair draws the source's
        return apply_speckle(image, speckle_field(tuple(image.shape[1:]), gen), level)

    image = torch.cat([torch.full((1, 64, 32), 0.1), torch.full((1, 64, 32), 0.8)], dim=2)
    speckled = _speckle(image, 1.0, torch.Generator().manual_seed(0))
    dark, bright = speckled[..., :32], speckled[..., 32:]
    assert float(speckled.min()) >= 0.0
    assert dark.mean().item() == pytest.approx(0.1, rel=0.1) and bright.mean().item() == pytest.approx(0.8, rel=0.1)
    assert (bright.std() / dark.std()).item() == pytest.approx(8.0, rel=0.25)  # spread scales with the signal
    again = _speckle(image, 1.0, torch.Generator().manual_seed(1))
    assert not torch.allclose(speckled, again)  # frames decorrelate


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise": "gaussian"},
        {"shadow_prob": 1.5},
        {"drift": -1.0},
        {"sector_angle_deg": 0.0},
        {"shadow_frames": "source"},
    ],
)
def test_invalid_nuisance_settings(kwargs):
    with pytest.raises(ValueError):
        Nuisances(**kwargs)


def test_datamodule_rejects_bad_sizes():
    with pytest.raises(ValueError, match="image_size"):
        SyntheticDataModule(spatial_dims=3, image_size=(32, 32))
    with pytest.raises(ValueError, match="spatial_dims"):
        SyntheticDataModule(spatial_dims=4)


def test_training_order_depends_on_epoch_not_on_history():
    dm = SyntheticDataModule(image_size=16, train_pairs=8, val_pairs=2, test_pairs=2, batch_size=8)
    dm.setup("fit")
    loader = dm.train_dataloader()
    ids = []
    for epoch in (0, 1, 0):
        loader.sampler.set_epoch(epoch)
        ids.append(next(iter(loader))["meta"]["case_id"])
    assert ids[0] == ids[2] and ids[0] != ids[1]


def test_speckle_moves_with_the_tissue_and_decorrelates_as_set():
    """Tissue-bound speckle: the true motion explains a target with ρ = 1 far better than with independent speckle."""
    base = dict(noise="speckle", noise_level=0.5, drift=0.0, shadow_prob=0.0, dropout_prob=0.0)
    base.update(extra_structure_prob=0.0, fov=False)
    errors = {}
    for rho in (1.0, 0.5, 0.0):
        pair = make_pair((64, 64), Nuisances(speckle_correlation=rho, **base), torch.Generator().manual_seed(4))
        warped = Warp("bilinear", "border")(pair.source[None], pair.ddf[None])[0]
        errors[rho] = float((warped - pair.target)[..., 8:-8, 8:-8].pow(2).mean())
    assert errors[1.0] < 0.5 * errors[0.5] < 0.5 * errors[0.0]


def test_speckle_field_correlation_is_the_setting():
    from adacs_lightning.data.phantom import moved_speckle_field, speckle_field

    gen = torch.Generator().manual_seed(0)
    field = speckle_field((96, 96), gen)
    ddf = torch.stack([torch.full((96, 96), 1.3), torch.full((96, 96), -0.6)])
    carried = Warp("bilinear", "border")(field[None], ddf[None])[0][:, 8:-8, 8:-8].flatten()
    for rho in (0.0, 0.5, 0.9):
        moved = moved_speckle_field(field, ddf, rho, gen)[:, 8:-8, 8:-8].flatten()
        assert float(torch.corrcoef(torch.stack([carried, moved]))[0, 1]) == pytest.approx(rho, abs=0.06)
        assert float(moved.std()) == pytest.approx(float(field.std()), rel=0.05)


def test_contrast_change_remaps_the_target_monotonically():
    base = dict(noise="none", drift=0.0, shadow_prob=0.0, dropout_prob=0.0, extra_structure_prob=0.0, fov=False)
    plain = make_pair((48, 48), Nuisances(**base), torch.Generator().manual_seed(2))
    changed = make_pair((48, 48), Nuisances(contrast=1.0, **base), torch.Generator().manual_seed(2))
    assert torch.equal(plain.source, changed.source)
    order = torch.argsort(plain.target.flatten())
    remapped = changed.target.flatten()[order]
    assert bool((remapped[1:] >= remapped[:-1] - 1e-6).all())  # monotone in the original intensity
    assert float((plain.target - changed.target).abs().max()) > 0.05


def test_minmax_intensity_scales_each_frame_to_the_unit_interval():
    pairs = SyntheticPairs("train", 2, (32, 32), Nuisances(), seed=0, intensity="minmax")
    for item in pairs.items:
        for key in ("source", "target"):
            assert float(item[key].min()) == 0.0 and float(item[key].max()) == pytest.approx(1.0)


def test_another_subject_differs_beyond_the_motion_and_marks_no_voxel(clean_nuisance):
    """other_subject=1: the target is another heart, so the true motion no longer explains it; nothing is marked
    as lacking correspondence (the difference is anatomy, the registration signal). 0 keeps one heart."""
    from dataclasses import replace

    warp_labels = Warp(mode="nearest", padding_mode="border")
    for change, same in ((0.0, True), (1.0, False)):
        pair = make_pair((48, 48), replace(clean_nuisance, other_subject=change), torch.Generator().manual_seed(4))
        moved = warp_labels(pair.source_label[None].float(), pair.ddf[None])[0].round().long()
        agreement = float((moved == pair.target_label).float().mean())
        assert (agreement > 0.99) == same, (change, agreement)
        assert float(pair.nocorr.sum()) == 0.0
    with pytest.raises(ValueError, match="other_subject"):
        Nuisances(other_subject=1.5)
