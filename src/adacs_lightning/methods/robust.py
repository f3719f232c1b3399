"""The closed-form robust control: AdaCS's pointwise optimum without a scoring network (docs/method.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..losses import DATA_WEIGHTINGS, closed_form_score, masked_mean
from ..objective import mean_of
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
        Others: see :class:`~adacs_lightning.methods.RegistrationModule`.
    """

    method_name = "robust"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        alpha: float = 0.02,
        data_weighting: str = "mean",
        warmup_epochs: int = WARMUP_EPOCHS,
        **settings: Any,
    ):
        if alpha <= 0:
            raise ConfigError("alpha", f"must be positive, got {alpha}.", "AdaCS's default is 0.02.")
        if data_weighting not in DATA_WEIGHTINGS[:2]:
            raise ConfigError("data_weighting", f"must be 'mean' or 'normalised', got {data_weighting!r}.")
        super().__init__(backbone, warmup_epochs=warmup_epochs, **settings)

    def weight_map(self, fixed: Tensor, residual: Tensor) -> Tensor:
        return closed_form_score(self.similarity.on_scorer_scale(residual), self.hparams.alpha)

    def configure_optimizers(self):
        return self.backbone_optimizer()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        cycle = self._cycle(batch_idx)
        directions = self._register(batch)
        mask = batch.get("mask")
        weights = [None] * len(directions)
        logs: dict[str, Tensor] = {}
        if self.current_epoch >= self.hparams.warmup_epochs:
            weights = [self.weight_map(d.fixed, d.residual) for d in directions]
            logs["train/score_mean"] = mean_of(masked_mean(w, mask) for w in weights)
        loss, _, backbone_logs = self.objective(directions, weights, mask, self.hparams.data_weighting)
        self._check_finite(batch_idx, {"L_de": loss})
        self._accumulate(loss, cycle, self.optimizers())
        self._log_training({**logs, **backbone_logs}, directions[0].fixed.shape[0])
