"""Variance-weighted alternatives to AdaCS: heteroscedastic Gaussian NLL and β-NLL.

The methods the paper compares against: a variance network ``h_ψ(I_t) → log σ²`` (a MONAI
U-Net on the target, like the scorer but without the sigmoid) is trained jointly with the
backbone on the per-voxel negative log-likelihood of the squared residual,
``0.5·(r/σ² + log σ²)``; β-NLL (Seitzer et al., 2022) weights each voxel's term by
``sg(σ^{2β})``. Validation, checkpoints and the exported backbone are AdaCS's.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.nets import UNet
from torch import nn

from .checkpoint import METHOD_KEY
from .errors import ConfigError
from .losses import beta_nll, gradient_energy, masked_mean, squared_residual
from .module import AdaCS
from .schedule import Phase

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
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if min_variance <= 0:
            raise ConfigError("min_variance", f"must be positive, got {min_variance}.", "Use e.g. 1e-6.")
        self.unet = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides) if strides is not None else (2,) * (len(channels) - 1),
            num_res_units=num_res_units,
        )
        self.log_floor = math.log(min_variance)

    def forward(self, image: Tensor) -> Tensor:
        raw = self.unet(image)
        return torch.logaddexp(raw, torch.full_like(raw, self.log_floor))


class VarianceWeighted(AdaCS):
    """Trains a backbone with a learned per-voxel variance: Gaussian NLL (``beta_nll=0``) or β-NLL.

    Loss per step, both networks updated by one Adam optimiser:
    ``mean(sg(σ^{2β}) · 0.5·(r/σ² + log σ²)) + λ·mean‖∇û‖²`` inside the field-of-view mask.
    During the first ``warmup_epochs`` epochs the backbone trains alone on the baseline's
    loss ``mean(r) + λ·mean‖∇û‖²``. Validation metrics, checkpoints and
    :meth:`export_backbone` are those of :class:`~adacs_lightning.AdaCS`.

    Args:
        backbone: the registration network.
        variance_net: maps the target ``(B, C, *spatial)`` to ``log σ²`` ``(B, 1, *spatial)``;
            a :class:`LogVarianceNetwork` when omitted.
        beta_nll: ``β`` of β-NLL; 0 gives the plain heteroscedastic NLL.
        lam: weight ``λ`` of the displacement smoothness.
        lr: Adam learning rate of the backbone; ``variance_lr`` that of the variance network
            (``lr`` when None).
        warmup_epochs: epochs of backbone-only training before the NLL starts (0: joint from the start).
        spatial_dims, in_channels, eval_labels, channels_last, compile: as for
            :class:`~adacs_lightning.AdaCS`.
    """

    def __init__(
        self,
        backbone: nn.Module,
        variance_net: nn.Module | None = None,
        *,
        beta_nll: float = 0.0,
        lam: float = 0.01,
        lr: float = 1e-4,
        variance_lr: float | None = None,
        warmup_epochs: int = 0,
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        eval_labels: Sequence[int] | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        if beta_nll < 0:
            raise ConfigError("beta_nll", f"must be non-negative, got {beta_nll}.", "Seitzer et al. use 0.5.")
        if variance_lr is not None and variance_lr <= 0:
            raise ConfigError("variance_lr", f"must be positive, got {variance_lr}.", "Use null to share lr.")
        with warnings.catch_warnings():  # the parent's hparams would otherwise warn about variance_net
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            super().__init__(
                backbone,
                scoring=False,
                lam=lam,
                lr=lr,
                warmup_epochs=warmup_epochs,
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                eval_labels=eval_labels,
                channels_last=channels_last,
                compile=compile,
            )
        self.save_hyperparameters(ignore=["backbone", "variance_net"])
        # Keep this class's own settings only, so that load_from_checkpoint can rebuild it.
        for unused in set(self.hparams) - set(inspect.signature(VarianceWeighted.__init__).parameters):
            self.hparams.pop(unused)
        self.automatic_optimization = True
        self.variance = (
            variance_net
            if variance_net is not None
            else LogVarianceNetwork(self.backbone.spatial_dims, self.backbone.in_channels)
        )

    @property
    def phase(self) -> Phase:
        """Warm-up A (backbone alone) for ``epoch < warmup_epochs``, then joint."""
        return Phase.WARMUP_BACKBONE if self.current_epoch < self.hparams.warmup_epochs else Phase.JOINT

    def score_map(self, target: Tensor) -> Tensor:
        """The relative weight the loss gives each voxel's residual, ``σ^{2β}/σ²`` scaled to max 1 per image.

        ``(B, 1, *spatial)`` in [0, 1]; shown in the score panel of the figures.
        """
        weight = torch.exp((self.hparams.beta_nll - 1.0) * self.variance(target))
        return weight / weight.flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (weight.ndim - 1))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[METHOD_KEY] = "nll" if self.hparams.beta_nll == 0 else "beta_nll"

    def configure_model(self) -> None:
        """The parent's memory format and compilation, applied to the variance network too."""
        super().configure_model()
        if self.hparams.channels_last:
            self.variance.to(memory_format=self._memory_format)
        if self.hparams.compile and not getattr(self, "_variance_compiled", False):
            self.variance.compile()
            self._variance_compiled = True

    def configure_optimizers(self):
        variance_lr = self.hparams.variance_lr or self.hparams.lr
        return torch.optim.Adam(
            [
                {"params": self.backbone.parameters(), "lr": self.hparams.lr},
                {"params": self.variance.parameters(), "lr": variance_lr},
            ]
        )

    def on_train_epoch_start(self) -> None:  # the parent's manual-optimisation bookkeeping does not apply
        pass

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        source, target, mask = self._images(batch)
        output, _ = self.backbone.forward_train(source, target)
        residual = squared_residual(self.warp(source, output.ddf), target)
        smooth = gradient_energy(output.ddf, mask)
        mse = masked_mean(residual, mask)
        logs = {"train/mse": mse, "train/smooth_ddf": smooth}
        if self.phase is Phase.JOINT:
            log_variance = self.variance(target)
            data = beta_nll(residual, log_variance, self.hparams.beta_nll, mask)
            logs["train/log_variance"] = masked_mean(log_variance.detach(), mask)
        else:
            data = mse
        loss = data + self.hparams.lam * smooth
        if output.extra_loss is not None:
            loss = loss + output.extra_loss
        self._check_finite(batch_idx, self.phase, {"loss": loss})
        logs.update({"train/loss": loss, "train/data": data})
        self.log_dict(logs, on_step=True, on_epoch=True, batch_size=source.shape[0], sync_dist=True)
        return loss
