"""ACDC (cine cardiac MRI): end-diastole → end-systole pairs of matching short-axis slices.

Layout (as released)::

    <root>/training/patient001/Info.cfg                    ED: 1, ES: 12, Group: DCM, NbFrame: 30, ...
    <root>/training/patient001/patient001_frame01.nii.gz   (X, Y, slices), ED (frame numbers are 1-based)
    <root>/training/patient001/patient001_frame01_gt.nii.gz  labels 1 RV, 2 myocardium, 3 LV
    <root>/training/patient001/patient001_frame12.nii.gz   ES, and its _gt
    <root>/training/patient001/patient001_4d.nii.gz        (ignored)
    <root>/testing/patient101/...                          same layout; some copies lack the _gt files

``<root>`` may also hold the ``patientNNN`` folders directly.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.transforms import Compose, EnsureChannelFirstd, Spacingd

from ..errors import ConfigError
from .bad_cases import DataError, skip_or_raise
from .base import ReleasedDataModule
from .io import LoadFilesd, read_cfg
from .pairs import Catalog, PairSpec, Unit, split_ids
from .recipe import GridRecipe
from .transforms import (
    CheckShapesd,
    CheckValuesd,
    CropAroundCentroidd,
    Finalised,
    RecordSpacingd,
    ToSpatialDimsd,
    intensity,
)

log = logging.getLogger("adacs_lightning")

RIGHT_VENTRICLE, MYOCARDIUM, LEFT_VENTRICLE = 1, 2, 3
LABEL_NAMES = {RIGHT_VENTRICLE: "right_ventricle", MYOCARDIUM: "myocardium", LEFT_VENTRICLE: "left_ventricle"}
_PATIENT = re.compile(r"patient\d+")


def patient_folders(folder: Path) -> list[Path]:
    """The ``patientNNN`` sub-folders of ``folder``, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _PATIENT.fullmatch(p.name))


def frame_file(folder: Path, frame: int, label: bool) -> Path:
    """``patientNNN_frameYY[_gt].nii.gz`` (or ``.nii`` when only that exists)."""
    stem = f"{folder.name}_frame{frame:02d}{'_gt' if label else ''}"
    path = folder / f"{stem}.nii.gz"
    return path if path.exists() or not (folder / f"{stem}.nii").exists() else folder / f"{stem}.nii"


