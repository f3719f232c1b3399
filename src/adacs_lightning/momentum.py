"""The momentum-guided smoothness weight ``m_T`` (docs/method.md, *Momentum*), kept on the device."""

from __future__ import annotations

import math

import torch
from torch import nn

MOMENTUM_MODES = ("paper", "reference")


def momentum_target(mu: torch.Tensor, kappa: torch.Tensor | float) -> torch.Tensor:
    """The paper's ``b_T = cos(π/2 · min(κ·μ_T, 1))``, in [0, 1] for ``μ_T ≥ 0`` and ``κ > 0``.

    Large residuals (early training) give a small weight, small residuals a weight
    near 1. Negative products are clamped to 0, so the weight never exceeds 1.
    """
    scaled = (kappa * mu).clamp(0.0, 1.0)
    return torch.cos(0.5 * math.pi * scaled).clamp(0.0, 1.0)  # cos(π/2) is -4e-8 in float32


def reference_momentum_target(mu: torch.Tensor, kappa: torch.Tensor | float) -> torch.Tensor:
    """The reference code's ``b = cos(π·κ·μ)``: no clamp, negative once ``κμ > 1/2``."""
    return torch.cos(math.pi * kappa * mu)


class MomentumWeight(nn.Module):
    """Exponential moving average ``m_T = γ_T·m_{T-1} + (1-γ_T)·b_T`` of a residual-driven target ``b_T``.

    ``mode="paper"`` (default): ``b_T = cos(π/2·min(κμ_T, 1))`` in [0, 1] of this update's residual
    ``μ_T``, and ``γ_T = min(γ, 1 - 1/T)`` for the T-th update (T from 1), so ``m_1 = b_1``.

    ``mode="reference"`` reproduces the authors' code: ``μ`` is the running mean of the residuals
    folded in since the start of the current epoch, ``b = cos(π·κμ)`` (its own expression, ``κ`` its
    ``momentum_scaling``) without a clamp (it turns negative once ``κμ > 1/2``), and ``γ_e = min(γ, 1 - 1/(e+1))`` for epoch ``e`` (so it is 0 through
    the first epoch).

    ``m_T``, ``T``, ``κ`` (and in reference mode the epoch's running sum) are buffers: they travel with the module's
    state dict and so with every checkpoint. Updates are tensor operations on the buffers'
    device: no host synchronisation.

    Args:
        gamma: the momentum ``γ`` in [0, 1).
        kappa: the residual scale ``κ > 0``, or ``"auto"`` to set ``κ = 1/μ_1`` from the
            first residual seen, so that ``m`` starts at 0 and rises as the residual falls.
        mode: ``"paper"`` or ``"reference"``.
    """

    def __init__(self, gamma: float = 0.99, kappa: float | str = 50.0, mode: str = "paper") -> None:
        super().__init__()
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
        if kappa != "auto" and not (isinstance(kappa, (int, float)) and kappa > 0):
            raise ValueError(f"kappa must be a positive number or 'auto', got {kappa!r}")
        if mode not in MOMENTUM_MODES:
            raise ValueError(f"mode must be one of {MOMENTUM_MODES}, got {mode!r}")
        self.gamma = float(gamma)
        self.mode = mode
        self.auto_kappa = kappa == "auto"
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        # κ = 0 marks "not calibrated yet" (auto mode); a set κ is always positive.
        self.register_buffer("kappa", torch.tensor(0.0 if self.auto_kappa else float(kappa)))
        if mode == "reference":  # the epoch of the running mean, and its sum and count
            self.register_buffer("epoch", torch.full((), -1, dtype=torch.long))
            self.register_buffer("epoch_sum", torch.zeros(()))
            self.register_buffer("epoch_count", torch.zeros(()))

    @torch.no_grad()
    def update(self, mu: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """Fold the residual ``μ_T`` (a scalar tensor) of an update in ``epoch`` in; returns the new ``m_T``."""
        mu = mu.detach().to(self.value.dtype)
        if self.auto_kappa:
            # κ = 1/μ_1 on the first update; later updates keep it.
            calibrated = 1.0 / mu.clamp_min(torch.finfo(mu.dtype).tiny)
            self.kappa.copy_(torch.where(self.kappa > 0, self.kappa, calibrated))
        self.count.add_(1)
        if self.mode == "paper":
            step_gamma = torch.clamp(1.0 - 1.0 / self.count.to(self.value.dtype), max=self.gamma)
            target = momentum_target(mu, self.kappa)
        else:
            new_epoch = self.epoch != epoch
            self.epoch_sum.copy_(torch.where(new_epoch, mu, self.epoch_sum + mu))
            self.epoch_count.copy_(torch.where(new_epoch, torch.ones_like(self.epoch_count), self.epoch_count + 1))
            self.epoch.fill_(epoch)
            step_gamma = torch.tensor(min(self.gamma, 1.0 - 1.0 / (epoch + 1)), dtype=self.value.dtype)
            running = self.epoch_sum / self.epoch_count
            target = reference_momentum_target(running, self.kappa)
        self.value.copy_(step_gamma * self.value + (1.0 - step_gamma) * target)
        return self.value.clone()

    def extra_repr(self) -> str:
        kappa = "auto" if self.auto_kappa else float(self.kappa)
        return f"gamma={self.gamma}, kappa={kappa}, mode={self.mode}"
