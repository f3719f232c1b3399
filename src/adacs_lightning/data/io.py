"""Reading image files, the one way every part of the product reads them.

NIfTI goes through MONAI's ``NibabelReader``; MHA/MHD and NRRD through :class:`SimpleITKReader`.
Both return arrays in the file's index order ``(i, j[, k])`` (the fastest-varying axis first) with
a voxel-to-world affine in RAS millimetres, so a file reads the same whichever format it is stored
in. The data modules load with :class:`LoadFilesd`; ``adacs-register`` and the evaluation with
:func:`read_image`; both use the same MONAI ``LoadImage`` readers (:func:`image_loader`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader
from monai.data.utils import is_supported_format
from monai.transforms import LoadImage, LoadImaged, MapTransform
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from .bad_cases import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES


class SimpleITKReader(ImageReader):
    """A MONAI :class:`~monai.data.ImageReader` for MetaImage (``.mha``/``.mhd`` + ``.raw``) and NRRD, via SimpleITK.

    ``get_data`` returns the voxel array in ITK index order ``(x, y[, z])`` (as MONAI's ITKReader
    and NibabelReader do) and a meta dict with the affine in RAS world coordinates (mm),
    ``spatial_shape`` and ``original_channel_dim`` (``nan``, or ``-1`` for vector pixels).
    """

    suffixes = ("mha", "mhd", "nrrd", "nhdr")

    def verify_suffix(self, filename: Sequence[str | Path] | str | Path) -> bool:
        return is_supported_format(filename, self.suffixes)

    def read(self, data: Sequence[str | Path] | str | Path, **kwargs: Any):
        images = [sitk.ReadImage(str(name)) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        images = list(img) if isinstance(img, (list, tuple)) else [img]
        arrays, meta = [], {}
        for image in images:
            array, header = self._one(image)
            if meta and tuple(header[MetaKeys.SPATIAL_SHAPE]) != tuple(meta[MetaKeys.SPATIAL_SHAPE]):
                raise ValueError("images stacked as channels must share one shape")
            arrays.append(array)
            meta = meta or header
        if len(arrays) == 1:
            return arrays[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta

    @staticmethod
    def _one(image: sitk.Image) -> tuple[np.ndarray, dict]:
        ndim = image.GetDimension()
        array = sitk.GetArrayFromImage(image)  # (z, y, x[, components])
        vector = image.GetNumberOfComponentsPerPixel() > 1
        spatial_axes = list(range(ndim))[::-1]
        array = np.transpose(array, spatial_axes + ([ndim] if vector else []))
        direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
        affine = np.eye(ndim + 1)
        affine[:ndim, :ndim] = direction @ np.diag(image.GetSpacing())
        affine[:ndim, ndim] = image.GetOrigin()
        flip = np.diag([-1.0, -1.0] + [1.0] * (ndim - 1))  # ITK's LPS world to RAS
        affine = flip @ affine
        header = {
            MetaKeys.AFFINE: affine,
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(image.GetSize()),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if vector else float("nan"),
            "spacing": np.asarray(image.GetSpacing()),
        }
        return array, header


def make_loader(keys: Sequence[str]) -> LoadImaged:
    """``LoadImaged`` for ``keys`` with :class:`SimpleITKReader` registered next to MONAI's NIfTI reader."""
    loader = LoadImaged(keys=keys, image_only=True, dtype=np.float32)
    loader.register(SimpleITKReader())
    return loader


def image_loader() -> LoadImage:
    """MONAI ``LoadImage`` with :class:`SimpleITKReader` registered: the readers :class:`LoadFilesd` uses."""
    loader = LoadImage(image_only=True, dtype=np.float32)
    loader.register(SimpleITKReader())
    return loader


@dataclass
class Volume:
    """An image: ``array`` ``(*spatial)`` in index order and its 4×4 RAS ``affine`` (mm); ``spacing`` per axis."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(self.array.ndim))


def read_image(path: str | Path, spatial_dims: int | None = None) -> Volume:
    """Read a scalar image as the data modules do; trailing singleton axes are dropped down to ``spatial_dims``.

    Raises :class:`DataError` naming the file when it is missing, not an image, or not scalar.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "is missing.", "Check the path.")
    if not str(path).lower().endswith(IMAGE_SUFFIXES):
        raise DataError(
            path, "is not a NIfTI, MHA/MHD or NRRD file.", f"Convert it to one of {', '.join(IMAGE_SUFFIXES)}."
        )
    try:
        image = image_loader()(str(path))
    except Exception as error:  # any reader failure means the file cannot be used
        raise DataError(path, f"could not be read as an image ({_root_message(error)}).", "Check the file.") from error
    if image.meta.get(MetaKeys.ORIGINAL_CHANNEL_DIM) == -1:
        raise DataError(path, f"has vector voxels (shape {tuple(image.shape)}).", "Give a scalar image.")
    array = np.asarray(image, dtype=np.float32)
    affine = _as_4x4(np.asarray(image.affine, dtype=np.float64))
    target = spatial_dims or array.ndim
    while array.ndim > target and array.shape[-1] == 1:
        array = array[..., 0]
    if spatial_dims is not None and array.ndim != spatial_dims:
        raise DataError(
            path,
            f"has shape {array.shape}, but the network registers {spatial_dims}D images.",
            "Give a scalar image with that many axes (vector or multi-frame images are not supported).",
        )
    return Volume(array, affine)


def _as_4x4(affine: np.ndarray) -> np.ndarray:
    """A 2D image's 3×3 affine embedded in 4×4 (the slice at z = 0); a 4×4 affine unchanged."""
    if affine.shape == (4, 4):
        return affine
    ndim = affine.shape[0] - 1
    full = np.eye(4)
    full[:ndim, :ndim], full[:ndim, 3] = affine[:ndim, :ndim], affine[:ndim, ndim]
    return full


class LoadFilesd(MapTransform):
    """Load each present key's file; a failure raises :class:`DataError` naming the file.

    Keys listed in ``keys`` but absent from the data dict (optional labels, masks) are skipped.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.loaders = {key: make_loader([key]) for key in self.keys}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            path = str(out[key])
            if not Path(path).is_file():
                raise DataError(path, "is missing.", "Restore the file, or remove the case from the data set.")
            if not path.lower().endswith(IMAGE_SUFFIXES):
                raise DataError(
                    path,
                    "is not a NIfTI, MHA/MHD or NRRD file.",
                    f"Convert it to one of {', '.join(IMAGE_SUFFIXES)}.",
                )
            try:
                out[key] = self.loaders[key]({key: path})[key]
            except Exception as error:  # any reader failure means the file cannot be used
                raise DataError(
                    path,
                    f"could not be read as an image ({_root_message(error)}).",
                    "The file is damaged or not an image: re-extract it from the original archive, or remove the case.",
                ) from error
        return out


def _root_message(error: BaseException) -> str:
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def read_cfg(path: Path) -> dict[str, str]:
    """``key: value`` lines of an ACDC/CAMUS ``.cfg`` file, as strings (keys as written)."""
    values = {}
    for line in path.read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values
