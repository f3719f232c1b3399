"""The closed-form robust control: AdaCS's pointwise optimum without a scoring network (docs/method.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..calibration import ROBUST_CALIBRATIONS, RobustScale
from ..correspondence import SCORER_TARGETS, kept_mass
from ..errors import ConfigError
from ..losses import DATA_WEIGHTINGS, closed_form_score, masked_mean
from ..objective import Direction, mean_of
from ..scorer_target import ScorerTarget
from .base import RegistrationModule
from .settings import WARMUP_EPOCHS

Tensor = torch.Tensor


class ClosedFormRobust(RegistrationModule):
    """Weights each residual by ``sg(S*)``, ``S* = clip(1 − r/(2α), 0, 1)`` computed from the current residual.

    ``S*`` minimises AdaCS's scorer loss ``S·r + α(1 − S)²`` voxel by voxel when ``L_smooth`` is
    left out, so this method is AdaCS without the learned, smooth, target-conditioned map: the
    gradient of a truncated-quadratic robust loss. It asks what the scoring network adds over a
    classical robust penalty. After ``warmup_epochs`` of the plain baseline (AdaCS's warm-up A)
    the weighting starts; there is no second network, so no warm-up B.

    Args:
        backbone: the registration network.
        alpha: ``α`` of the score regulariser it stands in for: residuals above ``2α`` (on squared
            error's scale, see :meth:`~adacs_lightning.similarity.Similarity.on_scorer_scale`) get weight 0.
        data_weighting: ``mean`` or ``normalised`` (as :class:`~adacs_lightning.AdaCS`).
        calibration: ``"fixed"`` (``S*`` from ``α`` on squared error's scale) or a robust scale of AdaCS's,
            ``"dead_zone"`` or ``"tukey"``, measured over the last warm-up epoch (``S*`` =
            :meth:`~adacs_lightning.calibration.RobustScale.optimum` of the target): the control for a
            robustly calibrated AdaCS.
        scorer_target: what ``S*`` is computed from: ``"residual"`` or ``"shift_min"`` (as AdaCS's;
            ``shift_radius``, ``shift_patch`` its shifts and patch).
        Others: see :class:`~adacs_lightning.methods.RegistrationModule`.
    """

    method_name = "robust"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        alpha: float = 0.02,
        data_weighting: str = "mean",
        calibration: str = "fixed",
        scorer_target: str = "residual",
        shift_radius: int = 2,
        shift_patch: int = 3,
        warmup_epochs: int = WARMUP_EPOCHS,
        **settings: Any,
    ):
        if alpha <= 0:
            raise ConfigError("alpha", f"must be positive, got {alpha}.", "AdaCS's default is 0.02.")
        if data_weighting not in DATA_WEIGHTINGS[:2]:
            raise ConfigError("data_weighting", f"must be 'mean' or 'normalised', got {data_weighting!r}.")
        if calibration not in ("fixed", *ROBUST_CALIBRATIONS):
            raise ConfigError("calibration", f"must be 'fixed', 'dead_zone' or 'tukey', got {calibration!r}.")
        if scorer_target not in SCORER_TARGETS:
            raise ConfigError("scorer_target", f"must be one of {SCORER_TARGETS}, got {scorer_target!r}.")
        super().__init__(backbone, warmup_epochs=warmup_epochs, **settings)
        self.robust = RobustScale(calibration) if calibration in ROBUST_CALIBRATIONS else None
        self.correspondence = ScorerTarget(
            self.similarity, scorer_target, shift_radius, shift_patch, robust=self.robust
        )

    def weight_map(self, fixed: Tensor, residual: Tensor, warped: Tensor | None = None) -> Tensor:
        if warped is None and self.hparams.scorer_target == "shift_min":
            raise ValueError("scorer_target='shift_min' needs the warped source")
        (target,) = self.correspondence.maps([warped], [fixed], [residual])
        if self.robust is not None:
            return self.robust.optimum(target)
        return closed_form_score(self.similarity.on_scorer_scale(target), self.hparams.alpha)

    def _observe(self, directions: list[Direction], mask: Tensor | None) -> None:
        """A robust calibration measures its scale over the last warm-up epoch and fixes it when weighting starts."""
        if self.robust is None or self.robust.measured:
            return
        weighting = self.current_epoch >= self.hparams.warmup_epochs
        if self.current_epoch == self.hparams.warmup_epochs - 1 or (weighting and self.robust.observed == 0):
            warped, fixed, residuals = ([d.warped for d in directions], [d.fixed for d in directions],
                                        [d.residual for d in directions])  # fmt: skip
            self.correspondence.observe(self.correspondence.maps(warped, fixed, residuals, mask), warped, fixed, mask)
        if weighting:
            self.correspondence.fix(self._mean_over_ranks)

    def configure_optimizers(self):
        return self.backbone_optimizer()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        cycle = self._cycle(batch_idx)
        directions = self._register(batch)
        mask = batch.get("mask")
        weights = [None] * len(directions)
        logs: dict[str, Tensor] = {}
        self._observe(directions, mask)
        if self.current_epoch >= self.hparams.warmup_epochs:
            weights = [self.weight_map(d.fixed, d.residual, d.warped) for d in directions]
            logs["train/score_mean"] = mean_of(masked_mean(w, mask) for w in weights)
            logs["train/kept_mass"] = mean_of(kept_mass(w, d.residual, mask) for w, d in zip(weights, directions))
        loss, _, backbone_logs = self.objective(directions, weights, mask, self.hparams.data_weighting)
        self._check_finite(batch_idx, {"L_de": loss})
        self._accumulate(loss, cycle, self.optimizers())
        self._log_training({**logs, **backbone_logs}, directions[0].fixed.shape[0])
