"""OASIS brain MRI in the Learn2Reg layout: inter-subject 3D pairs (moving → fixed) with label maps.

Layout::

    <root>/imagesTr/OASIS_0001_0000.nii.gz     affinely aligned T1 volume
    <root>/labelsTr/OASIS_0001_0000.nii.gz     anatomical label map (Dice)
    <root>/masksTr/OASIS_0001_0000.nii.gz      brain mask (optional: the field of view)
    <root>/OASIS_dataset.json                  optional: "registration_val" (and "training_paired_images")
                                               as lists of {"fixed": ..., "moving": ...}

With the JSON, its validation pairs are the ``val`` split and its training pairs (when listed)
the ``train`` split; otherwise subjects are split at random (seeded) and paired consecutively.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.transforms import Compose, EnsureChannelFirstd, Orientationd, ResizeWithPadOrCropd, Spacingd

from ..errors import ConfigError
from .bad_cases import BadCase, DataError, skip_or_raise
from .base import ReleasedDataModule, as_spacing
from .io import LoadFilesd
from .pairs import Catalog, PairSpec, Unit, split_ids
from .recipe import GridRecipe
from .transforms import (
    CheckShapesd,
    CheckValuesd,
    Finalised,
    RecordSpacingd,
    ToSpatialDimsd,
    intensity,
)

_SUBJECT = re.compile(r"(OASIS_\d+)")


def consecutive_pairs(subjects: Sequence[str]) -> list[tuple[str, str]]:
    """``(fixed, moving)`` = ``(s_i, s_i+1)`` over the sorted subjects."""
    ordered = sorted(subjects)
    return list(zip(ordered[:-1], ordered[1:]))


class OASISDataModule(ReleasedDataModule):
    """OASIS inter-subject pairs: ``source`` the moving subject, ``target`` the fixed one, ``(1, X, Y, Z)``.

    Each subject is loaded once (then shared by all its pairs), reoriented to ``orientation``,
    optionally resampled to ``spacing`` mm, scaled to [0, 1] and padded/cropped to ``image_size``.

    Args:
        root: the Learn2Reg OASIS folder (holding ``imagesTr/``, ``labelsTr/``).
        spatial_dims: 3.
        image_size: pad/crop every volume to this size (voxels); null keeps it (Learn2Reg: 160×192×224).
        spacing: resample to this spacing (mm, one value or three); null keeps it (1 mm).
        orientation: axis codes to reorient to (e.g. RAS); null keeps the stored order.
        intensity: ``minmax`` or ``percentile``.
        use_labels: load ``labelsTr`` (needed for Dice); use_masks: use ``masksTr`` as the field of view.
        val_fraction, test_fraction: subject fractions held out (val only without the JSON).
        eval_labels: labels whose mean Dice is ``val/dice``; null: every label found.
        Others: see :class:`~adacs_lightning.data.base.FileDataModule`.
    """

    dataset_name = "oasis"
    only_dims = (3, "OASIS volumes are 3D", "Use 3 (and a 3D backbone).")
    root_holds = "the Learn2Reg OASIS folder (holding imagesTr/)"

    def __init__(
        self,
        root: str,
        spatial_dims: int = 3,
        image_size: int | Sequence[int] | None = None,
        spacing: float | Sequence[float] | None = None,
        orientation: str | None = "RAS",
        intensity: str = "minmax",
        use_labels: bool = True,
        use_masks: bool = True,
        **loading: Any,
    ) -> None:
        loading = {"batch_size": 1, **loading}
        super().__init__(
            root, spatial_dims, use_labels=use_labels, image_size=image_size, intensity=intensity, **loading
        )
        self.spacing = as_spacing(spacing, 3)
        self.orientation = orientation
        self.use_masks = bool(use_masks)

    # ------------------------------------------------------------------ discovery
    def discover(self) -> Catalog:
        root = self.root_folder()
        images = sorted((root / "imagesTr").glob("OASIS_*.nii*")) if (root / "imagesTr").is_dir() else []
        if not images:
            raise ConfigError(
                "data.root",
                f"'{root / 'imagesTr'}' is missing or holds no OASIS_NNNN_0000.nii.gz volumes.",
                "Point data.root at the Learn2Reg OASIS folder that holds imagesTr/ and labelsTr/.",
            )
        units: dict[str, Unit] = {}
        bad: list[BadCase] = []
        for image in images:
            subject = _SUBJECT.search(image.name).group(1)
            try:
                units[subject] = self._unit(root, subject, image)
            except DataError as error:
                bad.append(skip_or_raise(subject, error, self.strict))
        subjects = sorted(_SUBJECT.search(p.name).group(1) for p in images)
        listed = self._json_pairs(root)
        if listed is not None and listed["val"]:
            val_subjects = {s for pair in listed["val"] for s in pair}
            rest = [s for s in subjects if s not in val_subjects]
            groups = split_ids(rest, self.seed, 0.0, self.test_fraction, minimum=2)
            groups["val"] = sorted(val_subjects)
            train = [p for p in listed["train"] if set(p) <= set(groups["train"])] or consecutive_pairs(groups["train"])
            pairs = {"train": train, "val": listed["val"], "test": consecutive_pairs(groups["test"])}
        else:
            groups = split_ids(subjects, self.seed, self.val_fraction, self.test_fraction, minimum=2)
            pairs = {split: consecutive_pairs(ids) for split, ids in groups.items()}
        specs = {
            split: [
                PairSpec(f"{moving}_to_{fixed}", (moving, "image"), (fixed, "image"))
                for fixed, moving in found
                if fixed in units and moving in units
            ]
            for split, found in pairs.items()
        }
        return Catalog(units, specs, groups, bad)

    def _unit(self, root: Path, subject: str, image: Path) -> Unit:
        files = {"image": str(image)}
        if self.use_labels:
            label = root / "labelsTr" / image.name
            if not label.is_file():
                raise DataError(
                    label,
                    f"is missing: {subject} has no label map.",
                    "Restore it, set data.use_labels=false to train without Dice, or remove the subject.",
                )
            files["label_image"] = str(label)
        if self.use_masks and (root / "masksTr").is_dir():
            mask = root / "masksTr" / image.name
            if not mask.is_file():
                raise DataError(mask, f"is missing: {subject} has no mask.", "Restore it, or set data.use_masks=false.")
            files["mask_image"] = str(mask)
        return Unit(subject, files)

    def _json_pairs(self, root: Path) -> dict[str, list[tuple[str, str]]] | None:
        path = root / "OASIS_dataset.json"
        if not path.is_file():
            return None
        try:
            content = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(
                "data.root", f"'{path}' is not valid JSON ({error}).", "Restore it or remove it."
            ) from error
        found = {}
        for split, key in (("train", "training_paired_images"), ("val", "registration_val")):
            found[split] = []
            for entry in content.get(key) or []:
                if isinstance(entry, dict) and "fixed" in entry and "moving" in entry:
                    fixed, moving = (_SUBJECT.search(str(entry[k])) for k in ("fixed", "moving"))
                    if fixed and moving:
                        found[split].append((fixed.group(1), moving.group(1)))
        return found

    # ------------------------------------------------------------------ preprocessing
    def registration_grid(self) -> GridRecipe:
        """Reorientation and resampling (padding to ``image_size`` only frames the volume)."""
        return GridRecipe(orientation=self.orientation, spacing=tuple(self.spacing) if self.spacing else None)

    def pipeline(self) -> Compose:
        labels = ["label_image"] if self.use_labels else []
        masks = ["mask_image"] if self.use_masks else []
        keys = ["image"] + labels + masks
        steps = [
            LoadFilesd(keys),
            EnsureChannelFirstd(keys, allow_missing_keys=True),
            ToSpatialDimsd(keys, 3, fix="OASIS volumes are 3D: give the imagesTr/labelsTr volumes."),
            CheckShapesd([("image", "label_image"), ("image", "mask_image")]),
            CheckValuesd(keys),
        ]
        if self.orientation:
            steps.append(Orientationd(keys, axcodes=self.orientation, labels=None, allow_missing_keys=True))
        if self.spacing:
            modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
            steps.append(Spacingd(keys, pixdim=self.spacing, mode=modes, allow_missing_keys=True))
        steps += [RecordSpacingd("image"), intensity(["image"], self.intensity)]
        if self.image_size:
            steps.append(ResizeWithPadOrCropd(keys, spatial_size=self.image_size, allow_missing_keys=True))
        steps.append(Finalised(["image"], labels, masks))
        return Compose(steps)
