"""Deterministic MONAI dict transforms shared by the real-data modules.

Images enter as ``MetaTensor`` ``(1, *spatial)`` from :class:`~.io.LoadFilesd` and
``EnsureChannelFirstd``; :class:`Finalised` turns them into the plain tensors held in the cache.
The checks of freshly loaded files (:mod:`.checks`) are named here too, so that a data module
takes every transform from this module.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    BorderPad,
    MapTransform,
    Resize,
    ScaleIntensityd,
    ScaleIntensityRangePercentilesd,
    SpatialCrop,
    Transform,
)
from scipy import ndimage

from ..choices import INTENSITY_MODES
from .checks import CheckShapesd, CheckValuesd, ToSpatialDimsd, check_values

__all__ = [
    "INTENSITY_MODES",
    "CheckShapesd",
    "CheckValuesd",
    "CropAroundCentroidd",
    "Finalised",
    "RecordSpacingd",
    "ResizeSpacingd",
    "SectorMaskd",
    "ToSpatialDimsd",
    "check_values",
    "direction_of",
    "intensity",
    "spacing_of",
]


def spacing_of(image: torch.Tensor) -> np.ndarray:
    """Voxel spacing (mm per voxel, one value per spatial axis) from a ``MetaTensor``'s affine; 1 without one.

    The spacing of axis ``i`` is the length of the affine's column ``i`` over every world axis,
    so that a 2D slice with a 4×4 affine (an oblique plane in 3D) keeps its through-plane part.
    """
    ndim = image.ndim - 1
    affine = getattr(image, "affine", None)
    if affine is None:
        return np.ones(ndim)
    matrix = np.asarray(affine, dtype=np.float64)[:-1, :ndim]
    return np.linalg.norm(matrix, axis=0)


class RecordSpacingd(MapTransform):
    """Store ``data["spacing"]`` (mm per voxel) and ``data["direction"]`` (``(3, ndim)``: each array axis's
    unit vector in RAS world coordinates) of ``key``, read from its affine, with the axes reordered by
    ``axes`` when given (for arrays about to be transposed). Figures use the direction to show images as
    3D Slicer does."""

    def __init__(self, key: str, axes: Sequence[int] | None = None) -> None:
        super().__init__([key])
        self.axes = None if axes is None else list(axes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        spacing, direction = spacing_of(out[self.keys[0]]), direction_of(out[self.keys[0]])
        out["spacing"] = spacing if self.axes is None else spacing[self.axes]
        out["direction"] = direction if self.axes is None else direction[:, self.axes]
        return out


def direction_of(image: torch.Tensor) -> np.ndarray:
    """Each spatial axis's unit vector in RAS world coordinates, ``(3, ndim)``; the identity without an affine."""
    ndim = image.ndim - 1
    affine = getattr(image, "affine", None)
    if affine is None:
        return np.eye(3)[:, :ndim]
    matrix = np.asarray(affine, dtype=np.float64)
    columns = np.zeros((3, ndim))
    rows = min(3, matrix.shape[0] - 1)
    columns[:rows] = matrix[:rows, :ndim]
    return columns / np.linalg.norm(columns, axis=0).clip(1e-12)


class ResizeSpacingd(MapTransform):
    """Resize images (bilinear, anti-aliased) and label maps/masks (nearest) to ``size``; ``data["spacing"]``
    is scaled so that it still gives mm per voxel (the field of view is unchanged).

    ``spacing_key`` names the image whose spacing :class:`RecordSpacingd` recorded: its shape before
    resizing sets the scale (other keys may have had another size).
    """

    def __init__(
        self, image_keys: Sequence[str], nearest_keys: Sequence[str], size: Sequence[int], *, spacing_key: str
    ) -> None:
        super().__init__(list(image_keys) + list(nearest_keys), allow_missing_keys=True)
        self.size = [int(s) for s in size]
        self.image = Resize(self.size, mode="bilinear", anti_aliasing=True)
        self.nearest = Resize(self.size, mode="nearest-exact")
        self.image_keys = list(image_keys)
        self.spacing_key = spacing_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        keys = list(self.key_iterator(out))
        old = np.asarray(out[self.spacing_key].shape[1:], dtype=np.float64)
        for key in keys:
            out[key] = (self.image if key in self.image_keys else self.nearest)(out[key])
        out["spacing"] = np.asarray(out["spacing"]) * old / np.asarray(self.size, dtype=np.float64)
        return out


