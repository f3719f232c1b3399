"""The momentum-guided smoothness weight ``m_T`` (METHOD.md), kept on the device."""

from __future__ import annotations

import torch
from torch import nn

from .losses import momentum_target


class MomentumWeight(nn.Module):
    """Exponential moving average ``m_T = γ_T·m_{T-1} + (1-γ_T)·b_T`` of ``b_T = cos(π/2·min(κμ_T, 1))``.

    ``γ_T = min(γ, 1 - 1/T)`` for the T-th update (T from 1), so ``m_1 = b_1``.
    ``m_T``, ``T`` and ``κ`` are buffers: they travel with the module's state dict
    and so with every checkpoint. All updates are tensor operations on the
    buffers' device: no host synchronisation.

    Args:
        gamma: the momentum ``γ`` in [0, 1).
        kappa: the residual scale ``κ > 0``, or ``"auto"`` to set ``κ = 1/μ_1`` from the
            first residual seen, so that ``m`` starts at 0 and rises as the residual falls.
    """

    def __init__(self, gamma: float = 0.99, kappa: float | str = 50.0) -> None:
        super().__init__()
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must lie in [0, 1), got {gamma}")
        if kappa != "auto" and not (isinstance(kappa, (int, float)) and kappa > 0):
            raise ValueError(f"kappa must be a positive number or 'auto', got {kappa!r}")
        self.gamma = float(gamma)
        self.auto_kappa = kappa == "auto"
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        # κ = 0 marks "not calibrated yet" (auto mode); a set κ is always positive.
        self.register_buffer("kappa", torch.tensor(0.0 if self.auto_kappa else float(kappa)))

    @torch.no_grad()
    def update(self, mu: torch.Tensor) -> torch.Tensor:
        """Fold the residual ``μ_T`` (a non-negative scalar tensor) in and return the new ``m_T``."""
        mu = mu.detach().to(self.value.dtype)
        if self.auto_kappa:
            # κ = 1/μ_1 on the first update; later updates keep it.
            calibrated = 1.0 / mu.clamp_min(torch.finfo(mu.dtype).tiny)
            self.kappa.copy_(torch.where(self.kappa > 0, self.kappa, calibrated))
        self.count.add_(1)
        step_gamma = torch.clamp(1.0 - 1.0 / self.count.to(self.value.dtype), max=self.gamma)
        target = momentum_target(mu, self.kappa)
        self.value.copy_(step_gamma * self.value + (1.0 - step_gamma) * target)
        return self.value.clone()

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, kappa={'auto' if self.auto_kappa else float(self.kappa)}"
