"""Displacement fields in the world's convention, and images on a target's grid, for other tools.

Inside the product a displacement ``u`` is in voxels, channel ``i`` along array axis ``i`` of the
target's grid, with ``source(x + u(x)) ≈ target(x)`` (MONAI's ``Warp``). ITK, ANTs and 3D Slicer
read a displacement field as physical millimetres in LPS coordinates, defined on the fixed
(target) image's grid, mapping each target point ``p`` to ``p + d(p)`` in the moving image: what
:func:`world_displacement` returns. NIfTI stores it as a 5D vector image ``(X, Y, Z, 1, ndim)``
with intent 1007 (``vector``) and the target's affine; MetaImage and NRRD as an ITK vector image
with the target's origin, spacing and direction. Affines here are 4×4 voxel-to-world in RAS mm
(the readers' convention).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from .data.io import Volume
from .errors import AdaCSError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: NIfTI intent code of a vector image: how ITK and ANTs store displacement fields.
NIFTI_INTENT_VECTOR = 1007
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def world_displacement(ddf: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A voxel displacement ``(ndim, *spatial)`` on the grid of ``affine`` → LPS millimetres ``(ndim, *spatial)``.

    ``d = M·u`` with ``M`` the affine's linear part (direction times spacing), then RAS → LPS
    (x and y negated). A 2D grid keeps its in-plane (first two) world components, as a 2D ITK image.
    """
    ndim = ddf.shape[0]
    linear = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3, :ndim]  # (3, ndim)
    world = np.tensordot(linear, np.asarray(ddf, dtype=np.float64), axes=(1, 0))  # (3, *spatial)
    return world[:ndim].astype(np.float32)


def voxel_displacement(world: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`world_displacement` for a grid without shear: LPS mm ``(ndim, *spatial)`` → voxels."""
    ndim = world.shape[0]
    linear = (_RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3, :ndim])[:ndim]
    return np.tensordot(np.linalg.inv(linear), np.asarray(world, dtype=np.float64), axes=(1, 0)).astype(np.float32)


def lps_geometry(affine: np.ndarray, ndim: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """``(origin, spacing, direction)`` of a RAS affine as ITK (LPS) gives them, for an ``ndim``-D image."""
    lps = np.eye(4)
    lps[:3, :3] = _RAS_TO_LPS
    matrix = lps @ np.asarray(affine, dtype=np.float64)
    linear = matrix[:ndim, :ndim]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    return tuple(matrix[:ndim, 3]), tuple(spacing), tuple(direction.flatten())


def write_image(array: np.ndarray, reference: Volume, path: str | Path, dtype=np.float32) -> Path:
    """Write a scalar ``(*spatial)`` array on ``reference``'s grid: NIfTI with its affine, or any ITK format."""
    path = _prepared(path)
    array = np.asarray(array, dtype=dtype)
    if is_nifti(path):
        nib.save(nib.Nifti1Image(array, reference.affine), str(path))
        return path
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.T))  # ITK arrays are (z, y, x)
    _set_geometry(image, reference, array.ndim)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_displacement(world: np.ndarray, reference: Volume, path: str | Path) -> Path:
    """Write an LPS-millimetre field ``(ndim, *spatial)`` as ITK, ANTs and 3D Slicer read a displacement field.

    NIfTI: ``(X, Y, Z, 1, ndim)`` (a 2D grid gets ``Z = 1``), intent 1007, the reference's affine.
    MetaImage / NRRD: an ITK vector image with the reference's origin, spacing and direction.
    """
    path = _prepared(path)
    ndim = world.shape[0]
    vectors = np.moveaxis(np.asarray(world, dtype=np.float32), 0, -1)  # (*spatial, ndim)
    if is_nifti(path):
        vectors = vectors.reshape(*world.shape[1:], *([1] * (3 - ndim)), 1, ndim)
        image = nib.Nifti1Image(vectors, reference.affine)
        image.header.set_intent(NIFTI_INTENT_VECTOR, name="displacement_mm_lps")
        nib.save(image, str(path))
        return path
    import SimpleITK as sitk

    order = tuple(reversed(range(ndim))) + (ndim,)  # (x, y[, z], c) → (z, y, x, c)
    image = sitk.GetImageFromArray(np.ascontiguousarray(vectors.transpose(order)).astype(np.float64), isVector=True)
    _set_geometry(image, reference, ndim)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_voxel_displacement(ddf: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """The product's own field ``(ndim, *spatial)`` in voxels (channel ``i`` along array axis ``i``), as NIfTI."""
    path = _prepared(path)
    ndim = ddf.shape[0]
    vectors = np.moveaxis(np.asarray(ddf, dtype=np.float32), 0, -1).reshape(
        *ddf.shape[1:], *([1] * (3 - ndim)), 1, ndim
    )
    image = nib.Nifti1Image(vectors, affine)
    image.header.set_intent(NIFTI_INTENT_VECTOR, name="displacement_voxels")
    nib.save(image, str(path))
    return path


def read_voxel_displacement(path: str | Path) -> np.ndarray:
    """A field written by :func:`write_voxel_displacement`, as ``(ndim, *spatial)`` in voxels."""
    vectors = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if vectors.ndim != 5:
        raise AdaCSError(f"'{path}' is not a NIfTI vector image (shape {vectors.shape}).")
    ndim = vectors.shape[-1]
    return np.moveaxis(vectors.reshape(*vectors.shape[:ndim], ndim), -1, 0)


def same_grid(a: Volume, b: Volume, tolerance: float = 1e-3) -> bool:
    """Whether two images share one voxel grid: shape and affine (within ``tolerance`` mm)."""
    return a.array.shape == b.array.shape and np.allclose(a.affine, b.affine, atol=tolerance)


def describe_grid(volume: Volume) -> str:
    """``shape 64×64, spacing 1.5×1.5 mm, origin (…) mm`` of an image, for messages."""
    ndim = volume.array.ndim
    origin, spacing, _ = lps_geometry(volume.affine, ndim)
    return (
        f"shape {'×'.join(str(s) for s in volume.array.shape)}, spacing {'×'.join(f'{s:g}' for s in spacing)} mm, "
        f"origin ({', '.join(f'{o:g}' for o in origin)}) mm (LPS)"
    )


def _set_geometry(image, reference: Volume, ndim: int) -> None:
    origin, spacing, direction = lps_geometry(reference.affine, ndim)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)


def _prepared(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


__all__ = [
    "NIFTI_INTENT_VECTOR",
    "describe_grid",
    "is_nifti",
    "lps_geometry",
    "read_voxel_displacement",
    "same_grid",
    "voxel_displacement",
    "world_displacement",
    "write_displacement",
    "write_image",
    "write_voxel_displacement",
]