class CropAroundCentroidd(MapTransform):
    """Crop (zero-padding where needed) every key to ``roi_size`` around the centroid of ``centre_keys``.

    ``roi_size`` covers the first axes; later axes are kept whole (the slices of a stack).
    Without a (non-empty) label among ``centre_keys``, the crop is centred on the image.
    """

    def __init__(self, keys: Sequence[str], centre_keys: Sequence[str], roi_size: Sequence[int]) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.centre_keys = [k for k in centre_keys]
        self.roi_size = [int(s) for s in roi_size]

    def centre(self, data: Mapping[Hashable, Any], shape: Sequence[int]) -> list[float]:
        n = len(self.roi_size)
        support = torch.zeros(tuple(shape), dtype=torch.bool)
        for key in self.centre_keys:
            if key in data:
                support |= torch.as_tensor(data[key][0]).round() > 0
        if bool(support.any()):
            return [float(c) for c in torch.nonzero(support)[:, :n].float().mean(0)]
        return [(s - 1) / 2 for s in shape[:n]]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        keys = list(self.key_iterator(out))
        shape = tuple(out[keys[0]].shape[1:])
        centre = self.centre(out, shape)
        half = [s // 2 for s in self.roi_size]
        extra = len(shape) - len(self.roi_size)
        pad = BorderPad(spatial_border=[p for h in half for p in (h, h)] + [0, 0] * extra, mode="constant")
        start = [int(round(c)) for c in centre]  # the window [c - h, c - h + r) in padded coordinates
        start = [min(max(s, 0), n + 2 * h - r) for s, n, h, r in zip(start, shape, half, self.roi_size)]
        end = [s + r for s, r in zip(start, self.roi_size)]
        crop = SpatialCrop(roi_start=start + [0] * extra, roi_end=end + list(shape[len(self.roi_size) :]))
        for key in keys:
            out[key] = crop(pad(out[key]))
        return out


class SectorMaskd(MapTransform):
    """The ultrasound sector as a field-of-view mask ``(1, H, W)`` in ``{0, 1}``, stored under ``mask_key``.

    Per frame: voxels above ``threshold`` (images scaled to [0, 1]), a morphological closing
    with a disc of ``closing_radius`` voxels (bridging dark speckle and blood inside the
    sector), holes filled and the largest connected component kept; the mask is the
    intersection over the frames in ``keys`` (the region imaged in both). Frames are
    multiplied by it, so that outside the field of view they are exactly 0.
    """

    def __init__(self, keys: Sequence[str], mask_key: str = "mask", threshold: float = 0.01, closing_radius: int = 3):
        super().__init__(keys)
        self.mask_key, self.threshold, self.radius = mask_key, threshold, int(closing_radius)

    def sector(self, image: torch.Tensor) -> np.ndarray:
        support = np.asarray(image[0]) > self.threshold
        r = self.radius
        grid = np.mgrid[tuple(slice(-r, r + 1) for _ in range(support.ndim))]
        disc = (grid**2).sum(0) <= r * r
        padded = np.pad(support, r)  # closing near the border must not erode the sector's edge
        closed = ndimage.binary_closing(padded, structure=disc)[tuple(slice(r, -r) for _ in range(support.ndim))]
        filled = ndimage.binary_fill_holes(closed)
        components, count = ndimage.label(filled)
        if count > 1:
            sizes = ndimage.sum(filled, components, index=range(1, count + 1))
            filled = components == (1 + int(np.argmax(sizes)))
        return filled

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        mask = np.logical_and.reduce([self.sector(out[k]) for k in self.keys])
        mask_tensor = torch.as_tensor(mask[None], dtype=torch.float32)
        reference = out[self.keys[0]]
        out[self.mask_key] = MetaTensor(mask_tensor, meta=dict(reference.meta))
        for key in self.keys:
            out[key] = out[key] * mask_tensor
        return out


def intensity(keys: Sequence[str], mode: str, lower: float = 1.0, upper: float = 99.0) -> Transform:
    """Scale each image to [0, 1]: ``minmax`` (its own min and max) or ``percentile`` (its ``lower``–``upper``
    percentiles, clipped: robust to a few very bright voxels, as in MRI)."""
    if mode == "minmax":
        return ScaleIntensityd(keys=keys, minv=0.0, maxv=1.0)
    if mode == "percentile":
        return ScaleIntensityRangePercentilesd(keys=keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True)
    raise ValueError(f"intensity must be one of {INTENSITY_MODES}, got {mode!r}")


class Finalised(MapTransform):
    """Plain, compact tensors for the cache: images float32 in [0, 1], label maps int16, masks uint8.

    Keeps only these keys and ``spacing`` (float32, mm). With ``apply_mask``, images are multiplied
    by that mask, so that they are exactly 0 outside the field of view.
    """

    def __init__(
        self,
        image_keys: Sequence[str],
        label_keys: Sequence[str] = (),
        mask_keys: Sequence[str] = (),
        apply_mask: str | None = None,
    ) -> None:
        super().__init__(list(image_keys) + list(label_keys) + list(mask_keys), allow_missing_keys=True)
        self.image_keys, self.label_keys, self.mask_keys = list(image_keys), list(label_keys), list(mask_keys)
        self.apply_mask = apply_mask

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out: dict[str, Any] = {}
        for key in self.key_iterator(data):
            value = data[key]
            value = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
            if key in self.image_keys:
                out[key] = value.float().clamp(0.0, 1.0).contiguous()
            elif key in self.label_keys:
                out[key] = value.round().to(torch.int16).contiguous()
            else:
                out[key] = (value > 0.5).to(torch.uint8).contiguous()
        if self.apply_mask is not None and self.apply_mask in out:
            for key in self.image_keys:
                if key in out:
                    out[key] = out[key] * out[self.apply_mask]
        out["spacing"] = torch.as_tensor(np.asarray(data["spacing"], dtype=np.float32))
        if "direction" in data:
            out["direction"] = torch.as_tensor(np.asarray(data["direction"], dtype=np.float32))
        return out
