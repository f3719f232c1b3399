"""What a run's scorer learns from, on what scale, and when that scale is measured (docs/method.md).

:class:`ScorerTarget` joins a target map of :mod:`~adacs_lightning.correspondence` (the residual, or
its minimum over small shifts) to a scale of :mod:`~adacs_lightning.calibration` (the similarity's
fixed one, the data's mean level, or a robust scale), and holds the rule of the calibration: observe
the last epoch of warm-up A, fix the scale when scoring starts, and set κ on the paper's scale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .calibration import (
    DEAD_ZONE_HALF,
    DEAD_ZONE_K,
    REFERENCE_LEVEL,
    ROBUST_CALIBRATIONS,
    TUKEY_C,
    ResidualLevels,
    RobustScale,
)
from .correspondence import SCORER_TARGETS, foreground, shift_min_residual
from .losses import masked_mean, mean_of
from .similarity import SQUARED_ERROR_KAPPA, Similarity

Tensor = torch.Tensor


class Registered(Protocol):
    """One direction of a registered micro-batch (:class:`~adacs_lightning.objective.Direction`)."""

    warped: Tensor  # the warped source (B, C, *spatial)
    fixed: Tensor  # the fixed image, same shape
    residual: Tensor  # r (B, 1, *spatial), the similarity's units


class ScorerTarget:
    """What a run's scorer learns from, and on what scale (docs/method.md, *What the scorer learns from*).

    The target map (``"residual"``: ``r`` itself; ``"shift_min"``:
    :func:`~adacs_lightning.correspondence.shift_min_residual`) and its calibration: the similarity's fixed
    scale (``levels`` and ``robust`` None), the data's mean level (:class:`~adacs_lightning.calibration.ResidualLevels`)
    or a robust scale (:class:`~adacs_lightning.calibration.RobustScale`, with the levels for κ). The levels
    and the scale are the method's own submodules (their buffers keep their checkpoint names); this
    object holds references to them and the rules that use them. ``kappa``: κ on the paper's scale, which
    the levels turn into the data's (50 puts ``b_T = 0`` at the measured level of the data term).
    """

    def __init__(
        self,
        similarity: Similarity,
        kind: str = "shift_min",
        radius: int = 2,
        patch: int = 3,
        levels: ResidualLevels | None = None,
        robust: RobustScale | None = None,
        kappa: float = SQUARED_ERROR_KAPPA,
    ) -> None:
        if kind not in SCORER_TARGETS:
            raise ValueError(f"the scorer's target must be one of {SCORER_TARGETS}, got {kind!r}")
        self.similarity, self.kind, self.radius, self.patch = similarity, kind, int(radius), int(patch)
        self.levels, self.robust, self.kappa = levels, robust, float(kappa)

    @classmethod
    def calibrated(
        cls,
        similarity: Similarity,
        kind: str = "shift_min",
        radius: int = 2,
        patch: int = 3,
        calibration: str = "fixed",
        tukey_c: float = TUKEY_C,
        dead_zone: tuple[float, float] = (DEAD_ZONE_K, DEAD_ZONE_HALF),
        momentum: float = 0.0,
        kappa: float | str | None = None,
    ) -> ScorerTarget:
        """A target on the scale ``calibration`` names, with new, unmeasured levels and robust scale: every calibration
        but ``"fixed"`` measures the levels (κ is set from them), ``"tukey"`` and ``"dead_zone"`` a robust scale too.
        ``kappa``: the run's κ setting; a number is read on the paper's scale, None or ``"auto"`` is 50."""
        if calibration == "fixed":
            return cls(similarity, kind, radius, patch)
        levels = ResidualLevels()
        robust = RobustScale(calibration, tukey_c, dead_zone, momentum) if calibration in ROBUST_CALIBRATIONS else None
        paper_kappa = float(kappa) if isinstance(kappa, (int, float)) else SQUARED_ERROR_KAPPA
        return cls(similarity, kind, radius, patch, levels, robust, paper_kappa)

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

    def of(self, directions: Sequence[Registered], mask: Tensor | None = None, detach: bool = True) -> list[Tensor]:
        """:meth:`maps` of a micro-batch's registered directions, one ``(B, 1, *spatial)`` each."""
        warped, fixed, residuals = zip(*((d.warped, d.fixed, d.residual) for d in directions))
        return self.maps(list(warped), list(fixed), list(residuals), mask, detach)

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

    def calibrating(self, epoch: int, warmup_epochs: int) -> bool:
        """Whether ``epoch``'s targets feed the calibration: the last epoch of warm-up A, the levels unmeasured."""
        return self.levels is not None and not self.levels.measured and epoch == warmup_epochs - 1

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

    def calibrate(
        self,
        directions: Sequence[Registered],
        targets: list[Tensor] | None,
        mask: Tensor | None,
        calibrating: bool,
        scoring: bool,
        kappa: Tensor,
        reduce: Callable[[Tensor], Tensor] = lambda t: t,
        say: Callable[[str], object] = print,
    ) -> None:
        """One micro-batch of the calibration rule (``targets``: its directions', ``(B, 1, *spatial)`` each).

        Observes the targets and data term of the last epoch of warm-up A (``calibrating``); when ``scoring`` starts,
        fixes the scale (``reduce`` averages over data-parallel processes), sets ``kappa``, the momentum's κ buffer,
        to ``self.kappa/50/level`` of the data term and ``say``s what it set; a tracked robust scale keeps moving.
        Without a warm-up A (or when resuming past it unmeasured), the first scored micro-batch is the measurement.
        """
        if self.levels is None or (self.measured and not (self.tracking and scoring)):
            return
        if calibrating or (scoring and self.levels.observed == 0) or self.tracking:
            data = mean_of(masked_mean(d.residual.detach(), mask) for d in directions)
            self.observe(targets, [d.warped for d in directions], [d.fixed for d in directions], mask, data)
        if scoring and not self.measured:
            said = self.fix(reduce)
            kappa.copy_(self.kappa / SQUARED_ERROR_KAPPA / self.levels.data)
            level = float(self.levels.data)
            say(f"Calibrated to the data: {said}; the data term's level {level:.4g}: κ = {float(kappa):.4g}.")
