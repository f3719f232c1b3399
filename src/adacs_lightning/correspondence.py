"""What the scorer learns from: a residual that no small displacement removes, on a scale the data sets.

Two settings of :class:`~adacs_lightning.AdaCS` (docs/method.md, *Calibration* and *The scorer's target*):

* ``scorer_target="shift_min"``: the scorer weights :func:`shift_min_residual`, the residual left
  after the best local integer translation of a small patch. A residual that a displacement of a
  few voxels removes is *misalignment*: it carries the registration signal and keeps its weight. A
  residual that no nearby displacement removes is *no correspondence* (a drop-out, a lesion, a
  structure in one image only): that is what the score should fall on.
* ``calibration="data"``: the paper's α, β and κ were set for residuals near
  :data:`REFERENCE_LEVEL` (0.02, squared intensity on its echo data). :class:`ResidualLevels`
  measures the data's own level over the last epoch of warm-up A, and the scorer sees
  ``r · REFERENCE_LEVEL / level`` while κ is read on the paper's scale (``κ/50 / level`` of the
  data term; 50 by default), so the constants keep their meaning on any data.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from .losses import masked_mean
from .similarity import SQUARED_ERROR_KAPPA, Similarity

Tensor = torch.Tensor

#: What ``L_ucs`` weights: the residual itself (the paper) or its minimum over small local shifts.
SCORER_TARGETS = ("residual", "shift_min")
#: Where the scorer's operating point comes from: the paper's constants, or the data's residual level.
CALIBRATIONS = ("fixed", "data")
#: The residual level the paper's α (0.02), β and κ (50 = 1/0.02) were set for, in squared intensity.
REFERENCE_LEVEL = 1.0 / SQUARED_ERROR_KAPPA


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


def patch_mean(residual: Tensor, patch: int) -> Tensor:
    """The mean of ``residual`` ``(B, 1, *spatial)`` over a ``patch``-voxel box around each voxel (1: itself)."""
    if patch <= 1:
        return residual
    pool = F.avg_pool2d if residual.ndim == 4 else F.avg_pool3d
    return pool(residual, kernel_size=patch, stride=1, padding=patch // 2, count_include_pad=False)


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
        patch: the box, in voxels, a shift must explain at once; 1 compares single voxels, which noise
            lets a shift match by chance.

    Returns ``(B, 1, *spatial)`` in ``r``'s units, no gradient; never above ``patch_mean(r)`` at δ = 0.
    """
    if radius < 0 or patch < 1:
        raise ValueError(f"radius must be ≥ 0 and patch ≥ 1, got {radius} and {patch}")
    best: Tensor | None = None
    for offset in integer_shifts(warped.ndim - 2, radius):
        candidate = patch_mean(similarity(shifted(warped, offset), fixed, mask), patch)
        best = candidate if best is None else torch.minimum(best, candidate)
    return best


class ResidualLevels(nn.Module):
    """The data's residual levels over the last epoch of warm-up A, fixed once measured (buffers: checkpointed).

    ``scorer``: the mean of the scorer's target map; ``data``: the mean of the backbone's data term
    (``μ`` with ``Ŝ ≡ 1``). Both are 0 until :meth:`fix` has run. The running sums are each process's
    own (not buffers, which DDP would overwrite with the first process's) and are averaged over the
    processes in :meth:`fix`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scorer", torch.zeros(()))
        self.register_buffer("data", torch.zeros(()))
        self._sums: Tensor | None = None  # (scorer sum, data sum), this process's
        self.observed = 0
        self._measured = False  # cached: once fixed, no device sync per step

    @property
    def measured(self) -> bool:
        if not self._measured:
            self._measured = bool(self.scorer > 0)
        return self._measured

    @torch.no_grad()
    def observe(self, scorer_target: Tensor, data_term: Tensor, mask: Tensor | None = None) -> None:
        """Add one micro-batch: its scorer target map ``(B, 1, *spatial)`` and its data term (a scalar)."""
        values = torch.stack([masked_mean(scorer_target.float(), mask), data_term.detach().float()])
        self._sums = values if self._sums is None else self._sums + values
        self.observed += 1

    @torch.no_grad()
    def fix(self, reduce=lambda t: t) -> None:
        """Set the levels from what was observed; ``reduce`` averages over data-parallel processes (every one calls it)."""
        if self._sums is None:
            raise RuntimeError("no residual observed to calibrate the scorer with")
        tiny = torch.finfo(torch.float32).tiny
        means = reduce(self._sums / self.observed).clamp_min(tiny)
        self.scorer.copy_(means[0])
        self.data.copy_(means[1])
        self._measured = True

    def extra_repr(self) -> str:
        return f"scorer={float(self.scorer):.4g}, data={float(self.data):.4g}" if self.measured else "not measured"


__all__ = [
    "CALIBRATIONS",
    "REFERENCE_LEVEL",
    "SCORER_TARGETS",
    "ResidualLevels",
    "integer_shifts",
    "patch_mean",
    "shift_min_residual",
    "shifted",
]
