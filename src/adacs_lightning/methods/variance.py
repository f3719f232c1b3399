"""Variance-weighted alternatives to AdaCS: heteroscedastic Gaussian NLL and β-NLL.

The methods the paper compares against: a variance network ``h_ψ(I_t) → log σ²`` (a MONAI
U-Net on the target, like the scorer but without the sigmoid) is trained jointly with the
backbone on the per-voxel negative log-likelihood of the squared residual,
``0.5·(r/σ² + log σ²)``; β-NLL (Seitzer et al., 2022) weights each voxel's term by
``sg(σ^{2β})``. Validation, checkpoints and the exported backbone are the base module's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..losses import beta_nll, masked_mean
from ..objective import mean_of
from ..schedule import Phase
from ..scoring import map_unet
from .base import RegistrationModule

Tensor = torch.Tensor


class LogVarianceNetwork(nn.Module):
    """A MONAI U-Net predicting ``log σ²`` per voxel, floored smoothly at ``log(min_variance)``.

    Input ``(B, in_channels, *spatial)``; output ``(B, 1, *spatial)``,
    ``log(exp(raw) + min_variance)`` (squared intensity units). The floor keeps the NLL
    bounded where the residual is zero. Spatial sizes must divide by the product of ``strides``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 32, 32),
        strides: Sequence[int] | None = None,
        num_res_units: int = 0,
        min_variance: float = 1e-6,
    ) -> None:
        super().__init__()
        if min_variance <= 0:
            raise ConfigError("variance_net.min_variance", f"must be positive, got {min_variance}.", "Use e.g. 1e-6.")
        self.unet = map_unet(spatial_dims, in_channels, channels, strides, num_res_units)
        self.log_floor = math.log(min_variance)

    def forward(self, image: Tensor) -> Tensor:
        raw = self.unet(image)
        return torch.logaddexp(raw, torch.full_like(raw, self.log_floor))


class VarianceWeighted(RegistrationModule):
    """Trains a backbone with a learned per-voxel variance: Gaussian NLL (``beta_nll=0``) or β-NLL.

    Loss per step, both networks updated by one Adam optimiser (two parameter groups):
    ``mean(sg(σ^{2β}) · 0.5·(r/σ² + log σ²)) + λ·mean‖∇û‖²`` inside the field-of-view mask, ``r``
    the similarity's map (a likelihood of the squared error; for other maps a robust-loss reading).
    During the first ``warmup_epochs`` epochs the backbone trains alone on the baseline's loss.

    Args:
        backbone: the registration network.
        variance_net: maps the fixed image ``(B, C, *spatial)`` to ``log σ²`` ``(B, 1, *spatial)``;
            a :class:`LogVarianceNetwork` when omitted.
        beta_nll: ``β`` of β-NLL; 0 gives the plain heteroscedastic NLL.
        variance_lr: Adam learning rate of the variance network (``lr`` when None).
        Others: see :class:`~adacs_lightning.methods.RegistrationModule`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        variance_net: nn.Module | None = None,
        *,
        beta_nll: float = 0.0,
        variance_lr: float | None = None,
        **settings: Any,
    ) -> None:
        if beta_nll < 0:
            raise ConfigError("beta_nll", f"must be non-negative, got {beta_nll}.", "Seitzer et al. use 0.5.")
        if variance_lr is not None and variance_lr <= 0:
            raise ConfigError("variance_lr", f"must be positive, got {variance_lr}.", "Use null to share lr.")
        super().__init__(backbone, **settings)
        self.variance = (
            variance_net
            if variance_net is not None
            else LogVarianceNetwork(self.backbone.spatial_dims, self.backbone.in_channels)
        )

    @property
    def method_name(self) -> str:  # type: ignore[override]
        return "nll" if self.hparams.beta_nll == 0 else "beta_nll"

    @property
    def weighting_networks(self) -> list[nn.Module]:
        return [self.variance]

    def score_map(self, target: Tensor) -> Tensor:
        """The relative weight the loss gives each voxel's residual, ``σ^{2β}/σ²`` scaled to max 1 per image.

        ``(B, 1, *spatial)`` in [0, 1]; shown in the score panel of the figures.
        """
        weight = torch.exp((self.hparams.beta_nll - 1.0) * self.variance(target))
        return weight / weight.flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (weight.ndim - 1))

    def weight_map(self, fixed: Tensor, residual: Tensor, warped: Tensor | None = None) -> Tensor:
        return self.score_map(fixed)

    def configure_optimizers(self):
        variance_lr = self.hparams.variance_lr or self.hparams.lr
        return torch.optim.Adam(
            [
                {"params": self.backbone.parameters(), "lr": self.hparams.lr},
                {"params": self.variance.parameters(), "lr": variance_lr},
            ]
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        cycle = self._cycle(batch_idx)
        directions = self._register(batch)
        mask = batch.get("mask")
        logs: dict[str, Tensor] = {"train/mse": mean_of(masked_mean(d.residual, mask) for d in directions)}
        nll = None
        if self.phase is Phase.JOINT:
            log_variances = [self.variance(d.fixed) for d in directions]
            nll = mean_of(
                beta_nll(d.residual, v, self.hparams.beta_nll, mask) for d, v in zip(directions, log_variances)
            )
            logs["train/log_variance"] = mean_of(masked_mean(v.detach(), mask) for v in log_variances)
        loss, _, backbone_logs = self.objective(directions, [None] * len(directions), mask, data=nll)
        self._check_finite(batch_idx, {"loss": loss})
        self._accumulate(loss, cycle, self.optimizers())
        self._log_training({**logs, **backbone_logs, "train/loss": loss}, directions[0].fixed.shape[0])
