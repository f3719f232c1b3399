"""Datamodule logic shared by every data set: loaders, splits, and (for files on disk) caching and reports."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from monai.transforms import Compose
from monai.utils import ensure_tuple_rep
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..choices import INTENSITY_MODES
from ..errors import ConfigError
from .bad_cases import BadCase, describe, write_report
from .pairs import SPLITS, CachedPairs, Catalog, PairSpec

log = logging.getLogger("adacs_lightning")
#: The splits a Lightning stage needs.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}


class PairDataModule(L.LightningDataModule):
    """Loaders of batch dicts for the three splits, the same under one process and under DDP.

    Subclasses fill ``self.datasets[split]`` in ``setup``. Attributes read by :class:`~adacs_lightning.AdaCS`
    and the CLI: ``spatial_dims``, ``eval_labels`` (label values whose mean Dice is ``val/dice``)
    and ``label_names`` (value → name).
    """

    label_names: dict[int, str] = {}

    def __init__(
        self,
        spatial_dims: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        eval_labels: Sequence[int] | None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError("spatial_dims", f"must be 2 or 3, got {spatial_dims}.", "Use 2 or 3.")
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be at least 1, got {batch_size}.", "Use 1 or more.")
        self.spatial_dims = int(spatial_dims)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.eval_labels = [int(v) for v in eval_labels] if eval_labels is not None else None
        self.datasets: dict[str, Dataset] = {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup(None)
        dataset = self.datasets[split]
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # A seeded, epoch-aware sampler (Lightning calls set_epoch) makes the order of
        # pairs a function of (seed, epoch, rank), so a resumed run sees the same batches.
        sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=shuffle, seed=self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def validation_has_labels(self) -> bool:
        """Whether the validation pairs carry label maps (``val/dice`` exists only then); sets the data up."""
        if "val" not in self.datasets:
            self.setup("fit")
        dataset = self.datasets.get("val")
        return dataset is not None and len(dataset) > 0 and "target_label" in dataset[0]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def as_size(value: int | Sequence[int] | None, ndim: int, setting: str = "data.image_size") -> tuple[int, ...] | None:
    """``image_size`` as one int per axis (an int stands for all ``ndim`` axes); None stays None."""
    if value is None:
        return None
    try:
        size = tuple(int(v) for v in ensure_tuple_rep(value, ndim))
    except ValueError:
        size = ()
    if len(size) != ndim or min(size) < 4:
        raise ConfigError(setting, f"needs {ndim} sizes of at least 4 voxels, got {value}.", f"E.g. {setting}=128.")
    return size


def as_spacing(value: float | Sequence[float] | None, ndim: int, setting: str = "data.spacing") -> list[float] | None:
    """A spacing in mm as one float per axis (a number stands for all ``ndim`` axes); None stays None."""
    if value is None:
        return None
    try:
        spacing = [float(v) for v in ensure_tuple_rep(value, ndim)]
    except ValueError:
        spacing = []
    if len(spacing) != ndim or min(spacing) <= 0:
        raise ConfigError(setting, f"needs {ndim} positive spacings in mm, got {value}.", f"E.g. {setting}=1.5.")
    return spacing


class FileDataModule(PairDataModule):
    """A data set read from disk: discovery, patient-level splits, a cache, and the reports of a run.

    Subclasses implement :meth:`discover` (a :class:`Catalog` of units and pairs per split, found
    without reading any image) and :meth:`pipeline` (the deterministic MONAI transforms of a unit),
    and take the settings below as keyword arguments passed on unchanged.
    ``setup`` preprocesses the units of the needed splits once (``CacheDataset``), skips unusable
    cases with a warning (or raises when ``strict``), and writes ``splits.json`` and
    ``skipped_cases.json`` to ``output_dir``.

    Args:
        spatial_dims: 2 or 3.
        batch_size: pairs per micro-batch (per process under DDP).
        num_workers: data-loader workers (pairs are cached in memory: 0 is usually best).
        seed: seed of the split and of the data order.
        eval_labels: label values whose mean Dice is ``val/dice``; None: every non-zero label found.
        val_fraction, test_fraction: fractions held out when the data set has no official split.
        train_pairs, val_pairs, test_pairs: keep at most this many pairs per split (None: all).
        strict: stop at the first unusable case instead of skipping it.
        output_dir: the run folder for ``splits.json`` / ``skipped_cases.json`` (None: not written).
        cache_workers: threads that read and preprocess the files.
        image_size: the size every image is brought to (voxels, one per axis or an int for all);
            None keeps the files' size where the data set allows it.
        intensity: scaling of each image to [0, 1]: ``minmax`` or ``percentile`` (1st–99th, clipped).
    """

    dataset_name = "files"
    #: The setting that says where the data is: named when none of it can be used.
    location_setting = "data.root"
    #: ``(dims, what the data is, fix)`` for a data set read in one dimensionality only; None: 2 or 3.
    only_dims: tuple[int, str, str] | None = None

    def __init__(
        self,
        spatial_dims: int = 2,
        *,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        eval_labels: Sequence[int] | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        train_pairs: int | None = None,
        val_pairs: int | None = None,
        test_pairs: int | None = None,
        strict: bool = False,
        output_dir: str | None = None,
        cache_workers: int = 1,
        image_size: int | Sequence[int] | None = None,
        intensity: str = "minmax",
    ) -> None:
        super().__init__(spatial_dims, batch_size, num_workers, seed, eval_labels)
        self.max_pairs = {"train": train_pairs, "val": val_pairs, "test": test_pairs}
        for split, count in self.max_pairs.items():
            if count is not None and count < 1:
                raise ConfigError(f"{split}_pairs", f"must be at least 1 (or null for all), got {count}.")
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.strict = bool(strict)
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.cache_workers = int(cache_workers)
        self.catalog: Catalog | None = None
        self.bad_cases: list[BadCase] = []
        if self.only_dims is not None and spatial_dims != self.only_dims[0]:
            _, what, fix = self.only_dims
            raise ConfigError("spatial_dims", f"{what}; got {spatial_dims}.", fix)
        if intensity not in INTENSITY_MODES:
            raise ConfigError("intensity", f"must be one of {INTENSITY_MODES}, got {intensity!r}.")
        self.image_size = as_size(image_size, self.spatial_dims)
        self.intensity = intensity

    # ------------------------------------------------------------------ to implement
    def discover(self) -> Catalog:
        """Find units and pairs on disk (no image is read); unusable cases go to ``Catalog.bad``."""
        raise NotImplementedError

    def pipeline(self) -> Compose:
        """Deterministic transforms from a unit's file dict to the tensors held in the cache."""
        raise NotImplementedError

    def keep_slice(self, source: dict, target: dict, pair: PairSpec, index: int) -> bool:
        """Whether slice ``index`` of a slice pair becomes a pair (all slices by default)."""
        return True

    # ------------------------------------------------------------------ shared
    def _writes(self) -> bool:
        trainer = self.trainer
        return self.output_dir is not None and (trainer is None or trainer.is_global_zero)

    def setup(self, stage: str | None = None) -> None:
        if self.catalog is None:
            self.catalog = self.discover()
            self.bad_cases = list(self.catalog.bad)
            if self._writes():
                self._write_splits()
        pipeline = self.pipeline()
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if split in self.datasets:
                continue
            pairs = self.catalog.pairs.get(split, [])
            if not pairs:
                if self._writes():
                    write_report(self.output_dir, "skipped_cases.json", self.bad_cases)
                skipped = f" Skipped: {describe(self.bad_cases, self._report_path())}." if self.bad_cases else ""
                raise ConfigError(
                    self.location_setting,
                    f"the {self.dataset_name} data set has no usable pair in the '{split}' split.{skipped}",
                    "Check the layout and the skipped cases.",
                )
            dataset = CachedPairs(
                list(self.catalog.units.values()),
                pairs,
                pipeline,
                strict=self.strict,
                keep_slice=self.keep_slice,
                max_pairs=self.max_pairs[split],
                cache_workers=self.cache_workers,
                regions=self.marks_nocorr,
            )
            self.bad_cases += dataset.bad
            if len(dataset) == 0:
                if self._writes():
                    write_report(self.output_dir, "skipped_cases.json", self.bad_cases)
                raise ConfigError(
                    self.location_setting,
                    f"no pair of the '{split}' split could be loaded ({len(dataset.bad)} case(s) skipped: "
                    f"{describe(dataset.bad, self._report_path())}).",
                    "Fix or remove those files, then run again.",
                )
            self._check_one_shape(split, dataset)
            self.datasets[split] = dataset
            log.info("%s %s: %d pairs", self.dataset_name, split, len(dataset))
        if self.eval_labels is None:
            found = sorted({v for d in self.datasets.values() for v in d.label_values()})
            self.eval_labels = found or None
        if self._writes():
            write_report(self.output_dir, "skipped_cases.json", self.bad_cases)

    @property
    def marks_nocorr(self) -> bool:
        """Whether the data set marks its targets' voxels without correspondence (``nocorr``)."""
        return False

    def _report_path(self) -> Path | None:
        return self.output_dir / "skipped_cases.json" if self._writes() else None

    def _check_one_shape(self, split: str, dataset: CachedPairs) -> None:
        shapes = dataset.shapes()
        if len(shapes) > 1:
            listed = "; ".join(f"{shape} ({case})" for shape, case in list(shapes.items())[:4])
            raise ConfigError(
                "data.image_size",
                f"the '{split}' images come in several sizes after preprocessing: {listed}.",
                "Set data.image_size to one size (e.g. data.image_size=128) so that they can be batched.",
            )

    def _write_splits(self) -> None:
        assert self.catalog is not None and self.output_dir is not None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        content = {
            "dataset": self.dataset_name,
            "seed": self.seed,
            **{split: self.catalog.groups.get(split, []) for split in SPLITS},
            "pairs": {split: len(self.catalog.pairs.get(split, [])) for split in SPLITS},
        }
        (self.output_dir / "splits.json").write_text(json.dumps(content, indent=2))


