"""Small fake copies of the public data sets, in their exact on-disk layouts (no tests here).

Identities are encoded in label geometry so that pairing can be checked after preprocessing:
ACDC: the right-ventricle block spans ``patient`` voxels along X (3 mm) and ``slice + 1`` along Y, the
LV square is 4 voxels wide at ED and 3 at ES. CAMUS: the atrium block spans ``patient + 2``
rows, the cavity sits in the left half and is larger at ED. OASIS: subject ``s``'s label map
holds the value ``s``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk


def write_nifti(path: Path, array: np.ndarray, spacing) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag(list(spacing) + [1.0] * (4 - len(spacing)))
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def write_itk(path: Path, array: np.ndarray, spacing) -> Path:
    """``array`` in index order ``(x, y[, z])``, as nibabel holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(array).T))
    image.SetSpacing([float(s) for s in spacing])
    sitk.WriteImage(image, str(path))
    return path


# ---------------------------------------------------------------------------- ACDC
ACDC_SHAPE, ACDC_SPACING = (24, 20, 3), (3.0, 1.0, 10.0)


def acdc_label(patient: int, phase: str) -> np.ndarray:
    label = np.zeros(ACDC_SHAPE, dtype=np.uint8)
    side = 4 if phase == "ED" else 3
    label[7 : 8 + side + 1, 7 : 8 + side + 1] = 2
    label[8 : 8 + side, 8 : 8 + side] = 3
    for k in range(ACDC_SHAPE[2]):
        label[8 : 8 + patient, 2 : 2 + k + 1, k] = 1
    return label


def acdc_image(label: np.ndarray) -> np.ndarray:
    return (40.0 + 60.0 * label).astype(np.float32)


def make_acdc(root: Path, training=range(1, 7), testing=(101, 102), without_gt=(102,)) -> Path:
    for number in list(training) + list(testing):
        folder = root / ("training" if number < 101 else "testing") / f"patient{number:03d}"
        folder.mkdir(parents=True)
        (folder / "Info.cfg").write_text("ED: 1\nES: 3\nGroup: DCM\nHeight: 180.0\nNbFrame: 5\nWeight: 80.0\n")
        for phase, frame in (("ED", 1), ("ES", 3)):
            label = acdc_label(number % 7, phase)
            stem = f"patient{number:03d}_frame{frame:02d}"
            write_nifti(folder / f"{stem}.nii.gz", acdc_image(label), ACDC_SPACING)
            if number not in without_gt:
                write_nifti(folder / f"{stem}_gt.nii.gz", label, ACDC_SPACING)
        write_nifti(folder / f"patient{number:03d}_4d.nii.gz", np.zeros(ACDC_SHAPE + (5,), np.float32), ACDC_SPACING)
    return root


# ---------------------------------------------------------------------------- CAMUS
CAMUS_HW, CAMUS_SPACING_HW = (32, 48), (0.15, 0.3)  # rows: depth from the probe; columns: lateral


def camus_sector() -> np.ndarray:
    """The imaged sector: apex at the top centre, 70 degrees wide, in (H, W)."""
    rows, cols = np.mgrid[0 : CAMUS_HW[0], 0 : CAMUS_HW[1]]
    angle = np.degrees(np.arctan2(np.abs(cols - (CAMUS_HW[1] - 1) / 2), rows + 2.0))
    return (angle <= 35) & (rows < CAMUS_HW[0] - 1)


def camus_label(patient: int, phase: str) -> np.ndarray:
    label = np.zeros(CAMUS_HW, dtype=np.uint8)
    width = 6 if phase == "ED" else 4
    label[8:20, 14 : 14 + width + 4] = 2  # myocardium around the cavity, left of the centre line
    label[10:18, 16 : 16 + width] = 1
    label[20 : 20 + patient + 2, 15:25] = 3  # the atrium, deeper than the cavity
    return label


def camus_image(label: np.ndarray) -> np.ndarray:
    image = np.where(label == 1, 0.0, 90.0 + 50.0 * label) * camus_sector()  # black blood inside the sector
    return image.astype(np.float32)


