"""Writing registration results; images are read with :func:`adacs_lightning.data.io.read_image`.

Arrays are in the file's index order ``(x, y[, z])``, with a 4×4 voxel-to-world affine in RAS
millimetres. Outputs are NIfTI.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ..data.io import Volume, read_image
from ..errors import AdaCSError

__all__ = ["NIFTI_INTENT_VECTOR", "Volume", "read_displacement", "read_image", "write_displacement", "write_image"]

_NIFTI = (".nii", ".nii.gz")
#: NIfTI intent code of a vector image (the displacement field).
NIFTI_INTENT_VECTOR = 1007


def _is_nifti(path: Path) -> bool:
    return any(path.name.endswith(suffix) for suffix in _NIFTI)


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
