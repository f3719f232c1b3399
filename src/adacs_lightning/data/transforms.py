"""Deterministic MONAI dict transforms shared by the real-data modules.

Images enter as ``MetaTensor`` ``(1, *spatial)`` from :class:`~.io.LoadFilesd` and
``EnsureChannelFirstd``; :class:`Finalised` turns them into the plain tensors held in the cache.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    BorderPad,
    Compose,
    MapTransform,
    Resize,
    ScaleIntensityd,
    ScaleIntensityRangePercentilesd,
    SpatialCrop,
    SqueezeDim,
    Transform,
)
from scipy import ndimage

from ..choices import INTENSITY_MODES
from .bad_cases import DataError


def file_of(image: Any, fallback: str = "<image>") -> str:
    """The file an image was read from (``MetaTensor`` meta), for messages."""
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj", fallback))


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


class Guard(Transform):
    """Run ``pipeline`` on a case; a :class:`DataError` (or any other failure) becomes ``{"_error": DataError}``.

    Caching a bad case as a record instead of raising lets one damaged file be skipped
    without stopping the cache of all the others.
    """

    def __init__(self, pipeline: Compose) -> None:
        self.pipeline = pipeline

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        try:
            return self.pipeline(dict(data))
        except Exception as error:  # reported per case; strict mode re-raises it later
            return {"_error": _as_data_error(error, data)}


def _as_data_error(error: BaseException, data: Mapping[Hashable, Any]) -> DataError:
    cause: BaseException | None = error
    while cause is not None:  # MONAI wraps failures in RuntimeError("applying transform ...")
        if isinstance(cause, DataError):
            return cause
        cause = cause.__cause__
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    files = ", ".join(str(v) for k, v in data.items() if isinstance(v, str) and not str(k).startswith("_"))
    return DataError(
        files or "<case>",
        f"could not be preprocessed ({type(root).__name__}: {root}).",
        "Check that these files are images of the expected kind, or remove the case.",
    )


class ToSpatialDimsd(MapTransform):
    """Bring ``(C, *spatial)`` images to ``spatial_dims`` axes, or raise naming the file.

    Trailing axes of size 1 are dropped (a 2D image saved as ``(X, Y, 1)``). An image with
    more or fewer spatial axes than ``spatial_dims``, or with several channels, is an error.
    """

    def __init__(self, keys: Sequence[str], spatial_dims: int, fix: str | None = None) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.spatial_dims, self.fix = spatial_dims, fix
        self.squeeze = SqueezeDim(dim=-1, update_meta=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            path = file_of(image)
            while image.ndim - 1 > self.spatial_dims and image.shape[-1] == 1:
                image = self.squeeze(image)
            if image.shape[0] != 1:
                raise DataError(path, f"has {image.shape[0]} channels.", "Give single-channel (greyscale) images.")
            ndim = image.ndim - 1
            if ndim != self.spatial_dims:
                shape = tuple(image.shape[1:])
                fix = self.fix or (
                    f"Set data.spatial_dims={ndim} (with a {ndim}D backbone: backbone.spatial_dims={ndim}) "
                    f"or give {self.spatial_dims}D images."
                )
                raise DataError(path, f"is {ndim}D (shape {shape}) but {self.spatial_dims}D images are expected.", fix)
            out[key] = image
        return out


class CheckShapesd(MapTransform):
    """Raise, naming both files, when paired keys (an image and its label map) differ in spatial shape."""

    def __init__(self, pairs: Sequence[tuple[str, str]], fix: str | None = None) -> None:
        super().__init__([k for pair in pairs for k in pair], allow_missing_keys=True)
        self.pairs = list(pairs)
        self.fix = fix or "A label map or mask must be on its image's voxel grid: re-export it or remove the case."

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        for first, second in self.pairs:
            if first in data and second in data and data[first].shape[1:] != data[second].shape[1:]:
                a, b = data[first], data[second]
                raise DataError(
                    file_of(b),
                    f"has shape {tuple(b.shape[1:])} but {file_of(a)} has {tuple(a.shape[1:])}.",
                    self.fix,
                )
        return dict(data)


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


def _kind(key: str) -> str:
    """``label``, ``mask``, ``region`` or ``image``, from a unit's key (see :class:`~adacs_lightning.data.pairs.Unit`).

    A ``region`` (``nocorr``: where the target has no counterpart) is a mask that may be empty."""
    if key == "nocorr":
        return "region"
    return "label" if key.startswith("label") else "mask" if key.startswith("mask") else "image"


#: Label values within this distance of an integer are rounded to it (float storage); farther is an error.
LABEL_TOLERANCE = 1e-3


def check_values(image: Any, path: str | Path, kind: str) -> Any:
    """The loaded ``image`` if its values are usable as a ``kind`` (image, label or mask), else :class:`DataError`.

    Images must be finite and not constant; label maps finite, integer-valued (values within
    :data:`LABEL_TOLERANCE` of integers are rounded, with a warning) and not empty; masks finite
    and not empty; regions (a no-correspondence mask) finite.
    """
    values = torch.as_tensor(np.asarray(image))
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise DataError(
            path,
            f"has {bad} voxel(s) that are NaN or infinite (of {values.numel()}).",
            "Fix the export that wrote it (or set those voxels to a real value), or remove the case.",
        )
    if kind == "image" and bool((values == values.flatten()[0]).all()):
        raise DataError(
            path, f"is constant (every voxel is {float(values.flatten()[0]):g}): there is nothing to register.",
            "Check that it is the right file, or remove the case.",
        )  # fmt: skip
    if kind == "image":
        return image
    if kind == "region":
        distinct = torch.unique(values)
        if distinct.numel() > 2 or float(distinct.min()) < 0 or (distinct.numel() == 2 and float(distinct[0]) != 0):
            raise DataError(
                path,
                f"is not a mask of the voxels without correspondence: it has {distinct.numel()} distinct values "
                f"(e.g. {float(distinct[distinct.numel() // 2]):g}), a mask has 0 and one other.",
                "target_nocorr names a binary mask (1 where the target has no counterpart), not an image.",
            )
        return image
    if not bool(values.any()):
        what = "a label map with no label" if kind == "label" else "an empty mask"
        raise DataError(path, f"is {what} (every voxel is 0).", "Give the case's real map, or remove the case.")
    if kind == "label":
        distance = (values - values.round()).abs()
        if float(distance.max()) > LABEL_TOLERANCE:
            example = float(values.flatten()[int(distance.flatten().argmax())])
            raise DataError(
                path,
                f"is not a label map: it has non-integer values (e.g. {example:g}).",
                "Label maps hold integer labels (0 background); give the segmentation, not a probability or image.",
            )
        if float(distance.max()) > 0:
            warnings.warn(f"{path}: label values stored as floats were rounded to integers.", stacklevel=2)
            return image.round() if hasattr(image, "round") else np.round(image)
    return image


class CheckValuesd(MapTransform):
    """Reject (with :class:`DataError` naming the file) voxel values a case cannot be trained on.

    Runs on freshly loaded keys, after the shape checks: images (``source``, ``ed``, …), label maps
    (keys ``label_*``) and masks (``mask*``) each get :func:`check_values`.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = check_values(out[key], file_of(out[key]), _kind(str(key)))
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
