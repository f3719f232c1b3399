"""Grids at registration: the source on the target's grid, the target's grid as the network was trained on it, and back.

Affines here are ``(ndim+1, ndim+1)`` index → RAS millimetre matrices of ``ndim``-D images (a 2D
image's in-plane part). A displacement ``u`` in voxels of a grid with affine ``A`` moves the world
point ``A·x`` by ``L·u(x)`` mm, ``L`` the linear part of ``A``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Orientation, ResampleToMatch, Resize, Spacing

from ..data.io import Volume
from ..data.recipe import GridRecipe
from ..errors import AdaCSError
from ..fields import describe_grid, same_grid

#: Interpolation per kind of array: images linear, label maps nearest.
_MODES = {"image": ("bilinear", "border", "bilinear"), "label": ("nearest", "zeros", "nearest-exact")}


def affine_nd(affine: np.ndarray, ndim: int) -> np.ndarray:
    """The ``(ndim+1)²`` affine of an ``ndim``-D image from a 4×4 one (2D: the in-plane part)."""
    if ndim == 3:
        return np.asarray(affine, dtype=np.float64)
    out = np.eye(ndim + 1)
    out[:ndim, :ndim], out[:ndim, ndim] = affine[:ndim, :ndim], affine[:ndim, 3]
    return out


def on_target_grid(source: Volume, labels: Volume | None, target: Volume, grid: str, paths: tuple[Path, Path]):
    """The source (and its labels) on the target's grid: as they are, resampled (``grid="resample"``), or refused.

    Returns ``(source, labels, note)``; the note says what was done ("" when nothing).
    """
    if same_grid(source, target):
        return source, labels, ""
    if grid == "refuse":
        raise AdaCSError(
            f"{paths[0]} and {paths[1]} lie on different grids: the source has {describe_grid(source)}, "
            f"the target {describe_grid(target)}. Resample the source onto the target grid with --grid resample "
            "(MONAI ResampleToMatch), or give images on one grid."
        )
    resampled = resample_to(source, target, "bilinear")
    resampled_labels = None if labels is None else resample_to(labels, target, "nearest")
    return resampled, resampled_labels, "the source resampled onto the target grid (MONAI ResampleToMatch)"


def resample_to(moving: Volume, target: Volume, mode: str) -> Volume:
    """``moving`` resampled onto ``target``'s grid by world coordinates (MONAI ``ResampleToMatch``)."""
    ndim = target.array.ndim
    as_meta = [
        MetaTensor(
            torch.as_tensor(v.array, dtype=torch.float32)[None], affine=torch.as_tensor(affine_nd(v.affine, ndim))
        )
        for v in (moving, target)
    ]
    resampled = ResampleToMatch(mode=mode, padding_mode="zeros")(as_meta[0], as_meta[1])
    return Volume(np.asarray(resampled[0], dtype=np.float32), target.affine)


