"""Real-data modules on small fake copies in the exact on-disk layouts: pairing, geometry, labels, masks, caching."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor, NibabelReader

from adacs_lightning.data import (
    ACDCDataModule,
    CAMUSDataModule,
    FolderDataModule,
    OASISDataModule,
    SimpleITKReader,
)
from adacs_lightning.data.transforms import spacing_of

from .helpers.fakes import (
    camus_sector,
    make_acdc,
    make_camus_mhd,
    make_camus_nifti,
    make_folder,
    make_oasis,
    write_itk,
)
from .helpers.training import adacs_train


def extent(mask: torch.Tensor) -> list[int]:
    """Bounding-box size of a boolean map, per axis."""
    idx = torch.nonzero(mask)
    return (idx.max(0).values - idx.min(0).values + 1).tolist()


def check_contract(item: dict, shape: tuple[int, ...]) -> None:
    for key in ("source", "target"):
        assert item[key].shape == (1, *shape) and item[key].dtype == torch.float32
        assert 0.0 <= float(item[key].min()) and float(item[key].max()) <= 1.0
    for key in ("source_label", "target_label"):
        assert item[key].shape == (1, *shape) and item[key].dtype == torch.int64
    assert item["meta"]["spacing"].shape == (len(shape),)


# ---------------------------------------------------------------------------- ACDC
@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    return make_acdc(tmp_path_factory.mktemp("acdc"))


def test_acdc_pairs_matching_slices_of_ed_and_es(acdc, tmp_path):
    dm = ACDCDataModule(str(acdc), image_size=32, spacing=1.0, batch_size=2, output_dir=str(tmp_path))
    dm.setup("fit")
    train = dm.datasets["train"]
    assert len(train) == 5 * 3  # five training patients, three labelled slices each
    for item in train:
        check_contract(item, (32, 32))
        patient, k = int(item["meta"]["case_id"][7:10]), int(item["meta"]["case_id"][-2:])
        source, target = item["source_label"][0], item["target_label"][0]
        # X spacing 3 mm → 1 mm triples X extents; Y (1 mm) is unchanged; the LV is 4 wide at ED, 3 at ES
        assert int((source == 3).sum()) == 12 * 4 and int((target == 3).sum()) == 9 * 3
        assert extent(source == 1) == [3 * patient, k + 1] == extent(target == 1)
        torch.testing.assert_close(item["meta"]["spacing"], torch.tensor([1.0, 1.0]))
        # the image is the label's image: intensity rises with the label value
        means = [float(item["source"][0][source == v].mean()) for v in (0, 1, 2, 3)]
        assert means == sorted(means) and means[0] < 0.05 and means[3] > 0.95
    splits = json.loads((tmp_path / "splits.json").read_text())
    assert splits["test"] == ["patient101"]  # patient102 has no ground truth
    assert len(splits["train"]) == 5 and len(splits["val"]) == 1
    assert not set(splits["train"]) & set(splits["val"])


def test_acdc_split_is_deterministic_and_seeded(acdc):
    groups = [ACDCDataModule(str(acdc), seed=s).discover().groups for s in (0, 0, 1, 2, 3)]
    assert groups[0] == groups[1]
    assert any(g["val"] != groups[0]["val"] for g in groups[2:])


def test_acdc_without_labels_crops_at_the_image_centre(acdc):
    dm = ACDCDataModule(str(acdc), image_size=32, spacing=1.0, use_labels=False, slices="all")
    dm.setup("fit")
    item = dm.datasets["train"][0]
    assert "source_label" not in item and item["source"].shape == (1, 32, 32)
    # 70 × 20 voxels after resampling: Y is zero-padded (6 columns each side), X cropped to its centre
    assert float(item["source"][0, :, :6].abs().max()) == 0.0 and float(item["source"][0, :, 6:26].min()) >= 0


def test_acdc_test_split_from_testing_folder(acdc):
    dm = ACDCDataModule(str(acdc), image_size=32, spacing=1.0)
    dm.setup("test")
    assert {item["meta"]["case_id"][:10] for item in dm.datasets["test"]} == {"patient101"}


# ---------------------------------------------------------------------------- CAMUS
@pytest.fixture(scope="module")
def camus_roots(tmp_path_factory):
    split = {"training": [1, 2, 3, 4], "validation": [5], "testing": [6]}
    nifti = make_camus_nifti(tmp_path_factory.mktemp("camus_nifti"), split=split)
    mhd = make_camus_mhd(tmp_path_factory.mktemp("camus_mhd"))
    return nifti, mhd


def test_camus_nifti_official_split_orientation_spacing_and_sector(camus_roots):
    dm = CAMUSDataModule(str(camus_roots[0]), image_size=32, batch_size=2)
    dm.setup(None)
    assert [i["meta"]["case_id"] for i in dm.datasets["val"]] == ["patient0005_2CH", "patient0005_4CH"]
    assert len(dm.datasets["train"]) == 8 and len(dm.datasets["test"]) == 2
    sector = F.interpolate(
        torch.tensor(camus_sector(), dtype=torch.float32)[None, None], (32, 32), mode="nearest-exact"
    )
    for item in dm.datasets["train"]:
        check_contract(item, (32, 32))
        patient = int(item["meta"]["case_id"][7:11])
        source, target = item["source_label"][0], item["target_label"][0]
        # rows are depth: the atrium lies below the cavity; the cavity sits left of the centre line
        atrium, cavity = torch.nonzero(source == 3).float().mean(0), torch.nonzero(source == 1).float().mean(0)
        assert atrium[0] > cavity[0] + 5 and cavity[1] < 16
        assert extent(source == 3)[0] == patient + 2  # 32 rows kept, so the atrium's height is exact
        assert int((source == 1).sum()) > int((target == 1).sum())  # ED cavity larger than ES
        # spacing (H, W): depth 0.15 mm unchanged, lateral 0.3 mm × 48/32
        torch.testing.assert_close(item["meta"]["spacing"], torch.tensor([0.15, 0.45]))
        mask = item["mask"][0]
        assert float((mask * sector[0, 0]).sum() / ((mask + sector[0, 0]) > 0).sum()) > 0.95
        assert float((item["source"][0] * (1 - mask)).abs().max()) == 0.0
        assert float(mask[cavity.round().long()[0], cavity.round().long()[1]]) == 1.0  # black blood is inside


def test_camus_mhd_form_reads_like_the_nifti_form(camus_roots):
    items = []
    for root in camus_roots:
        dm = CAMUSDataModule(str(root), image_size=32)
        dm.setup(None)
        items.append({i["meta"]["case_id"]: i for split in dm.datasets.values() for i in split})
    shared = set(items[0]) & set(items[1])
    assert len(shared) == 12
    for case in shared:
        for key in ("source", "target", "source_label", "target_label", "mask"):
            torch.testing.assert_close(items[0][case][key], items[1][case][key])


def test_camus_image_quality_filter(tmp_path):
    qualities = {(1, "2CH"): "Poor", (2, "4CH"): "Medium"}
    root = make_camus_nifti(tmp_path, patients=range(1, 5), qualities=qualities)
    kept = CAMUSDataModule(str(root), image_quality=["Good"], val_fraction=0.25, test_fraction=0.0).discover()
    assert set(kept.units) == {f"patient{p:04d}_{v}" for p in range(1, 5) for v in ("2CH", "4CH")} - {
        "patient0001_2CH",
        "patient0002_4CH",
    }
    views = CAMUSDataModule(str(root), views=["4CH"], val_fraction=0.25, test_fraction=0.0).discover()
    assert all(u.endswith("_4CH") for u in views.units)


def test_camus_split_covers_only_patients_with_a_usable_view(tmp_path, caplog):
    root = make_camus_mhd(tmp_path / "camus", patients=range(1, 7))
    for folder in (make_camus_mhd(tmp_path / "first_release_testing", patients=range(7, 10)) / "training").iterdir():
        for label in folder.glob("*_gt.*"):  # the first release's testing/ patients come without labels
            label.unlink()
        (root / "testing").mkdir(exist_ok=True)
        folder.rename(root / "testing" / folder.name)
    with caplog.at_level("WARNING", logger="adacs_lightning"):
        catalog = CAMUSDataModule(str(root), val_fraction=0.2, test_fraction=0.2).discover()
    assert "Skipping case" not in caplog.text  # left out quietly, not as damaged cases
    assert sorted(sum(catalog.groups.values(), [])) == [f"patient{p:04d}" for p in range(1, 7)]
    assert [len(catalog.groups[s]) for s in ("train", "val", "test")] == [4, 1, 1]
    assert all(len(catalog.pairs[s]) == 2 * len(catalog.groups[s]) for s in catalog.groups) and not catalog.bad
    images_only = CAMUSDataModule(str(root), use_labels=False, val_fraction=0.2, test_fraction=0.2).discover()
    assert len(sum(images_only.groups.values(), [])) == 9  # without labels the testing/ patients are usable
    poor = {(1, "2CH"): "Poor", (1, "4CH"): "Poor"}
    filtered = make_camus_nifti(tmp_path / "quality", patients=range(1, 7), qualities=poor)
    catalog = CAMUSDataModule(str(filtered), image_quality=["Good"], val_fraction=0.2, test_fraction=0.2).discover()
    assert "patient0001" not in sum(catalog.groups.values(), [])
    assert all(len(catalog.pairs[s]) == 2 * len(catalog.groups[s]) for s in catalog.groups)


# ---------------------------------------------------------------------------- OASIS
def test_oasis_json_pairs_moving_to_fixed(tmp_path):
    root = make_oasis(tmp_path)
    dm = OASISDataModule(str(root), image_size=16, test_fraction=0.2)
    dm.setup(None)
    (val,) = list(dm.datasets["val"])
    check_contract(val, (16, 16, 16))
    assert val["meta"]["case_id"] == "OASIS_0008_to_OASIS_0007"
    assert val["source_label"].unique().tolist() == [0, 8] and val["target_label"].unique().tolist() == [0, 7]
    assert int(val["mask"].sum()) == 10 * 12 * 8  # masksTr: the volume less a one-voxel border
    for item in dm.datasets["train"]:  # inter-subject, consecutive among the training subjects
        moving, fixed = (int(s[6:]) for s in item["meta"]["case_id"].split("_to_"))
        assert moving > fixed and item["source_label"].max() == moving and item["target_label"].max() == fixed
    assert dm.eval_labels == [1, 2, 3, 4, 5, 6, 7, 8]


def test_oasis_without_json_pairs_consecutive_subjects(tmp_path):
    root = make_oasis(tmp_path, subjects=range(1, 7), json_pairs=False, masks=False)
    catalog = OASISDataModule(str(root), val_fraction=0.2, test_fraction=0.2).discover()
    for split, pairs in catalog.pairs.items():
        subjects = catalog.groups[split]
        assert [(p.target[0], p.source[0]) for p in pairs] == list(zip(subjects[:-1], subjects[1:]))
    assert sorted(sum(catalog.groups.values(), [])) == [f"OASIS_{s:04d}" for s in range(1, 7)]


# ---------------------------------------------------------------------------- folder
def test_folder_csv_mixed_formats_2d(tmp_path):
    csv_path = make_folder(tmp_path, rows=8)
    dm = FolderDataModule(str(csv_path), image_size=16, batch_size=2)
    dm.setup(None)
    assert [i["meta"]["case_id"] for i in dm.datasets["val"]] == ["row0003", "row0007"]
    assert dm.eval_labels == [1, 2]
    for item in dm.datasets["train"]:
        row = int(item["meta"]["case_id"][3:]) - 1
        check_contract(item, (16, 16))
        assert extent(item["source_label"][0] > 0) == [5, row + 1] and extent(item["target_label"][0] > 0) == [
            3,
            row + 1,
        ]
        assert item["source_label"].max() == 1 + row % 2
        assert int(item["mask"].sum()) == 15 * 12  # the mask's first row is 0; padded to 16 × 16


def test_folder_3d_without_split_column_is_deterministic(tmp_path):
    csv_path = make_folder(tmp_path, rows=6, shape=(10, 12, 8), formats=(".mhd", ".nii.gz", ".nrrd"), split=False)
    runs = []
    for _ in range(2):
        dm = FolderDataModule(str(csv_path), spatial_dims=3, image_size=16, val_fraction=0.2, test_fraction=0.2)
        dm.setup("fit")
        runs.append([i["meta"]["case_id"] for i in dm.datasets["train"]])
        check_contract(dm.datasets["val"][0], (16, 16, 16))
    assert runs[0] == runs[1] and len(runs[0]) == 4


def _test_pair_csv(root, source: tuple, target: tuple) -> str:
    """A CSV with one test pair; ``source``/``target`` are ``(array, affine)``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, (array, affine) in (("source", source), ("target", target)):
        nib.save(nib.Nifti1Image(np.asarray(array, np.float32), affine), str(root / f"{name}.nii.gz"))
    (root / "pairs.csv").write_text("source,target,split\nsource.nii.gz,target.nii.gz,test\n")
    return str(root / "pairs.csv")