def make_camus_nifti(root: Path, patients=range(1, 7), qualities=None, split=None) -> Path:
    for number in patients:
        name = f"patient{number:04d}"
        folder = root / "database_nifti" / name
        folder.mkdir(parents=True)
        for view in ("2CH", "4CH"):
            quality = (qualities or {}).get((number, view), "Good")
            (folder / f"Info_{view}.cfg").write_text(
                f"ED: 1\nES: 11\nNbFrame: 20\nSex: F\nAge: 60\nImageQuality: {quality}\nEF: 55\nFrameRate: 30\n"
            )
            for phase in ("ED", "ES"):
                label = camus_label(number, phase)
                spacing = CAMUS_SPACING_HW[::-1]  # width first
                write_nifti(folder / f"{name}_{view}_{phase}.nii.gz", camus_image(label).T, spacing)
                write_nifti(folder / f"{name}_{view}_{phase}_gt.nii.gz", label.T, spacing)
            write_nifti(folder / f"{name}_{view}_half_sequence.nii.gz", np.zeros((48, 32, 5), np.float32), (0.3, 0.15))
    if split:
        (root / "database_split").mkdir()
        for group, ids in split.items():
            (root / "database_split" / f"subgroup_{group}.txt").write_text("".join(f"patient{i:04d}\n" for i in ids))
    return root


def make_camus_mhd(root: Path, patients=range(1, 7)) -> Path:
    for number in patients:
        name = f"patient{number:04d}"
        folder = root / "training" / name
        folder.mkdir(parents=True)
        for view in ("2CH", "4CH"):
            (folder / f"Info_{view}.cfg").write_text("ED: 1\nES: 11\nNbFrame: 20\nImageQuality: Medium\nLVef: 55\n")
            for phase in ("ED", "ES"):
                label = camus_label(number, phase)
                spacing = CAMUS_SPACING_HW[::-1]
                write_itk(folder / f"{name}_{view}_{phase}.mhd", camus_image(label).T, spacing)
                write_itk(folder / f"{name}_{view}_{phase}_gt.mhd", label.T, spacing)
    return root


# ---------------------------------------------------------------------------- OASIS
OASIS_SHAPE = (12, 14, 10)


def oasis_label(subject: int) -> np.ndarray:
    label = np.zeros(OASIS_SHAPE, dtype=np.uint8)
    label[3:9, 4 : 4 + subject, 2:8] = subject
    return label


def make_oasis(root: Path, subjects=range(1, 9), json_pairs=True, masks=True) -> Path:
    for s in subjects:
        name = f"OASIS_{s:04d}_0000.nii.gz"
        label = oasis_label(s)
        write_nifti(root / "imagesTr" / name, (10.0 + 20.0 * (label > 0)).astype(np.float32), (1.0, 1.0, 1.0))
        write_nifti(root / "labelsTr" / name, label, (1.0, 1.0, 1.0))
        if masks:
            mask = np.zeros(OASIS_SHAPE, np.uint8)
            mask[1:-1, 1:-1, 1:-1] = 1
            write_nifti(root / "masksTr" / name, mask, (1.0, 1.0, 1.0))
    if json_pairs:
        val = [{"fixed": "./imagesTr/OASIS_0007_0000.nii.gz", "moving": "./imagesTr/OASIS_0008_0000.nii.gz"}]
        content = {
            "name": "OASIS",
            "tensorImageSize": {"0": "3D"},
            "training_paired_images": [],
            "registration_val": val,
            "training": [{"image": f"./imagesTr/OASIS_{s:04d}_0000.nii.gz"} for s in subjects],
        }
        (root / "OASIS_dataset.json").write_text(json.dumps(content))
    return root


# ---------------------------------------------------------------------------- folder
def folder_label(row: int, which: str, shape) -> np.ndarray:
    label = np.zeros(shape, dtype=np.uint8)
    width = 5 if which == "source" else 3
    index = (slice(2, 2 + width), slice(2, 2 + row + 1)) + (slice(2, 6),) * (len(shape) - 2)
    label[index] = 1 + row % 2
    return label


def make_folder(root: Path, rows=4, shape=(16, 12), formats=(".nii.gz", ".mha", ".nrrd", ".mhd"), split=True):
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for row in range(rows):
        ext = formats[row % len(formats)]
        writer = write_nifti if ext.startswith(".nii") else write_itk
        entry = {}
        for which in ("source", "target"):
            label = folder_label(row, which, shape)
            entry[which] = writer(root / "images" / f"r{row}_{which}{ext}", 5.0 + 10.0 * label, (1.0,) * len(shape))
            entry[f"{which}_label"] = writer(root / "labels" / f"r{row}_{which}{ext}", label, (1.0,) * len(shape))
        mask = np.ones(shape, np.uint8)
        mask[0] = 0
        entry["mask"] = writer(root / "masks" / f"r{row}{ext}", mask, (1.0,) * len(shape))
        entry = {k: str(v.relative_to(root)) for k, v in entry.items()}
        if split:
            entry["split"] = ("train", "train", "val", "test")[row % 4]
        records.append(entry)
    path = root / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path