class ACDCDataModule(ReleasedDataModule):
    """ACDC ED→ES short-axis slice pairs, ``(1, image_size, image_size)`` per image.

    Per patient, both frames are resampled in-plane to ``spacing`` mm (slices kept), scaled to
    [0, 1] and cropped/padded to ``image_size`` around the centroid of the ED label map (the
    image centre when labels are not used); then slice ``k`` of ED is paired with slice ``k``
    of ES (one acquisition, one slice geometry).

    Args:
        root: the ACDC folder (holding ``training/`` and ``testing/``, or patient folders).
        spatial_dims: 2 (slice pairs); ACDC's 3D stacks are too thin for 3D registration.
        image_size: in-plane crop in voxels (int or ``[X, Y]``).
        spacing: in-plane voxel spacing after resampling, mm.
        slices: ``labelled``: slices labelled in both frames (so every pair has a Dice); ``all``.
        use_labels: load the ``_gt`` label maps (a patient without them is skipped); false trains
            on images alone (no Dice, crop at the image centre).
        intensity: ``percentile`` (1st–99th percentile to [0, 1], clipped) or ``minmax``.
        val_fraction: fraction of ``training/`` patients held out for validation.
        test_fraction: fraction held out for testing when there is no ``testing/`` folder.
        eval_labels: labels whose mean Dice is ``val/dice`` (2, myocardium, by default).
        Others: see :class:`~adacs_lightning.data.base.FileDataModule`.
    """

    dataset_name = "acdc"
    label_names = LABEL_NAMES
    only_dims = (2, "ACDC is read as 2D short-axis slice pairs", "Use data.spatial_dims=2 (and a 2D backbone).")
    root_holds = "the ACDC folder (holding training/ and testing/)"

    def __init__(
        self,
        root: str,
        spatial_dims: int = 2,
        image_size: int | Sequence[int] = 128,
        spacing: float = 1.5,
        slices: str = "labelled",
        use_labels: bool = True,
        intensity: str = "percentile",
        **loading: Any,
    ) -> None:
        loading = {"eval_labels": (MYOCARDIUM,), "val_fraction": 0.2, **loading}
        super().__init__(
            root, spatial_dims, use_labels=use_labels, image_size=image_size, intensity=intensity, **loading
        )
        if slices not in ("labelled", "all"):
            raise ConfigError("slices", f"must be 'labelled' or 'all', got {slices!r}.")
        if float(spacing) <= 0:
            raise ConfigError("spacing", f"must be positive (mm), got {spacing}.", "ACDC's is about 1.5 mm.")
        self.spacing = float(spacing)
        self.slices = slices

    # ------------------------------------------------------------------ discovery
    def discover(self) -> Catalog:
        root = self.root_folder()
        training, testing = patient_folders(root / "training"), patient_folders(root / "testing")
        if not training and not testing:
            training = patient_folders(root)
        if not training and not testing:
            raise ConfigError(
                "data.root",
                f"'{root}' holds no ACDC patient folders (training/patientNNN/ with Info.cfg).",
                "Point data.root at the ACDC folder that holds training/ and testing/ (or the patientNNN folders).",
            )
        if testing:
            groups = split_ids([p.name for p in training], self.seed, self.val_fraction, 0.0) if training else {}
            groups = {"train": groups.get("train", []), "val": groups.get("val", []), "test": [p.name for p in testing]}
        else:
            groups = split_ids([p.name for p in training], self.seed, self.val_fraction, self.test_fraction)
        units, bad, unlabelled = {}, [], []
        for folder in training + testing:
            try:
                units[folder.name] = self._unit(folder)
            except DataError as error:
                if folder in testing and self.use_labels and error.problem.startswith("is missing: no ground truth"):
                    unlabelled.append(folder.name)  # the testing release ships some patients without labels
                    continue
                bad.append(skip_or_raise(folder.name, error, self.strict))
        if unlabelled:
            log.info("ACDC: %d testing patient(s) have no ground truth and are left out", len(unlabelled))
            groups["test"] = [g for g in groups["test"] if g not in unlabelled]
        pairs = {
            split: [PairSpec(pid, (pid, "ed"), (pid, "es"), slices=True) for pid in ids if pid in units]
            for split, ids in groups.items()
        }
        return Catalog(units, pairs, groups, bad)

    def _unit(self, folder: Path) -> Unit:
        cfg_path = folder / "Info.cfg"
        if not cfg_path.is_file():
            raise DataError(
                cfg_path,
                "is missing.",
                "Restore Info.cfg (it gives the ED and ES frame numbers) from the ACDC archive, "
                "or remove the patient folder.",
            )
        cfg = read_cfg(cfg_path)
        files = {}
        for phase in ("ED", "ES"):
            value = cfg.get(phase, "")
            if not value.isdigit():
                raise DataError(
                    cfg_path,
                    f"has no valid '{phase}:' line (found {value!r}).",
                    f"Add the 1-based {phase} frame number, e.g. '{phase}: 1'.",
                )
            frame = int(value)
            image, label = frame_file(folder, frame, False), frame_file(folder, frame, True)
            if not image.is_file():
                raise DataError(
                    image,
                    f"is missing (Info.cfg gives {phase}: {frame}).",
                    "Restore it from the ACDC archive, or remove the patient folder.",
                )
            files[phase.lower()] = str(image)
            if self.use_labels:
                if not label.is_file():
                    raise DataError(
                        label,
                        f"is missing: no ground truth for the {phase} frame.",
                        "Restore it from the ACDC archive, set data.use_labels=false to train on images "
                        "alone, or remove the patient folder.",
                    )
                files[f"label_{phase.lower()}"] = str(label)
        return Unit(folder.name, files)

    # ------------------------------------------------------------------ preprocessing
    def registration_grid(self) -> GridRecipe:
        """The in-plane spacing (the crop around the heart only frames the slice)."""
        return GridRecipe(spacing=(self.spacing,) * 2 + (0.0,) * (self.spatial_dims - 2))

    def pipeline(self) -> Compose:
        images = ["ed", "es"]
        labels = ["label_ed", "label_es"] if self.use_labels else []
        keys = images + labels
        return Compose(
            [
                LoadFilesd(keys),
                EnsureChannelFirstd(keys),
                ToSpatialDimsd(
                    keys, 3, fix="ACDC frames are 3D stacks (X, Y, slices): give the patientNNN_frameYY files."
                ),
                CheckShapesd([("ed", "label_ed"), ("es", "label_es")]),
                CheckShapesd(
                    [("ed", "es")],
                    fix="The ED and ES frames of a patient must have the same slices: re-export them or remove "
                    "the patient folder.",
                ),
                CheckValuesd(keys),
                Spacingd(
                    keys,
                    pixdim=(self.spacing, self.spacing, 0.0),  # 0: keep the slice spacing
                    mode=["bilinear"] * len(images) + ["nearest"] * len(labels),
                    padding_mode=["border"] * len(images) + ["zeros"] * len(labels),  # no label smeared outwards
                ),
                RecordSpacingd("ed"),
                intensity(images, self.intensity),
                CropAroundCentroidd(keys, centre_keys=labels[:1], roi_size=self.image_size),
                Finalised(images, labels),
            ]
        )

    def keep_slice(self, source: dict, target: dict, pair: PairSpec, index: int) -> bool:
        if self.slices == "all" or "label_ed" not in source:
            return True
        return bool(source["label_ed"][..., index].any()) and bool(target["label_es"][..., index].any())