def test_folder_resize_scales_the_spacing_of_the_image_it_was_read_from(tmp_path):
    # One 32 × 24 mm field of view: the source at 2 mm (16 × 12), the target at 1 mm (32 × 24).
    coarse, fine = np.random.default_rng(0).random((16, 12)), np.random.default_rng(1).random((32, 24))
    csv_path = _test_pair_csv(tmp_path, (coarse, np.diag([2.0, 2.0, 1.0, 1.0])), (fine, np.eye(4)))
    dm = FolderDataModule(csv_path, image_size=(16, 12), resize=True)
    dm.setup("test")
    (item,) = list(dm.datasets["test"])
    assert item["source"].shape == item["target"].shape == (1, 16, 12)
    torch.testing.assert_close(item["meta"]["spacing"], torch.tensor([2.0, 2.0]))  # the target's 1 mm × 32/16


def test_spacing_of_an_oblique_2d_slice_keeps_the_through_plane_part(tmp_path):
    oblique = np.eye(4)
    oblique[:3, 0] = [1.2, 0.0, 1.6]  # axis 0 runs obliquely through z: 2 mm per voxel
    oblique[:3, 1] = [0.0, 1.5, 0.0]
    image = MetaTensor(torch.zeros(1, 8, 6), affine=torch.as_tensor(oblique))
    np.testing.assert_allclose(spacing_of(image), [2.0, 1.5])
    np.testing.assert_allclose(
        spacing_of(MetaTensor(torch.zeros(1, 4, 4, 4), affine=torch.diag(torch.tensor([1.0, 2.0, 3.0, 1.0])))),
        [1.0, 2.0, 3.0],
    )
    array = np.random.default_rng(0).random((8, 6))
    dm = FolderDataModule(_test_pair_csv(tmp_path, (array, oblique), (array, oblique)))
    dm.setup("test")
    torch.testing.assert_close(dm.datasets["test"][0]["meta"]["spacing"], torch.tensor([2.0, 1.5]))


