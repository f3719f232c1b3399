"""Errors users hit with real data: each names the file or setting and the fix; bad cases are skipped unless strict."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from adacs_lightning.data import (
    ACDCDataModule,
    CAMUSDataModule,
    DataError,
    FolderDataModule,
    OASISDataModule,
)
from adacs_lightning.errors import ConfigError

from .helpers.fakes import make_acdc, make_camus_nifti, make_folder, make_oasis, write_nifti
from .helpers.logs import skipped


def acdc_module(root, **kwargs):
    return ACDCDataModule(str(root), image_size=32, spacing=1.0, **kwargs)


@pytest.mark.parametrize("module", [ACDCDataModule, CAMUSDataModule, OASISDataModule])
def test_missing_root(tmp_path, module):
    with pytest.raises(ConfigError, match=r"'data.root': '.*nowhere' does not exist .*Point data.root at"):
        module(str(tmp_path / "nowhere")).setup("fit")


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (ACDCDataModule, "holds no ACDC patient folders.*training/ and testing/"),
        (CAMUSDataModule, "holds no CAMUS patient folders.*database_nifti/"),
        (OASISDataModule, "holds no OASIS_NNNN_0000.nii.gz.*imagesTr/"),
    ],
)
def test_empty_root(tmp_path, module, expected):
    with pytest.raises(ConfigError, match=expected):
        module(str(tmp_path)).setup("fit")


def test_missing_frame_is_skipped_listed_and_raised_when_strict(tmp_path, caplog):
    root = make_acdc(tmp_path / "acdc")
    frame = root / "training" / "patient003" / "patient003_frame03.nii.gz"
    frame.unlink()
    run = tmp_path / "run"
    dm = acdc_module(root, output_dir=str(run))
    with skipped(caplog, r"patient003_frame03.nii.gz: is missing \(Info.cfg gives ES: 3\)"):
        dm.setup(None)
    assert all(not i["meta"]["case_id"].startswith("patient003") for d in dm.datasets.values() for i in d)
    (listed,) = json.loads((run / "skipped_cases.json").read_text())
    assert listed["case"] == "patient003" and listed["file"] == str(frame) and "Restore" in listed["fix"]
    with pytest.raises(DataError, match=r"patient003_frame03.nii.gz: is missing .*Restore it from the ACDC archive"):
        acdc_module(root, strict=True).setup("fit")


def test_missing_label_and_bad_info_cfg(tmp_path, caplog):
    root = make_acdc(tmp_path, training=range(1, 6), testing=())
    (root / "training" / "patient002" / "patient002_frame01_gt.nii.gz").unlink()
    (root / "training" / "patient004" / "Info.cfg").write_text("Group: DCM\n")
    with skipped(caplog) as record:
        catalog = acdc_module(root).discover()
    messages = " ".join(record)
    assert "patient002_frame01_gt.nii.gz: is missing: no ground truth for the ED frame" in messages
    assert "data.use_labels=false" in messages
    assert "patient004/Info.cfg: has no valid 'ED:' line" in messages
    assert sorted(b.case for b in catalog.bad) == ["patient002", "patient004"]
    assert sorted(catalog.units) == ["patient001", "patient003", "patient005"]


def test_corrupt_file(tmp_path, caplog):
    root = make_acdc(tmp_path, training=range(1, 6), testing=())
    bad = root / "training" / "patient001" / "patient001_frame01.nii.gz"
    bad.write_bytes(b"this is not an image")
    with pytest.raises(DataError, match=r"patient001_frame01.nii.gz: could not be read as an image .*re-extract"):
        acdc_module(root, strict=True).setup("fit")
    with skipped(caplog, "could not be read"):
        dm = acdc_module(root)
        dm.setup("fit")
    assert [b.case for b in dm.bad_cases] == ["patient001"]


def test_label_shape_differs_from_image(tmp_path):
    root = make_acdc(tmp_path, training=range(1, 6), testing=())
    label = root / "training" / "patient005" / "patient005_frame03_gt.nii.gz"
    write_nifti(label, np.zeros((24, 18, 3), np.uint8), (3.0, 1.0, 10.0))
    with pytest.raises(
        DataError, match=r"frame03_gt.nii.gz: has shape \(24, 18, 3\) but .*frame03.nii.gz has \(24, 20, 3\)"
    ):
        acdc_module(root, strict=True).setup(None)


def test_3d_config_meets_2d_data_and_back(tmp_path):
    csv_2d = make_folder(tmp_path / "two", rows=4)
    with pytest.raises(DataError, match=r"r0_source.nii.gz: is 2D \(shape \(16, 12\)\).*Set data.spatial_dims=2"):
        FolderDataModule(str(csv_2d), spatial_dims=3, strict=True).setup("fit")
    csv_3d = make_folder(tmp_path / "three", rows=4, shape=(8, 8, 6), formats=(".mha",))
    with pytest.raises(DataError, match=r"r0_source.mha: is 3D \(shape \(8, 8, 6\)\).*Set data.spatial_dims=3"):
        FolderDataModule(str(csv_3d), spatial_dims=2, strict=True).setup("fit")
    # a 2D image saved with a trailing axis of 1 is still 2D
    nib.save(
        nib.Nifti1Image(np.arange(192, dtype=np.float32).reshape(16, 12, 1), np.eye(4)),
        str(tmp_path / "two" / "images" / "r0_source.nii.gz"),
    )
    FolderDataModule(str(csv_2d), spatial_dims=2, strict=True).setup("fit")
    with pytest.raises(ConfigError, match="OASIS volumes are 3D"):
        OASISDataModule(str(tmp_path), spatial_dims=2)
    with pytest.raises(ConfigError, match="ACDC is read as 2D"):
        ACDCDataModule(str(tmp_path), spatial_dims=3)


def test_camus_frame_that_is_a_sequence(tmp_path, caplog):
    root = make_camus_nifti(tmp_path, patients=range(1, 5))
    frame = root / "database_nifti" / "patient0002" / "patient0002_2CH_ES.nii.gz"
    write_nifti(frame, np.ones((48, 32, 5), np.float32), (0.3, 0.15))
    with skipped(caplog, r"patient0002_2CH_ES.nii.gz: is 3D .*not the _half_sequence"):
        dm = CAMUSDataModule(str(root), image_size=32, val_fraction=0.25, test_fraction=0.0)
        dm.setup("fit")
    assert [b.case for b in dm.bad_cases] == ["patient0002_2CH"]


def test_csv_errors(tmp_path):
    csv_path = make_folder(tmp_path, rows=4)
    with pytest.raises(ConfigError, match=r"'data.csv': no CSV file at"):
        FolderDataModule(str(tmp_path / "missing.csv")).setup("fit")
    text = csv_path.read_text()
    csv_path.write_text(text.replace("source,source_label", "src,source_label", 1))
    with pytest.raises(ConfigError, match=r"missing \['source'\].*The header is source,target"):
        FolderDataModule(str(csv_path)).setup("fit")
    csv_path.write_text(text.split("\n")[0] + "\n")
    with pytest.raises(ConfigError, match="lists no pairs"):
        FolderDataModule(str(csv_path)).setup("fit")
    (tmp_path / "notes.txt").write_text("hello")
    csv_path.write_text(text.replace("images/r1_source.mha", "notes.txt"))
    with pytest.raises(DataError, match=r"notes.txt: is not a NIfTI, MHA/MHD or NRRD file"):
        FolderDataModule(str(csv_path), strict=True).setup("fit")
    csv_path.write_text(text.replace("images/r1_source.mha", "images/gone.mha"))
    with pytest.raises(DataError, match=r"gone.mha: is missing \(the source of line 3 of pairs.csv\)"):
        FolderDataModule(str(csv_path), strict=True).setup("fit")
    csv_path.write_text(text.replace(",train", ",later", 1))
    with pytest.raises(ConfigError, match="has split 'later'.*Use train, val or test"):
        FolderDataModule(str(csv_path)).setup("fit")


def test_oasis_missing_label_is_skipped(tmp_path, caplog):
    root = make_oasis(tmp_path)
    (root / "labelsTr" / "OASIS_0003_0000.nii.gz").unlink()
    with skipped(caplog, r"OASIS_0003_0000.nii.gz: is missing: OASIS_0003 has no label map"):
        dm = OASISDataModule(str(root), image_size=16, test_fraction=0.2)
        dm.setup("fit")
    assert all("OASIS_0003" not in i["meta"]["case_id"] for i in dm.datasets["train"])


def test_images_of_several_sizes_need_image_size(tmp_path):
    csv_path = make_folder(tmp_path, rows=4, formats=(".nii.gz",))
    ramp = np.arange(240, dtype=np.float32).reshape(20, 12)  # an image of another size (not constant)
    write_nifti(tmp_path / "images" / "r0_source.nii.gz", ramp, (1.0, 1.0))
    write_nifti(tmp_path / "labels" / "r0_source.nii.gz", np.ones((20, 12), np.uint8), (1.0, 1.0))
    with pytest.raises(DataError, match=r"r0_source.nii.gz: has shape \(20, 12\).*set data.image_size"):
        FolderDataModule(str(csv_path), strict=True).setup("fit")
    with pytest.raises(ConfigError, match=r"'data.image_size': the 'train' images come in several sizes"):
        csv_3 = make_folder(tmp_path / "b", rows=4, formats=(".nii.gz",))
        write_nifti(tmp_path / "b" / "images" / "r1_source.nii.gz", ramp, (1.0, 1.0))
        write_nifti(tmp_path / "b" / "images" / "r1_target.nii.gz", ramp, (1.0, 1.0))
        for which in ("source", "target"):
            write_nifti(tmp_path / "b" / "labels" / f"r1_{which}.nii.gz", np.ones((20, 12), np.uint8), (1.0, 1.0))
        write_nifti(tmp_path / "b" / "masks" / "r1.nii.gz", np.ones((20, 12), np.uint8), (1.0, 1.0))
        FolderDataModule(str(csv_3)).setup("fit")
