"""The scale the scorer's target is shown on, measured from the data (docs/method.md, *Calibration*).

The paper's α (0.02), β and κ were set for residuals near :data:`REFERENCE_LEVEL` (squared intensity
on its echo data). Two ways to carry them to any data, both measured over the last epoch of warm-up A:

* ``calibration="data"`` (:class:`ResidualLevels`): the mean levels of the scorer's target and of the
  backbone's data term; the scorer sees ``t · REFERENCE_LEVEL / level`` and κ is read on the paper's
  scale (``κ/50 / level`` of the data term; 50 by default).
* ``calibration="tukey"`` / ``"dead_zone"`` (:class:`RobustScale`): the median and MAD of the target over
  the images' foreground set where the score falls, so that residuals within the noise keep Ŝ* ≈ 1
  (Tukey) or exactly 1 (the dead zone), whatever share of the voxels lies outside it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .losses import masked_mean
from .similarity import SQUARED_ERROR_KAPPA

Tensor = torch.Tensor

#: Where the scorer's operating point comes from: the paper's constants, the data's mean residual level,
#: or robust statistics of the target (a Tukey point, or a dead zone that keeps every inlier at Ŝ* = 1).
CALIBRATIONS = ("fixed", "data", "tukey", "dead_zone")
#: The calibrations set from the median and MAD of the scorer's target (:class:`RobustScale`).
ROBUST_CALIBRATIONS = ("tukey", "dead_zone")
#: σ̂ = MAD_TO_SIGMA · MAD for Gaussian errors.
MAD_TO_SIGMA = 1.4826
#: Tukey's biweight saturation in units of σ̂: 95 % efficiency on Gaussian errors.
TUKEY_C = 4.685
#: The dead zone: Ŝ* = 1 below median + k·σ̂ (k = 3), 0.5 at median + 5·σ̂.
DEAD_ZONE_K, DEAD_ZONE_HALF = 3.0, 5.0
#: Values of the target kept per micro-batch for the robust statistics (an evenly strided subsample).
ROBUST_SAMPLES = 1 << 15
#: The residual level the paper's α (0.02), β and κ (50 = 1/0.02) were set for, in squared intensity.
REFERENCE_LEVEL = 1.0 / SQUARED_ERROR_KAPPA


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
    (:func:`robust_operating_point`). The statistics come from a subsample of the target over the images'
    foreground (:func:`~adacs_lightning.correspondence.foreground`) through the last epoch of warm-up A; with
    ``momentum`` > 0 each later micro-batch also moves them (an exponential moving average, as iteratively
    reweighted least squares re-estimates its scale). Buffers: checkpoints hold them.
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


__all__ = [
    "CALIBRATIONS",
    "DEAD_ZONE_HALF",
    "DEAD_ZONE_K",
    "MAD_TO_SIGMA",
    "REFERENCE_LEVEL",
    "ROBUST_CALIBRATIONS",
    "ROBUST_SAMPLES",
    "TUKEY_C",
    "ResidualLevels",
    "RobustScale",
    "robust_location_scale",
    "robust_operating_point",
]
