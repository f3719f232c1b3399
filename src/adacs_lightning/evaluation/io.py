"""Reading and writing medical images: NIfTI with nibabel, MHA/NRRD and other ITK formats with SimpleITK.

Arrays are in the file's index order ``(x, y[, z])`` (nibabel's), with a 4×4 voxel-to-world
affine in RAS millimetres; ITK images (LPS) are converted on reading. Outputs are NIfTI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import AdaCSError

_NIFTI = (".nii", ".nii.gz")
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: NIfTI intent code of a vector image (the displacement field).
NIFTI_INTENT_VECTOR = 1007


@dataclass
class Volume:
    """An image: ``array`` ``(*spatial)`` and its 4×4 RAS ``affine``; ``spacing`` in mm per axis."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in range(self.array.ndim))


def _is_nifti(path: Path) -> bool:
    return any(path.name.endswith(suffix) for suffix in _NIFTI)


def read_image(path: str | Path, spatial_dims: int | None = None) -> Volume:
    """Read a scalar image; trailing singleton axes are dropped down to ``spatial_dims`` (2D slices in 3D files)."""
    path = Path(path)
    if not path.is_file():
        raise AdaCSError(f"No image file at '{path}'.")
    try:
        if _is_nifti(path):
            image = nib.load(str(path))
            array, affine = np.asarray(image.dataobj, dtype=np.float32), image.affine.astype(np.float64)
        else:
            array, affine = _read_itk(path)
    except AdaCSError:
        raise
    except Exception as error:
        raise AdaCSError(f"'{path}' could not be read as an image ({type(error).__name__}: {error}).") from error
    target_ndim = spatial_dims or array.ndim
    while array.ndim > target_ndim and array.shape[-1] == 1:
        array = array[..., 0]
    if spatial_dims is not None and array.ndim != spatial_dims:
        raise AdaCSError(
            f"'{path}' has shape {array.shape}, but the network registers {spatial_dims}D images "
            "(a scalar image is needed; vector or multi-frame images are not supported)."
        )
    return Volume(array, affine)


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise AdaCSError(
            f"'{path}' has {image.GetNumberOfComponentsPerPixel()} components per voxel; give a scalar image."
        )
    array = sitk.GetArrayFromImage(image).astype(np.float32).T  # ITK arrays are (z, y, x)
    ndim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine = np.eye(4)
    affine[:ndim, :ndim] = direction * np.asarray(image.GetSpacing())[None, :]
    affine[:ndim, 3] = image.GetOrigin()
    return array, _LPS_TO_RAS @ affine


def write_image(array: np.ndarray, affine: np.ndarray, path: str | Path, dtype=np.float32) -> Path:
    """Write a scalar ``(*spatial)`` array as NIfTI with ``affine``."""
    path = _nifti_path(path)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), affine), str(path))
    return path


def write_displacement(ddf: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write a displacement ``(ndim, *spatial)`` as a NIfTI vector image ``(*spatial[, 1 for 2D], 1, ndim)``.

    The layout is NIfTI's for vectors (intent ``vector``, components on the 5th axis); values are
    as the network gives them: voxels, component ``i`` along array axis ``i``, with
    ``source(x + u(x)) ≈ target(x)``.
    """
    ndim = ddf.shape[0]
    vector = np.moveaxis(np.asarray(ddf, dtype=np.float32), 0, -1)  # (*spatial, ndim)
    vector = vector.reshape(*ddf.shape[1:], *([1] * (3 - ndim)), 1, ndim)
    image = nib.Nifti1Image(vector, affine)
    image.header.set_intent(NIFTI_INTENT_VECTOR, name="displacement_vox")
    path = _nifti_path(path)
    nib.save(image, str(path))
    return path


def read_displacement(path: str | Path) -> np.ndarray:
    """A displacement written by :func:`write_displacement`, as ``(ndim, *spatial)`` in voxels."""
    vector = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if vector.ndim != 5:
        raise AdaCSError(f"'{path}' is not a NIfTI vector image (shape {vector.shape}).")
    ndim = vector.shape[-1]
    spatial = vector.shape[:ndim]
    return np.moveaxis(vector.reshape(*spatial, ndim), -1, 0)


def _nifti_path(path: str | Path) -> Path:
    path = Path(path)
    if not _is_nifti(path):
        raise AdaCSError(f"Outputs are NIfTI: name '{path}' with .nii.gz or .nii.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
