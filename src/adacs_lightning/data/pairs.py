"""Cases on disk, patient-level splits, and the cached data set of registration pairs.

A *unit* is the set of files preprocessed together (an ACDC patient's ED and ES frames with
their labels, a CAMUS view, an OASIS subject, a CSV row). A *pair* names a source and a
target image, each as ``(unit id, key)``; ACDC pairs expand into one pair per short-axis slice.
Units are loaded and preprocessed once, by MONAI's ``CacheDataset``: later epochs read no file.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from monai.data import CacheDataset
from monai.transforms import Compose
from torch.utils.data import Dataset

from ..errors import ConfigError
from .bad_cases import BadCase, skip_or_raise
from .checks import Guard

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Unit:
    """Files preprocessed together: ``files`` maps a key to a path.

    An image ``key`` (``ed``, ``image``, ``source``, ...) has its label map under ``label_<key>`` and
    its field-of-view mask under ``mask_<key>``; ``mask`` is a mask for the whole unit. (MONAI's
    spatial transforms treat keys starting with ``<key>_`` as meta dicts, hence the prefixes.)
    """

    id: str
    files: dict[str, str]


@dataclass(frozen=True)
class PairSpec:
    """Source and target as ``(unit id, image key)``; ``slices``: one pair per index of the last axis."""

    case_id: str
    source: tuple[str, str]
    target: tuple[str, str]
    slices: bool = False


@dataclass
class Catalog:
    """What discovery found: the units, the pairs of each split, the patients/subjects of each split
    (written to ``splits.json``) and the cases already known to be unusable."""

    units: dict[str, Unit]
    pairs: dict[str, list[PairSpec]]
    groups: dict[str, list[str]]
    bad: list[BadCase] = field(default_factory=list)


def split_ids(
    ids: Sequence[str],
    seed: int,
    val_fraction: float,
    test_fraction: float,
    setting: str = "data.root",
    minimum: int = 1,
) -> dict[str, list[str]]:
    """A deterministic split of patient/subject ``ids`` into train/val/test (sorted lists).

    The sorted ids are shuffled with ``seed``; ``val`` and ``test`` take ``round(n * fraction)``
    ids each (at least ``minimum`` when the fraction is positive), ``train`` the rest (at least ``minimum``).
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{name}", f"must lie in [0, 1), got {value}.", "For example 0.1.")
    order = sorted(set(ids))
    random.Random(int(seed)).shuffle(order)
    n = len(order)
    n_val = max(minimum, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(minimum, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < minimum:
        raise ConfigError(
            setting,
            f"holds {n} usable case(s): too few for a training split plus {n_val} validation "
            f"and {n_test} test case(s).",
            "Add cases, or lower data.val_fraction / data.test_fraction.",
        )
    return {
        "train": sorted(order[n_val + n_test :]),
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
    }


class CachedPairs(Dataset):
    """Registration pairs of one split, preprocessed once and held in memory.

    Items follow the batch dict of the design: ``source``, ``target`` ``(1, *spatial)`` float32
    in [0, 1]; ``source_label``, ``target_label`` ``(1, *spatial)`` int64 when the data set has
    labels; ``mask`` ``(1, *spatial)`` float32 in {0, 1} when it has a field of view; ``nocorr`` the same,
    where the target has no counterpart in the source, when the data set marks it; ``meta``
    with ``case_id`` and ``spacing`` (``(spatial_dims,)`` float32, mm per voxel of the target).

    Args:
        units: the units the pairs refer to.
        pairs: the pairs, in a deterministic order.
        pipeline: deterministic MONAI transforms from a unit's file dict to its cached tensors.
        strict: raise on the first unusable unit instead of skipping it with a warning.
        keep_slice: for slice pairs, ``keep_slice(source_unit, target_unit, pair, index)`` says whether
            a slice becomes a pair (e.g. only labelled slices).
        max_pairs: keep at most this many pairs (the first ones); None keeps all.
        cache_workers: threads preprocessing the units.
        regions: the data set marks no-correspondence voxels (``nocorr``): a target without its mask gets an empty one.
    """

    def __init__(
        self,
        units: Sequence[Unit],
        pairs: Sequence[PairSpec],
        pipeline: Compose,
        *,
        strict: bool = False,
        keep_slice: Callable[[dict, dict, PairSpec, int], bool] | None = None,
        max_pairs: int | None = None,
        cache_workers: int = 1,
        regions: bool = False,
    ) -> None:
        pairs = list(pairs)[:max_pairs] if max_pairs is not None else list(pairs)
        used = {uid for p in pairs for uid in (p.source[0], p.target[0])}
        units = [u for u in units if u.id in used]
        self.unit_index = {u.id: i for i, u in enumerate(units)}
        # When the data set marks voxels without correspondence, targets without a mask get an empty one.
        self.regions = regions or any("nocorr" in u.files for u in units)
        records = [{**u.files, "_unit": u.id} for u in units]
        self.cache = CacheDataset(
            records,
            Compose([Guard(pipeline)]),
            cache_rate=1.0,
            num_workers=max(1, int(cache_workers)),
            copy_cache=False,
            progress=sys.stderr.isatty(),  # MONAI's bar: reading and preprocessing every case once
        )
        self.bad: list[BadCase] = []
        broken = set()
        for unit in units:
            cached = self.cache[self.unit_index[unit.id]]
            if "_error" in cached:
                self.bad.append(skip_or_raise(unit.id, cached["_error"], strict))
                broken.add(unit.id)
        self.items: list[tuple[PairSpec, int | None]] = []
        for pair in pairs:
            if pair.source[0] in broken or pair.target[0] in broken:
                continue
            if not pair.slices:
                self.items.append((pair, None))
                continue
            source, target = self._unit(pair.source[0]), self._unit(pair.target[0])
            for index in range(source[pair.source[1]].shape[-1]):
                if keep_slice is None or keep_slice(source, target, pair, index):
                    self.items.append((pair, index))
        if max_pairs is not None:
            self.items = self.items[:max_pairs]

    def _unit(self, unit_id: str) -> dict:
        return self.cache[self.unit_index[unit_id]]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        pair, slice_index = self.items[index]
        (su, skey), (tu, tkey) = pair.source, pair.target
        source_unit, target_unit = self._unit(su), self._unit(tu)

        def take(tensor: torch.Tensor) -> torch.Tensor:
            return tensor if slice_index is None else tensor[..., slice_index]

        item: dict = {"source": take(source_unit[skey]).float(), "target": take(target_unit[tkey]).float()}
        if f"label_{skey}" in source_unit and f"label_{tkey}" in target_unit:
            item["source_label"] = take(source_unit[f"label_{skey}"]).long()
            item["target_label"] = take(target_unit[f"label_{tkey}"]).long()
        masks = [m for m in (source_unit.get(f"mask_{skey}"), target_unit.get(f"mask_{tkey}")) if m is not None]
        if "mask" in target_unit:
            masks = [target_unit["mask"]]
        if masks:
            mask = masks[0] if len(masks) == 1 else masks[0] * masks[1]
            item["mask"] = take(mask).float()
        if "nocorr" in target_unit:  # the target's voxels without a counterpart in the source
            item["nocorr"] = take(target_unit["nocorr"]).float()
        elif self.regions:
            item["nocorr"] = torch.zeros_like(item["target"])
        spacing = target_unit["spacing"]
        case_id = pair.case_id if slice_index is None else f"{pair.case_id}_slice{slice_index:02d}"
        ndim = item["target"].ndim - 1
        item["meta"] = {"case_id": case_id, "spacing": spacing[:ndim].clone()}
        if "direction" in target_unit:  # (3, ndim) RAS unit vector of each array axis, for figures
            item["meta"]["direction"] = target_unit["direction"][:, :ndim].clone()
        return item

    def shapes(self) -> dict[tuple[int, ...], str]:
        """Each distinct image shape ``(*spatial)`` among the items, with a case that has it."""
        found: dict[tuple[int, ...], str] = {}
        for pair, slice_index in self.items:
            for uid, key in (pair.source, pair.target):
                tensor = self._unit(uid)[key]
                shape = tuple(tensor.shape[1:-1] if slice_index is not None else tensor.shape[1:])
                found.setdefault(shape, pair.case_id)
        return found

    def label_values(self) -> list[int]:
        """The non-zero label values found in the label maps of the items' units."""
        values: set[int] = set()
        for uid in {u for pair, _ in self.items for u in (pair.source[0], pair.target[0])}:
            unit = self._unit(uid)
            for key, tensor in unit.items():
                if key.startswith("label_"):
                    values.update(int(v) for v in torch.unique(tensor).tolist())
        values.discard(0)
        return sorted(values)
