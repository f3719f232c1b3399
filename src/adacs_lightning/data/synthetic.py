"""The embedded default data set: synthetic cardiac-like ED→ES pairs, generated in memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .base import STAGE_SPLITS, PairDataModule, as_size
from .pairs import SPLITS
from .phantom import LABEL_NAMES, MYOCARDIUM, Nuisances, make_pair

INTENSITY_MODES = ("clamp", "minmax")


def _min_max(frame: torch.Tensor) -> torch.Tensor:
    """``frame`` scaled to span [0, 1] (a constant frame becomes 0)."""
    low, high = frame.min(), frame.max()
    return (frame - low) / (high - low) if high > low else torch.zeros_like(frame)


class SyntheticPairs(Dataset):
    """``count`` phantom pairs of one split, generated once, deterministically per ``(seed, split, index)``.

    Items are the batch dict of the design: ``source``, ``target`` ``(1, *spatial)`` float
    in [0, 1]; ``source_label``, ``target_label`` ``(1, *spatial)`` int64; ``mask``
    ``(1, *spatial)`` when the nuisances include a field of view; ``nocorr`` ``(1, *spatial)`` in {0, 1},
    the target voxels without a counterpart in the source (target-only nuisances); ``meta`` with
    ``case_id`` and ``spacing`` (1 mm isotropic). ``intensity``: ``clamp`` keeps the phantom's
    intensities (clamped to [0, 1]); ``minmax`` scales each frame to its own [min, max], as the
    reference code does.
    """

    def __init__(
        self,
        split: str,
        count: int,
        spatial_size: Sequence[int],
        nuisance: Nuisances,
        seed: int = 0,
        intensity: str = "clamp",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if count < 1:
            raise ValueError(f"a split needs at least one pair, got {count} for '{split}'")
        if intensity not in INTENSITY_MODES:
            raise ConfigError("intensity", f"must be one of {INTENSITY_MODES}, got {intensity!r}.", "E.g. clamp.")
        self.split = split
        self.shape = tuple(int(s) for s in spatial_size)
        self.intensity = intensity
        self.items = [self._generate(i, nuisance, seed) for i in range(count)]

    def _generate(self, index: int, nuisance: Nuisances, seed: int) -> dict:
        # A stable mix of (seed, split, index): Python's hash() of a str changes between processes.
        stream = (int(seed) * len(SPLITS) + SPLITS.index(self.split)) * 1_000_003 + index
        gen = torch.Generator().manual_seed(stream % (2**63))
        pair = make_pair(self.shape, nuisance, gen)
        source, target = (_min_max(f) if self.intensity == "minmax" else f for f in (pair.source, pair.target))
        item = {
            "source": source,
            "target": target,
            "source_label": pair.source_label,
            "target_label": pair.target_label,
            "meta": {
                "case_id": f"synthetic_{self.split}_{index:04d}",
                "spacing": torch.ones(len(self.shape)),
            },
        }
        if pair.mask is not None:
            item["mask"] = pair.mask
        if pair.nocorr is not None:
            item["nocorr"] = pair.nocorr
        return item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class SyntheticDataModule(PairDataModule):
    """Synthetic ED→ES pairs with echo-like nuisances (see :mod:`adacs_lightning.data.phantom`).

    Args:
        spatial_dims: 2 or 3.
        image_size: voxels per axis (an int for a square/cube, or one per axis); must
            divide by 16 for the default backbone.
        train_pairs, val_pairs, test_pairs: pairs per split.
        batch_size: pairs per micro-batch (per process under DDP).
        num_workers: data-loader workers (the pairs are held in memory: 0 is usually best).
        seed: the data seed; the same seed gives the same pairs on every machine.
        nuisance: nuisance strengths.
        intensity: ``clamp`` (the phantom's intensities) or ``minmax`` (each frame scaled to [0, 1]).
        eval_labels: labels whose mean Dice is the validation score (myocardium by default).
    """

    label_names = LABEL_NAMES

    def __init__(
        self,
        spatial_dims: int = 2,
        image_size: int | Sequence[int] = 128,
        train_pairs: int = 256,
        val_pairs: int = 32,
        test_pairs: int = 32,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        nuisance: Nuisances | None = None,
        intensity: str = "clamp",
        eval_labels: Sequence[int] = (MYOCARDIUM,),
    ) -> None:
        super().__init__(spatial_dims, batch_size, num_workers, seed, eval_labels)
        self.spatial_size = as_size(image_size, spatial_dims, "image_size")
        self.counts = {"train": train_pairs, "val": val_pairs, "test": test_pairs}
        self.nuisance = nuisance or Nuisances()
        if intensity not in INTENSITY_MODES:
            raise ConfigError("intensity", f"must be one of {INTENSITY_MODES}, got {intensity!r}.", "E.g. clamp.")
        self.intensity = intensity

    def setup(self, stage: str | None = None) -> None:
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if split not in self.datasets:
                self.datasets[split] = SyntheticPairs(
                    split, self.counts[split], self.spatial_size, self.nuisance, self.seed, self.intensity
                )