class ReleasedDataModule(FileDataModule):
    """A published data set unpacked under one folder (``root``), whose label maps may be left out.

    Args:
        root: the data set's folder; checked (with :attr:`root_holds` in the message) when the
            data is first discovered (:meth:`root_folder`).
        use_labels: load the label maps (a case without them is skipped); false trains on images
            alone (no Dice).
        Others: see :class:`FileDataModule`.
    """

    #: What ``root`` must point at, for messages.
    root_holds = "the data set"

    def __init__(self, root: str | None, spatial_dims: int = 2, *, use_labels: bool = True, **loading: Any) -> None:
        super().__init__(spatial_dims, **loading)
        self.root = root
        self.use_labels = bool(use_labels)

    def root_folder(self) -> Path:
        """``root`` as a folder that exists, or a :class:`ConfigError` naming ``data.root``."""
        return require_folder(self.root, what=self.root_holds)


def require_folder(root: str | Path | None, setting: str = "data.root", what: str = "the data set") -> Path:
    """``root`` as a Path, or a :class:`ConfigError` when it is unset, missing or not a folder."""
    if root is None or str(root) in ("", "???"):
        raise ConfigError(setting, "is not set.", f"Point {setting} at {what} on this machine, e.g. {setting}=/data/x.")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise ConfigError(setting, f"'{path}' does not exist or is not a folder.", f"Point {setting} at {what}.")
    return path
