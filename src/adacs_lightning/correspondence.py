"""What the scorer learns from: a residual that no small displacement removes, on a scale the data sets.

Two settings of :class:`~adacs_lightning.AdaCS` (docs/method.md, *Calibration* and *The scorer's target*):

* ``scorer_target="shift_min"``: the scorer weights :func:`shift_min_residual`, the residual left
  after the best local integer translation of a small patch. A residual that a displacement of a
  few voxels removes is *misalignment*: it carries the registration signal and keeps its weight. A
  residual that no nearby displacement removes is *no correspondence* (a drop-out, a lesion, a
  structure in one image only): that is what the score should fall on.
* ``calibration="tukey"`` / ``"dead_zone"`` (:class:`RobustScale`): the median and MAD of the target over
  the images' foreground set where the score falls, so that residuals within the noise keep Ŝ* ≈ 1
  (Tukey) or exactly 1 (the dead zone), whatever share of the voxels lies outside it.
* ``calibration="data"``: the paper's α, β and κ were set for residuals near
  :data:`REFERENCE_LEVEL` (0.02, squared intensity on its echo data). :class:`ResidualLevels`
  measures the data's own level over the last epoch of warm-up A, and the scorer sees
  ``r · REFERENCE_LEVEL / level`` while κ is read on the paper's scale (``κ/50 / level`` of the
  data term; 50 by default), so the constants keep their meaning on any data.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .losses import masked_mean
from .similarity import SQUARED_ERROR_KAPPA, Similarity

Tensor = torch.Tensor

#: What ``L_ucs`` weights: the residual itself (the paper) or its minimum over small local shifts.
SCORER_TARGETS = ("residual", "shift_min")
#: Where the scorer's operating point comes from: the paper's constants, the data's mean residual level,
#: or robust statistics of the target (a Tukey point, or a dead zone that keeps every inlier at Ŝ* = 1).
CALIBRATIONS = ("fixed", "data", "tukey", "dead_zone")
#: The calibrations set from the median and MAD of the scorer's target (:class:`RobustScale`).
ROBUST_CALIBRATIONS = ("tukey", "dead_zone")
#: What the scorer sees: the target image alone (the paper), or the target and the warped source.
SCORER_INPUTS = ("target", "pair")
#: σ̂ = MAD_TO_SIGMA · MAD for Gaussian errors.
MAD_TO_SIGMA = 1.4826
#: Tukey's biweight saturation in units of σ̂: 95 % efficiency on Gaussian errors.
TUKEY_C = 4.685
#: The dead zone: Ŝ* = 1 below median + k·σ̂ (k = 3), 0.5 at median + 5·σ̂.
DEAD_ZONE_K, DEAD_ZONE_HALF = 3.0, 5.0
#: Values of the target kept per micro-batch for the robust statistics (a random subsample).
ROBUST_SAMPLES = 1 << 15
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


#: Shifted candidates pooled in one call: bounds the memory of a 3D shift search (125 shifts at radius 2).
SHIFTS_PER_POOL = 25


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
    The source is padded once (border replicated) and each shift is a view of it; the candidates'
    patch means are pooled :data:`SHIFTS_PER_POOL` at a time and folded into a running minimum.
    Equal to :func:`shifted` per shift, one pooling each (tests/test_correspondence.py).
    """
    if radius < 0 or patch < 1:
        raise ValueError(f"radius must be ≥ 0 and patch ≥ 1, got {radius} and {patch}")
    ndim, spatial = warped.ndim - 2, warped.shape[2:]
    padded = F.pad(warped, [radius] * (2 * ndim), mode="replicate") if radius else warped
    best: Tensor | None = None
    offsets = integer_shifts(ndim, radius)
    for start in range(0, len(offsets), SHIFTS_PER_POOL):
        group = offsets[start : start + SHIFTS_PER_POOL]
        candidates = []
        for offset in group:
            window = (slice(None), slice(None)) + tuple(
                slice(radius + o, radius + o + n) for o, n in zip(offset, spatial)
            )
            candidates.append(similarity(padded[window], fixed, mask))
        pooled = patch_mean(torch.cat(candidates, dim=0), patch).unflatten(0, (len(group), -1)).amin(dim=0)
        best = pooled if best is None else torch.minimum(best, pooled, out=best)
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