@dataclass
class NetworkGrid:
    """The grid the network registers a target on: the target's own grid put through a data set's :class:`GridRecipe`.

    ``native_affine`` / ``native_shape``: the target's grid; ``affine`` / ``shape``: the network's.
    ``target``: the target image on the network's grid (:meth:`for_target` computes it once).
    ``identity``: the recipe leaves the target's grid as it is (then nothing is resampled).
    """

    recipe: GridRecipe
    native_affine: np.ndarray
    native_shape: tuple[int, ...]
    affine: np.ndarray
    shape: tuple[int, ...]
    target: np.ndarray | None = None

    @classmethod
    def for_target(cls, target: Volume, recipe: GridRecipe | None) -> NetworkGrid:
        """The network's grid of ``target``, found by putting the target itself through ``recipe``."""
        recipe = recipe or GridRecipe()
        native = affine_nd(target.affine, target.array.ndim)
        if recipe.is_identity:
            return cls(recipe, native, target.array.shape, native, target.array.shape, target.array)
        on_network = _through_recipe(target.array, native, recipe, "image")
        affine, shape = np.asarray(on_network.affine, np.float64), tuple(on_network.shape[1:])
        return cls(recipe, native, target.array.shape, affine, shape, np.asarray(on_network[0], dtype=np.float32))

    @property
    def identity(self) -> bool:
        return self.shape == tuple(self.native_shape) and np.allclose(self.affine, self.native_affine, atol=1e-4)

    def to_network(self, array: np.ndarray, kind: str = "image") -> np.ndarray:
        """An array ``(*native_shape)`` on the target's grid → ``(*shape)`` on the network's (``kind``: image or label)."""
        if self.identity:
            return array
        out = np.asarray(_through_recipe(array, self.native_affine, self.recipe, kind)[0], dtype=np.float32)
        if out.shape != self.shape:
            raise AdaCSError(
                f"Preprocessing gave shape {out.shape}, expected {self.shape}: the images are not on one grid."
            )
        return out

    def to_native(self, maps: torch.Tensor) -> torch.Tensor:
        """Maps ``(C, *shape)`` on the network's grid sampled (linearly, border) at the target grid's voxels ``(C, *native_shape)``."""
        if self.identity:
            return maps
        ndim = len(self.shape)
        to_network = np.linalg.inv(self.affine) @ self.native_affine  # native index → network index
        axes = [torch.arange(n, dtype=torch.float64) for n in self.native_shape]
        index = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*native, ndim)
        mapped = index @ torch.as_tensor(to_network[:ndim, :ndim]).T + torch.as_tensor(to_network[:ndim, ndim])
        sizes = torch.as_tensor(self.shape, dtype=torch.float64)
        normalised = (2 * mapped / (sizes - 1).clamp_min(1) - 1).flip(-1).float()  # grid_sample wants (x, y[, z])
        sampled = F.grid_sample(
            maps[None].float(), normalised[None], mode="bilinear", padding_mode="border", align_corners=True
        )
        return sampled[0]

    def field_to_native(self, ddf: torch.Tensor) -> torch.Tensor:
        """A displacement ``(ndim, *shape)`` in network voxels → ``(ndim, *native_shape)`` in the target's voxels.

        The world displacement ``L_net·u(y)`` at the network point ``y`` of each target voxel, expressed in the
        target's voxels: ``L_target⁻¹·L_net·u``.
        """
        if self.identity:
            return ddf
        ndim = len(self.shape)
        to_native = np.linalg.inv(self.native_affine[:ndim, :ndim]) @ self.affine[:ndim, :ndim]
        sampled = self.to_native(ddf).double()
        return torch.einsum("ij,j...->i...", torch.as_tensor(to_native), sampled).float()

    def describe(self) -> str:
        if self.identity:
            return "the target's own grid"
        spacing = np.linalg.norm(self.affine[:-1, :-1], axis=0)
        return (
            f"{self.recipe.describe()} as in training: {' × '.join(map(str, self.shape))} voxels of "
            f"{' × '.join(f'{s:.3g}' for s in spacing)} mm"
        )


def _through_recipe(array: np.ndarray, affine: np.ndarray, recipe: GridRecipe, kind: str) -> MetaTensor:
    """``array`` ``(*spatial)`` with ``affine`` put through ``recipe``'s steps (MONAI transforms), ``(1, *spatial')``."""
    linear, padding, resize_mode = _MODES[kind]
    ndim = array.ndim
    if recipe.transpose:
        order = tuple(recipe.transpose)
        if sorted(order) != list(range(ndim)):
            raise AdaCSError(f"The run transposes axes {order}, which does not fit a {ndim}D image.")
        array = np.transpose(array, order)
        affine = affine.copy()
        affine[:, :ndim] = affine[:, list(order)]
    image = MetaTensor(
        torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)[None], affine=torch.as_tensor(affine)
    )
    if recipe.orientation and ndim == 3:
        image = Orientation(axcodes=recipe.orientation, labels=None)(image)
    if recipe.spacing:
        spacing = tuple(recipe.spacing)[:ndim]
        image = Spacing(pixdim=spacing, mode=linear, padding_mode=padding)(image)
    if recipe.size:
        if len(recipe.size) != ndim:
            raise AdaCSError(f"The run resizes images to {recipe.size}, which does not fit a {ndim}D image.")
        image = Resize(tuple(recipe.size), mode=resize_mode, anti_aliasing=kind == "image")(image)
    return image
