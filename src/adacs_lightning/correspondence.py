"""What the scorer learns from: a residual that no small displacement removes (docs/method.md, *The scorer's target*).

``scorer_target="shift_min"`` (:class:`~adacs_lightning.AdaCS`): the scorer weights
:func:`shift_min_residual`, the residual left after the best local integer translation of a small
patch. A residual that a displacement of a few voxels removes is *misalignment*: it carries the
registration signal and keeps its weight. A residual that no nearby displacement removes is *no
correspondence* (a drop-out, a lesion, a structure in one image only): that is what the score should
fall on. Also here: the images' :func:`foreground` (where robust statistics are taken) and
:func:`kept_mass` (the share of the data term a weight map keeps).

The scale the target is shown on lives in :mod:`~adacs_lightning.calibration` (its names are
re-exported here), the two joined in :class:`~adacs_lightning.scorer_target.ScorerTarget`.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from .calibration import (
    CALIBRATIONS,
    DEAD_ZONE_HALF,
    DEAD_ZONE_K,
    MAD_TO_SIGMA,
    REFERENCE_LEVEL,
    ROBUST_CALIBRATIONS,
    ROBUST_SAMPLES,
    TUKEY_C,
    ResidualLevels,
    RobustScale,
    robust_location_scale,
    robust_operating_point,
)
from .losses import masked_mean
from .similarity import Similarity

Tensor = torch.Tensor

#: What ``L_ucs`` weights: the residual itself (the paper) or its minimum over small local shifts.
SCORER_TARGETS = ("residual", "shift_min")
#: What the scorer sees: the target image alone (the paper), or the target and the warped source.
SCORER_INPUTS = ("target", "pair")


def integer_shifts(ndim: int, radius: int) -> list[tuple[int, ...]]:
    """Every integer offset with ``|δ_i| ≤ radius`` on each of ``ndim`` axes, ``(0, …, 0)`` first."""
    offsets = [o for o in itertools.product(range(-radius, radius + 1), repeat=ndim) if any(o)]
    return [(0,) * ndim, *offsets]


def shifted(image: Tensor, offset: tuple[int, ...]) -> Tensor:
    """``image(x + offset)`` for ``(B, C, *spatial)``, the border replicated; ``offset`` in voxels per axis."""
    ndim = image.ndim - 2
    radius = max(abs(o) for o in offset) if any(offset) else 0
    if radius == 0:
        return image
    padded = F.pad(image, [radius] * (2 * ndim), mode="replicate")
    index = [slice(None), slice(None)]
    for axis, o in enumerate(offset):
        start = radius + o
        index.append(slice(start, start + image.shape[2 + axis]))
    return padded[tuple(index)]


def box_sum(values: Tensor, patch: int) -> Tensor:
    """The sum of ``values`` ``(B, C, *spatial)`` over a ``patch``-voxel box around each voxel (odd ``patch``),
    zero outside the image: one pass of shifted in-place additions per axis, no padded copy."""
    half = patch // 2
    for axis in range(2, values.ndim):
        size = values.shape[axis]
        summed = values.clone()
        for step in range(1, min(half, size - 1) + 1):
            summed.narrow(axis, step, size - step).add_(values.narrow(axis, 0, size - step))
            summed.narrow(axis, 0, size - step).add_(values.narrow(axis, step, size - step))
        values = summed
    return values


def box_count(spatial: tuple[int, ...], patch: int, like: Tensor) -> Tensor:
    """How many voxels of the image each ``patch`` box holds ``(1, 1, *spatial)``: fewer at the borders."""
    return box_sum(torch.ones((1, 1, *spatial), dtype=like.dtype, device=like.device), patch)


def patch_mean(residual: Tensor, patch: int) -> Tensor:
    """The mean of ``residual`` ``(B, 1, *spatial)`` over the voxels of the image in a ``patch``-voxel box around
    each voxel (odd ``patch``; 1: itself): average pooling that does not count the padding."""
    _check_patch(patch)
    if patch == 1:
        return residual
    return box_sum(residual, patch) / box_count(residual.shape[2:], patch, residual)


def _check_patch(patch: int) -> None:
    if patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch must be an odd number of voxels ≥ 1 (a box centred on each voxel), got {patch}")


#: Shifts whose candidates are computed in one batch, as a count of voxels (shifts × the target's voxels):
#: small images stack several shifts (fewer, larger operations), large ones go one shift at a time.
SHIFT_GROUP_VOXELS = 2**17


@torch.no_grad()
def shift_min_residual(
    similarity: Similarity,
    warped: Tensor,
    fixed: Tensor,
    mask: Tensor | None = None,
    radius: int = 2,
    patch: int = 3,
) -> Tensor:
    """``min_δ patch_mean(r(warped(· + δ), fixed))`` over integer shifts ``|δ_i| ≤ radius`` voxels.

    Args:
        similarity: the run's dissimilarity map ``r``.
        warped: the warped source ``(B, C, *spatial)``; ``fixed`` the target, same shape.
        mask: optional field of view ``(B, 1, *spatial)``, passed to ``r``.
        radius: the largest shift per axis, in voxels (``(2·radius + 1)^ndim`` shifts: 25 in 2D, 125 in 3D at 2).
        patch: the box, in voxels (odd), a shift must explain at once; 1 compares single voxels, which noise
            lets a shift match by chance.

    Returns ``(B, 1, *spatial)`` in ``r``'s units, no gradient; never above ``patch_mean(r)`` at δ = 0.
    The source is padded once (border replicated) and each shift is a view of it; each candidate's box
    *sum* is folded into a running minimum in place, and the minimum divided by the box's voxel count
    once (the count is the same for every shift). Small images evaluate :data:`SHIFT_GROUP_VOXELS` worth
    of shifts at once, stacked along the batch axis. Equal, within rounding, to padding each shift on its
    own and average-pooling each (tests/test_correspondence.py).
    """
    if radius < 0:
        raise ValueError(f"radius must be ≥ 0, got {radius}")
    _check_patch(patch)
    ndim, spatial = warped.ndim - 2, warped.shape[2:]
    padded = F.pad(warped, [radius] * (2 * ndim), mode="replicate") if radius else warped
    offsets = integer_shifts(ndim, radius)
    per_group = max(1, SHIFT_GROUP_VOXELS // fixed.numel())
    best: Tensor | None = None
    for start in range(0, len(offsets), per_group):
        group = offsets[start : start + per_group]
        windows = [padded[(slice(None), slice(None), *(slice(radius + o, radius + o + n) for o, n in zip(d, spatial)))]
                   for d in group]  # fmt: skip
        if len(group) == 1:
            sums = box_sum(similarity(windows[0], fixed, mask), patch)
        else:  # the group's shifts along the batch axis: a few large operations instead of many small ones
            times = len(group)
            batch_mask = None if mask is None else mask.expand(fixed.shape[0], *mask.shape[1:])
            stacked = similarity(torch.cat(windows), _repeated(fixed, times), _repeated(batch_mask, times))
            sums = box_sum(stacked, patch).unflatten(0, (len(group), -1)).amin(dim=0)
        best = sums if best is None else torch.minimum(best, sums, out=best)
    return best if patch == 1 else best.div_(box_count(spatial, patch, best))


def _repeated(tensor: Tensor | None, times: int) -> Tensor | None:
    """``tensor`` ``(B, …)`` repeated ``times`` along the batch axis ``(times·B, …)``, matching stacked shifts."""
    return None if tensor is None else tensor.expand(times, *tensor.shape).flatten(0, 1)


def foreground(fixed: Tensor, warped: Tensor, mask: Tensor | None = None, floor: float = 0.01) -> Tensor:
    """Voxels ``(B, 1, *spatial)`` (bool) where either image holds signal: above ``floor`` × its own maximum.

    Robust statistics over a whole skull-stripped or masked image would see mostly exact zeros
    (median and MAD 0); this keeps the voxels that can carry a residual. Inside ``mask`` when given.
    """

    def signal(image: Tensor) -> Tensor:
        magnitude = image.detach().abs().amax(dim=1, keepdim=True)
        peak = magnitude.flatten(1).amax(1).view(-1, *[1] * (magnitude.ndim - 1))
        return magnitude > floor * peak

    inside = signal(fixed) | signal(warped)
    return inside if mask is None else inside & (mask > 0.5)


def kept_mass(weight: Tensor | None, residual: Tensor, mask: Tensor | None = None) -> Tensor:
    """``Σ w·r / Σ r`` over the voxels inside ``mask``: the share of the data term a weight map keeps (1: all)."""
    if weight is None:
        return residual.new_ones(())
    total = masked_mean(residual.detach(), mask)
    return masked_mean(weight.detach() * residual.detach(), mask) / total.clamp_min(torch.finfo(total.dtype).tiny)


__all__ = [
    "CALIBRATIONS",
    "DEAD_ZONE_HALF",
    "DEAD_ZONE_K",
    "MAD_TO_SIGMA",
    "REFERENCE_LEVEL",
    "ROBUST_CALIBRATIONS",
    "ROBUST_SAMPLES",
    "SCORER_INPUTS",
    "SCORER_TARGETS",
    "TUKEY_C",
    "ResidualLevels",
    "RobustScale",
    "foreground",
    "integer_shifts",
    "kept_mass",
    "patch_mean",
    "robust_location_scale",
    "robust_operating_point",
    "shift_min_residual",
    "shifted",
]