def robust_location_scale(values: Tensor) -> tuple[Tensor, Tensor]:
    """``(median, σ̂ = 1.4826·MAD)`` of a 1-D tensor (``torch.median``: exact, no size limit).

    Where more than half the values are equal (MAD 0), σ̂ falls back to ``√(π/2)·mean|v − median|``,
    the mean absolute deviation's estimate of σ, so that a scale is never 0 while values differ.
    """
    median = values.median()
    deviation = (values - median).abs()
    sigma = MAD_TO_SIGMA * deviation.median()
    return median, torch.where(sigma > 0, sigma, math.sqrt(math.pi / 2) * deviation.mean())


def robust_operating_point(
    median: Tensor, sigma: Tensor, calibration: str, tukey_c: float = TUKEY_C, dead_zone=(DEAD_ZONE_K, DEAD_ZONE_HALF)
) -> tuple[Tensor, Tensor]:
    """``(τ, h)`` of a robust calibration, in the target's units: Ŝ* = 1 up to ``τ`` and 0.5 at ``h``.

    * ``tukey``: the target read as a squared error ``e²`` with ``σ̂² = 1.4826²·median`` (the MAD of ``e``);
      ``τ = 0`` and ``h = c²·σ̂²``, so Ŝ* = 1 − e²/(2c²σ̂²) is 0.5 where ``|e| = c·σ̂``.
    * ``dead_zone``: ``τ = median + k·σ̂`` and ``h = median + k_½·σ̂`` with the MAD of the target itself.
    """
    if calibration == "tukey":
        return torch.zeros_like(median), (tukey_c * MAD_TO_SIGMA) ** 2 * median
    if calibration == "dead_zone":
        k, half = dead_zone
        return median + k * sigma, median + half * sigma
    raise ValueError(f"not a robust calibration: {calibration!r} (one of {ROBUST_CALIBRATIONS})")