def test_simpleitk_reader_matches_nibabel_index_order(tmp_path):
    array = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    path = write_itk(tmp_path / "a.mha", array, (0.5, 2.0, 3.0))
    data, meta = SimpleITKReader().get_data(SimpleITKReader().read(path))
    np.testing.assert_array_equal(data, array)
    np.testing.assert_allclose(np.abs(np.diag(meta["affine"]))[:3], [0.5, 2.0, 3.0])
    assert SimpleITKReader().verify_suffix("x.nrrd") and not SimpleITKReader().verify_suffix("x.nii.gz")


# ---------------------------------------------------------------------------- caching
def test_second_epoch_reads_no_image_file(acdc, tmp_path, monkeypatch):
    reads = []
    for reader in (NibabelReader, SimpleITKReader):
        original = reader.read
        monkeypatch.setattr(reader, "read", lambda self, data, _o=original, **kw: reads.append(data) or _o(self, data))
    csv_path = make_folder(tmp_path, rows=4)
    modules = [
        ACDCDataModule(str(acdc), image_size=32, spacing=1.0, batch_size=4),
        FolderDataModule(str(csv_path), image_size=16, batch_size=2),
    ]
    for dm in modules:
        dm.setup("fit")
    assert len(reads) > 0  # the cache was filled through the readers
    before = len(reads)
    for dm in modules:
        for epoch in range(2):
            loader = dm.train_dataloader()
            loader.sampler.set_epoch(epoch)
            assert sum(batch["source"].shape[0] for batch in loader) == len(dm.datasets["train"])
    assert len(reads) == before


# ---------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_cli_trains_on_fake_camus(tmp_path):
    root = make_camus_nifti(tmp_path / "camus", split={"training": [1, 2, 3, 4], "validation": [5], "testing": [6]})
    run = tmp_path / "run"
    result = adacs_train(
        "backbone=voxelmorph",
        "data=camus",
        f"data.root={root}",
        "debug=tiny",
        "trainer.max_epochs=2",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and 0.0 <= summary["metrics"]["val/dice"] <= 1.0
    assert json.loads((run / "splits.json").read_text())["val"] == ["patient0005"]
    assert json.loads((run / "skipped_cases.json").read_text()) == []
