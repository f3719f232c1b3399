"""CAMUS (2D echocardiography): end-diastole → end-systole pairs of one apical view.

Two on-disk forms are read:

* NIfTI (current release)::

    <root>/database_nifti/patient0001/patient0001_{2CH,4CH}_{ED,ES}.nii.gz   arrays stored width-first (W, H)
    <root>/database_nifti/patient0001/patient0001_{2CH,4CH}_{ED,ES}_gt.nii.gz  1 LV cavity, 2 myocardium, 3 atrium
    <root>/database_nifti/patient0001/Info_{2CH,4CH}.cfg                      ED, ES, NbFrame, ImageQuality, EF, ...
    <root>/database_nifti/patient0001/patient0001_{2CH,4CH}_half_sequence.nii.gz  (ignored)
    <root>/database_split/subgroup_{training,validation,testing}.txt          the official split

* MetaImage (first release)::

    <root>/training/patient0001/patient0001_{2CH,4CH}_{ED,ES}{,_gt}.mhd (+ .raw), Info_{2CH,4CH}.cfg

Both read as ``(W, H)`` in index order and are transposed to ``(H, W)``: rows run in depth from the
probe (apex at the top), columns across the sector, as the images are displayed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.transforms import Compose, EnsureChannelFirstd, Transposed

from ..errors import ConfigError
from .bad_cases import BadCase, DataError, skip_or_raise
from .base import ReleasedDataModule
from .io import LoadFilesd, read_cfg
from .pairs import Catalog, PairSpec, Unit, split_ids
from .recipe import GridRecipe
from .transforms import (
    CheckShapesd,
    CheckValuesd,
    Finalised,
    RecordSpacingd,
    ResizeSpacingd,
    SectorMaskd,
    ToSpatialDimsd,
    intensity,
)

log = logging.getLogger("adacs_lightning")

LV_CAVITY, MYOCARDIUM, LEFT_ATRIUM = 1, 2, 3
LABEL_NAMES = {LV_CAVITY: "lv_cavity", MYOCARDIUM: "myocardium", LEFT_ATRIUM: "left_atrium"}
VIEWS = ("2CH", "4CH")
QUALITIES = ("Good", "Medium", "Poor")
_PATIENT = re.compile(r"patient\d+")
_SPLIT_FILES = {"train": "subgroup_training.txt", "val": "subgroup_validation.txt", "test": "subgroup_testing.txt"}


class CAMUSDataModule(ReleasedDataModule):
    """CAMUS ED→ES pairs per patient and view, ``(1, H, W)`` = ``image_size``, with the sector as ``mask``.

    Each frame is scaled to [0, 1] (min–max). The field-of-view mask is derived from the non-zero
    image support: voxels above ``sector_threshold``, morphologically closed with a disc of
    ``sector_closing`` voxels, holes filled, largest component kept, intersected over ED and ES
    (see :class:`~adacs_lightning.data.transforms.SectorMaskd`). Images, labels and mask are then
    resized to ``image_size`` (``meta.spacing`` follows) and the images zeroed outside the mask.

    Args:
        root: the CAMUS folder (holding ``database_nifti/`` and ``database_split/``, or ``training/``).
        spatial_dims: 2.
        image_size: output size ``[H, W]`` (or an int for both), voxels.
        views: apical views to use: ``2CH``, ``4CH``.
        image_quality: keep views whose Info cfg ``ImageQuality`` is one of these (Good, Medium, Poor).
        use_labels: load the ``_gt`` label maps (a view without them is skipped).
        sector_threshold: intensity (after scaling to [0, 1]) above which a voxel is inside the sector.
        sector_closing: radius (voxels, at the original resolution) of the closing that fills the sector.
        intensity: ``minmax``, the only scaling (accepted so that ``experiment=reference`` applies).
        val_fraction, test_fraction: patient fractions held out when there is no official split.
        eval_labels: labels whose mean Dice is ``val/dice`` (2, myocardium, by default).
        Others: see :class:`~adacs_lightning.data.base.FileDataModule`.
    """

    dataset_name = "camus"
    label_names = LABEL_NAMES
    only_dims = (2, "CAMUS frames are 2D images", "Use 2.")
    root_holds = "the CAMUS folder (holding database_nifti/ or training/)"

    def __init__(
        self,
        root: str,
        spatial_dims: int = 2,
        image_size: int | Sequence[int] = 128,
        views: Sequence[str] = VIEWS,
        image_quality: Sequence[str] = QUALITIES,
        use_labels: bool = True,
        sector_threshold: float = 0.01,
        sector_closing: int = 3,
        intensity: str = "minmax",
        **loading: Any,
    ) -> None:
        if intensity != "minmax":
            raise ConfigError(
                "intensity", f"CAMUS frames are min–max scaled (the sector threshold assumes it); got {intensity!r}."
            )
        loading = {"eval_labels": (MYOCARDIUM,), **loading}
        super().__init__(
            root, spatial_dims, use_labels=use_labels, image_size=image_size, intensity=intensity, **loading
        )
        views = [str(v).upper() for v in views]
        if not views or any(v not in VIEWS for v in views):
            raise ConfigError("views", f"must be a non-empty list of {VIEWS}, got {views}.", "E.g. [2CH, 4CH].")
        qualities = [str(q).capitalize() for q in image_quality]
        if not qualities or any(q not in QUALITIES for q in qualities):
            raise ConfigError("image_quality", f"must list some of {QUALITIES}, got {list(image_quality)}.")
        self.views, self.qualities = views, qualities
        self.sector_threshold, self.sector_closing = float(sector_threshold), int(sector_closing)

    # ------------------------------------------------------------------ discovery
    def discover(self) -> Catalog:
        """Units first, then the split over the patients with at least one usable view.

        Patients whose every view is unusable (a damaged file, filtered out by ``image_quality``,
        or, with ``use_labels``, a ``testing/`` patient of the first release, which ships without
        ``_gt`` files) are left out of the split, so that they do not shrink val/test.
        """
        root = self.root_folder()
        folders = []
        for parent in (root / "database_nifti", root / "training", root / "testing", root):
            if parent.is_dir():
                folders += [p for p in sorted(parent.iterdir()) if p.is_dir() and _PATIENT.fullmatch(p.name)]
        if not folders:
            raise ConfigError(
                "data.root",
                f"'{root}' holds no CAMUS patient folders (database_nifti/patientNNNN/ or training/patientNNNN/).",
                "Point data.root at the CAMUS folder that holds database_nifti/ (NIfTI) or training/ (.mhd).",
            )
        patients = {p.name: p for p in folders}
        units: dict[str, Unit] = {}
        bad: list[BadCase] = []
        excluded, unlabelled = 0, set()
        for name, folder in sorted(patients.items()):
            for view in self.views:
                unit_id = f"{name}_{view}"
                if self.use_labels and folder.parent.name == "testing" and not _has_ground_truth(folder, view):
                    unlabelled.add(name)  # the first release's testing/ patients come without labels
                    continue
                try:
                    unit = self._unit(folder, view)
                except DataError as error:
                    bad.append(skip_or_raise(unit_id, error, self.strict))
                    continue
                if unit is None:
                    excluded += 1
                else:
                    units[unit_id] = unit
        if excluded:
            log.info("CAMUS: %d view(s) left out by data.image_quality=%s", excluded, self.qualities)
        if unlabelled:
            log.info("CAMUS: %d testing/ patient(s) have no ground truth and are left out", len(unlabelled))
        usable = sorted({unit_id.rsplit("_", 1)[0] for unit_id in units})
        groups = self._official_split(root, usable)
        if groups is None:
            groups = split_ids(usable, self.seed, self.val_fraction, self.test_fraction)
        pairs = {
            split: [
                PairSpec(f"{pid}_{view}", (f"{pid}_{view}", "ed"), (f"{pid}_{view}", "es"))
                for pid in ids
                for view in self.views
                if f"{pid}_{view}" in units
            ]
            for split, ids in groups.items()
        }
        return Catalog(units, pairs, groups, bad)

    def _official_split(self, root: Path, patients: Sequence[str]) -> dict[str, list[str]] | None:
        """The official split restricted to ``patients``; None without ``database_split/``."""
        folder = next((f for f in (root / "database_split", root.parent / "database_split") if f.is_dir()), None)
        if folder is None or not all((folder / name).is_file() for name in _SPLIT_FILES.values()):
            return None
        groups, known = {}, set(patients)
        for split, name in _SPLIT_FILES.items():
            tokens = re.findall(r"\d+", (folder / name).read_text())
            ids = [f"patient{int(t):04d}" for t in tokens]
            groups[split] = sorted(i for i in ids if i in known)
        log.info("CAMUS: official split from %s", folder)
        return groups

    def _unit(self, folder: Path, view: str) -> Unit | None:
        """The files of one view, None when its image quality is filtered out."""
        name = folder.name
        ext = ".nii.gz" if (folder / f"{name}_{view}_ED.nii.gz").exists() else ".mhd"
        if (
            ext == ".mhd"
            and not (folder / f"{name}_{view}_ED.mhd").exists()
            and (folder / f"{name}_{view}_ED.nii").exists()
        ):
            ext = ".nii"
        if set(self.qualities) != set(QUALITIES):
            cfg_path = folder / f"Info_{view}.cfg"
            if not cfg_path.is_file():
                raise DataError(
                    cfg_path,
                    "is missing; it gives the ImageQuality that data.image_quality filters on.",
                    "Restore it from the CAMUS archive, or keep every quality (data.image_quality=[Good,Medium,Poor]).",
                )
            quality = read_cfg(cfg_path).get("ImageQuality", "").capitalize()
            if quality not in QUALITIES:
                raise DataError(cfg_path, f"has no valid 'ImageQuality:' line (found {quality!r}).", "Add one.")
            if quality not in self.qualities:
                return None
        files = {}
        for phase in ("ED", "ES"):
            image = folder / f"{name}_{view}_{phase}{ext}"
            if not image.is_file():
                raise DataError(
                    image, f"is missing: the {view} view has no {phase} frame.", "Restore it, or remove the patient."
                )
            files[phase.lower()] = str(image)
            if self.use_labels:
                label = folder / f"{name}_{view}_{phase}_gt{ext}"
                if not label.is_file():
                    raise DataError(
                        label,
                        f"is missing: no ground truth for the {view} {phase} frame.",
                        "Restore it, set data.use_labels=false to train on images alone, or remove the patient.",
                    )
                files[f"label_{phase.lower()}"] = str(label)
        return Unit(f"{name}_{view}", files)

    # ------------------------------------------------------------------ preprocessing
    def registration_grid(self) -> GridRecipe:
        """Stored (lateral, depth) → (depth, lateral), then the resize to ``image_size``."""
        return GridRecipe(transpose=(1, 0), size=self.image_size)

    def pipeline(self) -> Compose:
        images = ["ed", "es"]
        labels = ["label_ed", "label_es"] if self.use_labels else []
        keys = images + labels
        return Compose(
            [
                LoadFilesd(keys),
                EnsureChannelFirstd(keys),
                ToSpatialDimsd(keys, 2, fix="CAMUS ED/ES frames are single 2D images (not the _half_sequence files)."),
                CheckShapesd([("ed", "label_ed"), ("es", "label_es")]),
                CheckShapesd([("ed", "es")], fix="The ED and ES frames of a view must have one size: remove the view."),
                CheckValuesd(keys),
                RecordSpacingd("ed", axes=(1, 0)),
                Transposed(keys, indices=(0, 2, 1)),  # (W, H) as stored → (H: depth, W: lateral)
                intensity(images, "minmax"),
                SectorMaskd(images, "mask", self.sector_threshold, self.sector_closing),
                ResizeSpacingd(images, labels + ["mask"], self.image_size, spacing_key="ed"),
                Finalised(images, labels, ["mask"], apply_mask="mask"),
            ]
        )


def _has_ground_truth(folder: Path, view: str) -> bool:
    """Whether a patient folder holds any ``_gt`` label file of ``view``."""
    return any(folder.glob(f"{folder.name}_{view}_*_gt.*"))
