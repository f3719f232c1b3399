"""Your own pairs: NIfTI, MHA/MHD or NRRD files, 2D or 3D, listed in a CSV.

The CSV has a header ``source,target`` plus any of ``source_label``, ``target_label``, ``mask``,
``target_nocorr`` (a mask of the target voxels without a counterpart in the source: a lesion, a
resection, an artefact; evaluation measures whether the score map falls there; an empty cell or an
empty mask means none),
``split`` (train/val/test), ``case`` (an id for messages) and ``subject`` (rows of one subject
stay in one split). Paths are relative to the CSV's folder (or absolute). Without a ``split``
column, subjects (or rows) are split at random with the data seed.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.transforms import Compose, EnsureChannelFirstd, Orientationd, ResizeWithPadOrCropd, Spacingd

from ..errors import ConfigError
from .bad_cases import BadCase, DataError, skip_or_raise
from .base import FileDataModule, as_spacing
from .io import LoadFilesd
from .pairs import SPLITS, Catalog, PairSpec, Unit, split_ids
from .recipe import GridRecipe
from .transforms import (
    CheckShapesd,
    CheckValuesd,
    Finalised,
    RecordSpacingd,
    ResizeSpacingd,
    ToSpatialDimsd,
    intensity,
)

REQUIRED = ("source", "target")
OPTIONAL = ("source_label", "target_label", "mask", "target_nocorr", "split", "case", "subject")
# CSV column → key in the cache (MONAI treats keys starting with "<image key>_" as meta dicts)
_KEYS = {
    "source": "source",
    "target": "target",
    "source_label": "label_source",
    "target_label": "label_target",
    "target_nocorr": "nocorr",
}
_SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


class FolderDataModule(FileDataModule):
    """Pairs listed in a CSV, ``(1, *image_size)`` per image, in 2D or 3D.

    Each row is loaded once: reoriented to ``orientation`` (3D), optionally resampled to
    ``spacing`` mm, scaled to [0, 1], then padded/cropped (or, with ``resize``, resized) to
    ``image_size``. Source and target must end up the same size.

    Args:
        csv: the CSV file listing the pairs.
        spatial_dims: 2 or 3: every file must have that many axes (trailing axes of size 1 are dropped).
        image_size: pad/crop (or resize) every image to this size; null keeps the files' size.
        resize: false pads/crops around the centre; true resizes (the spacing in ``meta`` follows).
        spacing: resample to this spacing (mm, one value or one per axis); null keeps it.
        orientation: axis codes for 3D images (e.g. RAS); null keeps the stored order. Unused in 2D.
        intensity: ``minmax`` or ``percentile``.
        val_fraction, test_fraction: fractions held out when the CSV has no ``split`` column.
        eval_labels: label values whose mean Dice is ``val/dice``; null: every non-zero label found.
        Others: see :class:`~adacs_lightning.data.base.FileDataModule`.
    """

    dataset_name = "folder"
    location_setting = "data.csv"

    def __init__(
        self,
        csv: str,
        spatial_dims: int = 2,
        image_size: int | Sequence[int] | None = None,
        resize: bool = False,
        spacing: float | Sequence[float] | None = None,
        orientation: str | None = "RAS",
        intensity: str = "minmax",
        **loading: Any,
    ) -> None:
        super().__init__(spatial_dims, image_size=image_size, intensity=intensity, **loading)
        self.csv = csv
        self.resize = bool(resize)
        if resize and self.image_size is None:
            raise ConfigError("resize", "is true but data.image_size is not set.", "Set data.image_size, e.g. 128.")
        self.spacing = as_spacing(spacing, self.spatial_dims)
        self.orientation = orientation
        self.columns: list[str] = []

    # ------------------------------------------------------------------ discovery
    def discover(self) -> Catalog:
        path = Path(str(self.csv)).expanduser() if self.csv is not None else None
        if path is None or not path.is_file():
            raise ConfigError(
                "data.csv", f"no CSV file at '{self.csv}'.", "Point data.csv at the CSV that lists your pairs."
            )
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
        missing = [c for c in REQUIRED if c not in columns]
        unknown = [c for c in columns if c not in REQUIRED + OPTIONAL]
        if missing or unknown:
            raise ConfigError(
                "data.csv",
                f"'{path}' has columns {columns}: " + (f"missing {missing}" if missing else f"unknown {unknown}") + ".",
                f"The header is source,target plus any of {', '.join(OPTIONAL)}.",
            )
        if not rows:
            raise ConfigError("data.csv", f"'{path}' lists no pairs.", "Add one row per pair under the header.")
        self.columns = columns
        units: dict[str, Unit] = {}
        bad: list[BadCase] = []
        row_split, groups_of = {}, {}
        for number, row in enumerate(rows, start=2):  # line numbers, the header being line 1
            case = row.get("case") or f"row{number - 1:04d}"
            if case in units or case in row_split:
                raise ConfigError("data.csv", f"line {number} of '{path}' repeats case '{case}'.", "Give unique cases.")
            if "split" in columns:
                split = _SPLIT_NAMES.get(row["split"].lower())
                if split is None:
                    raise ConfigError(
                        "data.csv",
                        f"line {number} of '{path}' has split '{row['split']}'.",
                        "Use train, val or test (or leave the split column out for a random split).",
                    )
                row_split[case] = split
            groups_of[case] = row.get("subject") or case
            try:
                units[case] = self._unit(path, number, case, row)
            except DataError as error:
                bad.append(skip_or_raise(case, error, self.strict))
        if "split" in columns:
            assignment = row_split
        else:
            groups = split_ids(
                sorted(set(groups_of.values())), self.seed, self.val_fraction, self.test_fraction, "data.csv"
            )
            assignment = {case: s for s, ids in groups.items() for case, g in groups_of.items() if g in ids}
        groups = {s: sorted(c for c, a in assignment.items() if a == s) for s in SPLITS}
        pairs = {s: [PairSpec(c, (c, "source"), (c, "target")) for c in ids if c in units] for s, ids in groups.items()}
        return Catalog(units, pairs, groups, bad)

    def _unit(self, csv_path: Path, number: int, case: str, row: dict[str, str]) -> Unit:
        files = {}
        for column in REQUIRED + ("source_label", "target_label", "mask", "target_nocorr"):
            if column not in self.columns:
                continue
            if not row.get(column) and column == "target_nocorr":
                continue  # no lesion marked for this pair: an empty mask
            if not row.get(column):
                raise DataError(
                    csv_path,
                    f"line {number} ({case}) has no {column}.",
                    f"Fill in the {column} column for every row, or drop the column.",
                )
            file = Path(row[column]).expanduser()
            file = file if file.is_absolute() else csv_path.parent / file
            if not file.is_file():
                raise DataError(
                    file,
                    f"is missing (the {column} of line {number} of {csv_path.name}).",
                    "Fix the path (relative paths start at the CSV's folder), or remove the row.",
                )
            files[_KEYS.get(column, column)] = str(file)
        return Unit(case, files)

    @property
    def marks_nocorr(self) -> bool:
        return "target_nocorr" in self.columns

    # ------------------------------------------------------------------ preprocessing
    def registration_grid(self) -> GridRecipe:
        """Reorientation (3D), resampling and, with ``resize``, the size: what registration repeats."""
        return GridRecipe(
            orientation=self.orientation if self.spatial_dims == 3 else None,
            spacing=tuple(self.spacing) if self.spacing else None,
            size=self.image_size if self.resize else None,
        )

    def pipeline(self) -> Compose:
        images = ["source", "target"]
        labels = [k for k in ("label_source", "label_target") if k.replace("label_", "") + "_label" in self.columns]
        masks = ["mask"] if "mask" in self.columns else []
        masks += ["nocorr"] if "target_nocorr" in self.columns else []
        keys = images + labels + masks
        steps = [
            LoadFilesd(keys),
            EnsureChannelFirstd(keys, allow_missing_keys=True),
            ToSpatialDimsd(keys, self.spatial_dims),
            CheckShapesd(
                [("source", "label_source"), ("target", "label_target"), ("target", "mask"), ("target", "nocorr")]
            ),
            CheckValuesd(keys),
        ]
        if self.orientation and self.spatial_dims == 3:
            steps.append(Orientationd(keys, axcodes=self.orientation, labels=None, allow_missing_keys=True))
        if self.spacing:
            modes = ["bilinear"] * 2 + ["nearest"] * (len(keys) - 2)
            steps.append(Spacingd(keys, pixdim=self.spacing, mode=modes, allow_missing_keys=True))
        steps += [RecordSpacingd("target"), intensity(images, self.intensity)]
        if self.image_size and self.resize:
            steps.append(ResizeSpacingd(images, labels + masks, self.image_size, spacing_key="target"))
        elif self.image_size:
            steps.append(ResizeWithPadOrCropd(keys, spatial_size=self.image_size, allow_missing_keys=True))
        steps += [
            CheckShapesd(
                [("target", "source")],
                fix="Source and target must have one size: set data.image_size (and data.spacing) to bring them "
                "to one grid.",
            ),
            Finalised(images, labels, masks),
        ]
        return Compose(steps)
