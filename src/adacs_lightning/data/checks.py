"""Checks of freshly loaded files: a case that cannot be trained on becomes a :class:`DataError` naming the file.

Images enter as ``MetaTensor`` ``(1, *spatial)`` (channel first) from :class:`~.io.LoadFilesd` and
``EnsureChannelFirstd``. :class:`Guard` runs a whole preprocessing pipeline and turns any failure
into a record, so that one damaged case is skipped without stopping the others.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, MapTransform, SqueezeDim, Transform

from .bad_cases import DataError


def file_of(image: Any, fallback: str = "<image>") -> str:
    """The file an image was read from (``MetaTensor`` meta), for messages."""
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj", fallback))


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