class RobustScale(nn.Module):
    """Where the scorer's optimum falls, from the median and MAD of its target (``calibration="tukey"|"dead_zone"``).

    The scorer's optimum is Ŝ* = clip(1 − t'/(2α), 0, 1) for the target ``t'`` it sees; :meth:`on_scorer_scale`
    shows it ``t' = α·(t − τ)₊/(h − τ)``, so that Ŝ* = 1 up to ``τ`` and 0.5 at ``h`` whatever α is
    (:func:`robust_operating_point`). The statistics come from a random subsample of the target over the
    images' foreground (:func:`foreground`) through the last epoch of warm-up A; with ``momentum`` > 0 each
    later micro-batch also moves them (an exponential moving average, as iteratively reweighted least
    squares re-estimates its scale). Buffers: checkpoints hold them.
    """

    def __init__(
        self, calibration: str, tukey_c: float = TUKEY_C, dead_zone=(DEAD_ZONE_K, DEAD_ZONE_HALF), momentum: float = 0.0
    ) -> None:
        super().__init__()
        if calibration not in ROBUST_CALIBRATIONS:
            raise ValueError(f"calibration must be one of {ROBUST_CALIBRATIONS}, got {calibration!r}")
        self.calibration, self.tukey_c, self.dead_zone = calibration, float(tukey_c), tuple(map(float, dead_zone))
        self.momentum = float(momentum)
        self.register_buffer("median", torch.zeros(()))
        self.register_buffer("sigma", torch.zeros(()))
        self.register_buffer("threshold", torch.zeros(()))  # τ
        self.register_buffer("midpoint", torch.zeros(()))  # h
        self._samples: list[Tensor] = []
        self._measured = False

    @property
    def measured(self) -> bool:
        if not self._measured:
            self._measured = bool(self.midpoint > 0)
        return self._measured

    @property
    def observed(self) -> int:
        return len(self._samples)

    @staticmethod
    def sample(target: Tensor, inside: Tensor, count: int = ROBUST_SAMPLES) -> Tensor:
        """Up to ``count`` values of ``target`` at the voxels ``inside``, evenly strided (no random draw: the
        training's random stream stays as it was)."""
        values = target.detach().float()[inside.expand_as(target)]
        stride = -(-values.numel() // count)
        return values[::stride] if stride > 1 else values

    @torch.no_grad()
    def observe(self, target: Tensor, inside: Tensor) -> None:
        """Keep a subsample of ``target`` ``(B, 1, *spatial)`` over the voxels ``inside`` (bool, same shape)."""
        values = self.sample(target, inside)
        if values.numel():
            self._samples.append(values)
        if self.measured and self.momentum > 0 and values.numel():
            median, sigma = robust_location_scale(values)
            self._set(self.momentum * self.median + (1 - self.momentum) * median,
                      self.momentum * self.sigma + (1 - self.momentum) * sigma)  # fmt: skip
            self._samples.clear()

    @torch.no_grad()
    def fix(self, reduce=lambda t: t) -> None:
        """Set median, σ̂, τ and h from the samples; ``reduce`` averages over data-parallel processes."""
        if not self._samples:
            raise RuntimeError("no target observed to calibrate the scorer with")
        median, sigma = robust_location_scale(torch.cat(self._samples))
        stats = reduce(torch.stack([median, sigma]))
        self._set(stats[0], stats[1])
        self._samples.clear()
        self._measured = True

    def _set(self, median: Tensor, sigma: Tensor) -> None:
        tiny = torch.finfo(torch.float32).tiny
        self.median.copy_(median)
        self.sigma.copy_(sigma)
        threshold, half = robust_operating_point(median, sigma, self.calibration, self.tukey_c, self.dead_zone)
        self.threshold.copy_(threshold)
        self.midpoint.copy_(torch.maximum(half, threshold + tiny).clamp_min(tiny))

    def on_scorer_scale(self, target: Tensor, alpha: float) -> Tensor:
        """``α·(t − τ)₊/(h − τ)``: the target as the scorer sees it (Ŝ* = 1 below τ, 0.5 at h)."""
        return (target - self.threshold).clamp_min(0.0) * (alpha / (self.midpoint - self.threshold))

    def optimum(self, target: Tensor) -> Tensor:
        """Ŝ* ``(same shape)``: the scorer's per-voxel optimum at this scale, ``clip(1 − (t − τ)₊/(2(h − τ)), 0, 1)``."""
        return (1.0 - (target - self.threshold).clamp_min(0.0) / (2.0 * (self.midpoint - self.threshold))).clamp(
            0.0, 1.0
        )

    def inliers(self, target: Tensor) -> Tensor:
        """``(same shape)`` bool: the voxels whose target lies within the dead zone (``t ≤ τ``; none for Tukey)."""
        if self.calibration == "tukey":
            return torch.zeros_like(target, dtype=torch.bool)
        return target <= self.threshold

    def extra_repr(self) -> str:
        if not self.measured:
            return f"{self.calibration}, not measured"
        return (
            f"{self.calibration}, median={float(self.median):.4g}, sigma={float(self.sigma):.4g}, "
            f"threshold={float(self.threshold):.4g}, midpoint={float(self.midpoint):.4g}"
        )


class ScorerTarget:
    """What a run's scorer learns from, and on what scale (docs/method.md, *What the scorer learns from*).

    The target map (``"residual"``: ``r`` itself; ``"shift_min"``: :func:`shift_min_residual`) and its
    calibration: the similarity's fixed scale (``levels`` and ``robust`` None), the data's mean level
    (:class:`ResidualLevels`) or a robust scale (:class:`RobustScale`, with the levels for κ). The levels
    and the scale are the method's own submodules (their buffers keep their checkpoint names); this
    object holds references to them and the rules that use them.
    """

    def __init__(
        self,
        similarity: Similarity,
        kind: str = "shift_min",
        radius: int = 2,
        patch: int = 3,
        levels: ResidualLevels | None = None,
        robust: RobustScale | None = None,
    ) -> None:
        if kind not in SCORER_TARGETS:
            raise ValueError(f"the scorer's target must be one of {SCORER_TARGETS}, got {kind!r}")
        self.similarity, self.kind, self.radius, self.patch = similarity, kind, int(radius), int(patch)
        self.levels, self.robust = levels, robust

    def maps(
        self,
        warped: list[Tensor],
        fixed: list[Tensor],
        residuals: list[Tensor],
        mask: Tensor | None = None,
        detach: bool = True,
    ) -> list[Tensor]:
        """The target of each direction ``(B, 1, *spatial)`` in ``r``'s units, from its warped source, fixed image
        and residual; ``detach=False`` keeps the residual's graph (``"residual"`` only: the reference's leak)."""
        if self.kind == "residual":
            return [r.detach() if detach else r for r in residuals]
        return [shift_min_residual(self.similarity, w.detach(), f, mask, self.radius, self.patch)
                for w, f in zip(warped, fixed)]  # fmt: skip

    def on_scorer_scale(self, target: Tensor, alpha: float) -> Tensor:
        """The target as the scorer sees it: on the robust scale, at the paper's level, or the similarity's."""
        if self.robust is not None:
            return self.robust.on_scorer_scale(target, alpha)
        if self.levels is None:
            return self.similarity.on_scorer_scale(target)
        return target * (REFERENCE_LEVEL / self.levels.scorer)

    @property
    def measured(self) -> bool:
        """Whether the scale is set (always, for the fixed scale)."""
        if self.levels is not None:
            return self.levels.measured
        return self.robust is None or self.robust.measured

    @property
    def tracking(self) -> bool:
        """A measured robust scale that keeps moving (``scale_momentum`` > 0)."""
        return self.robust is not None and self.robust.momentum > 0 and self.robust.measured

    @torch.no_grad()
    def observe(
        self,
        targets: list[Tensor],
        warped: list[Tensor],
        fixed: list[Tensor],
        mask: Tensor | None = None,
        data_term: Tensor | None = None,
    ) -> None:
        """One micro-batch's targets (and its data term, for the levels); a tracked scale moves instead."""
        stacked = torch.cat(targets, dim=0)
        if self.levels is not None and not self.tracking:
            repeated = None if mask is None else mask.repeat(len(targets), *[1] * (mask.ndim - 1))
            self.levels.observe(stacked, data_term, repeated)
        if self.robust is not None:
            inside = torch.cat([foreground(f, w, mask) for f, w in zip(fixed, warped)], dim=0)
            self.robust.observe(stacked, inside)

    @torch.no_grad()
    def fix(self, reduce=lambda t: t) -> str:
        """Set the scale from what was observed (``reduce`` averages over data-parallel processes); says what it set."""
        if self.levels is not None:
            self.levels.fix(reduce)
        if self.robust is not None:
            self.robust.fix(reduce)
            r = self.robust
            return (
                f"the scorer's target ({self.kind}) has median {float(r.median):.4g} and σ̂ {float(r.sigma):.4g}; "
                f"Ŝ* = 1 below {float(r.threshold):.4g} and 0.5 at {float(r.midpoint):.4g} ({r.calibration})"
            )
        return f"the scorer's target level {float(self.levels.scorer):.4g} (shown to it as {REFERENCE_LEVEL})"


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
    "ROBUST_CALIBRATIONS",
    "SCORER_INPUTS",
    "TUKEY_C",
    "RobustScale",
    "ScorerTarget",
    "foreground",
    "kept_mass",
    "robust_location_scale",
    "robust_operating_point",
    "REFERENCE_LEVEL",
    "SCORER_TARGETS",
    "ResidualLevels",
    "integer_shifts",
    "patch_mean",
    "shift_min_residual",
    "shifted",
]
