"""DiffuseMorph-style registration (Kim et al., ECCV 2022): a conditional denoiser feeding a deformation network.

The denoiser, a MONAI ``DiffusionModelUNet``, sees the moving image, the fixed image and a
noisy copy of the fixed image ``x_t`` with its timestep ``t``; a 1×1 convolution reads the
noise estimate from its last feature map (an L1 loss, DiffuseMorph's). The deformation
network (a MONAI ``VoxelMorphUNet``) sees the moving image and the denoiser's output (the
noise estimate, DiffuseMorph's input, and the feature map it is read from) and predicts the
displacement.
Both are trained together: the diffusion loss is returned as the network's extra training
loss (the AdaCS module adds it to ``L_de``), the registration loss is AdaCS's.

Follows DiffuseMorph: a linear β schedule from 1e-6 to 1e-2 over 2000 steps, the noisy
fixed image conditioned on the pair, an L1 noise-prediction loss, a VoxelMorph-sized
deformation network, the diffusion loss weighted 1/λ against the registration loss with
DiffuseMorph's λ = 2 in 2D and 20 in 3D, and, at inference, a single forward pass with one
denoiser call at ``t = 0`` (the fixed image as ``x_0``). Smaller than DiffuseMorph: the
denoiser has no attention layers and widths (32, 64, 64, 64) by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet, VoxelMorphUNet
from monai.networks.schedulers import DDPMScheduler
from torch import nn

from ..errors import ConfigError
from ._checks import check_divisible
from .adapter import Backbone
from .voxelmorph import _init_flow_head

DEFAULT_DIFFUSION_WEIGHT = {2: 1 / 2, 3: 1 / 20}


class DiffuseMorph(nn.Module):
    """Conditional denoiser + deformation network: ``(moving, fixed)`` → ``{"ddf", "loss"}``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each image.
        denoiser_channels: widths of the denoiser's levels (sizes must divide by 2^(levels-1)).
        denoiser_res_blocks: residual blocks per denoiser level.
        norm_num_groups: group-norm groups in the denoiser (must divide its widths).
        feature_channels: channels of the denoiser's output features (even).
        deformation_channels, deformation_out_channels, deformation_final_channels: the
            deformation network's ``VoxelMorphUNet`` widths (VoxelMorph's by default).
        num_train_timesteps, beta_start, beta_end: the linear noise schedule.
        diffusion_weight: weight of the diffusion loss; None for DiffuseMorph's 1/λ
            (1/2 in 2D, 1/20 in 3D).

    ``forward`` returns ``{"ddf": (B, ndim, *spatial)}`` in voxels (MONAI ``Warp``
    convention), plus ``"loss"`` (a scalar, the weighted L1 noise-prediction loss at a
    random timestep) in training mode only.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        denoiser_channels: Sequence[int] = (32, 64, 64, 64),
        denoiser_res_blocks: int = 1,
        norm_num_groups: int = 16,
        feature_channels: int = 16,
        deformation_channels: Sequence[int] = (16, 32, 32, 32, 32, 32),
        deformation_out_channels: int = 32,
        deformation_final_channels: Sequence[int] = (16, 16),
        num_train_timesteps: int = 2000,
        beta_start: float = 1e-6,
        beta_end: float = 1e-2,
        diffusion_weight: float | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError("spatial_dims", f"must be 2 or 3, got {spatial_dims}.")
        if feature_channels % 2:
            raise ConfigError("feature_channels", f"must be even, got {feature_channels}.")
        bad = [c for c in denoiser_channels if c % norm_num_groups]
        if bad:
            raise ConfigError(
                "norm_num_groups",
                f"{norm_num_groups} groups do not divide the denoiser widths {list(bad)}.",
                "Choose denoiser_channels that are multiples of norm_num_groups.",
            )
        self.spatial_dims = spatial_dims
        self.divisor = 2 ** (len(denoiser_channels) - 1)
        self.denoiser = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=3 * in_channels,
            out_channels=feature_channels,
            num_res_blocks=denoiser_res_blocks,
            channels=tuple(denoiser_channels),
            attention_levels=(False,) * len(denoiser_channels),
            norm_num_groups=norm_num_groups,
        )
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.noise_head = conv(feature_channels, in_channels, kernel_size=1)
        self.deformation = VoxelMorphUNet(
            spatial_dims=spatial_dims,
            in_channels=2 * in_channels + feature_channels,
            unet_out_channels=deformation_out_channels,
            channels=tuple(deformation_channels),
            final_conv_channels=tuple(deformation_final_channels),
        )
        _init_flow_head(self.deformation)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps, schedule="linear_beta", beta_start=beta_start, beta_end=beta_end
        )
        self.diffusion_weight = (
            DEFAULT_DIFFUSION_WEIGHT[spatial_dims] if diffusion_weight is None else float(diffusion_weight)
        )

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> dict[str, torch.Tensor]:
        """``moving``, ``fixed`` ``(B, C, *spatial)`` → ``{"ddf", "loss" (training only)}``."""
        check_divisible(fixed.shape[2:], self.divisor, "data.image_size", "DiffuseMorph", "the denoiser's levels")
        batch = fixed.shape[0]
        if self.training:
            t = torch.randint(0, self.scheduler.num_train_timesteps, (batch,), device=fixed.device)
            noise = torch.randn_like(fixed)
            noisy = self.scheduler.add_noise(fixed, noise, t)
        else:
            t = torch.zeros(batch, dtype=torch.long, device=fixed.device)
            noisy = fixed
        features = self.denoiser(torch.cat([moving, fixed, noisy], dim=1), t)
        estimate = self.noise_head(features)
        ddf = self.deformation(torch.cat([moving, estimate, features], dim=1))
        if not self.training:
            return {"ddf": ddf}
        loss = F.l1_loss(estimate, noise)
        return {"ddf": ddf, "loss": self.diffusion_weight * loss}


def diffusemorph(spatial_dims: int = 2, in_channels: int = 1, **kwargs) -> Backbone:
    """DiffuseMorph behind the backbone contract; ``kwargs`` as :class:`DiffuseMorph`.

    Returns:
        a :class:`Backbone` taking ``(moving, fixed)`` ``(B, in_channels, *spatial)`` and
        returning the displacement ``(B, spatial_dims, *spatial)`` in voxels; in training,
        ``forward_train`` also carries the diffusion loss. Sizes must divide by
        2^(len(denoiser_channels) - 1), 8 by default.
    """
    net = DiffuseMorph(spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
    return Backbone(net, inputs="pair", output="ddf", spatial_dims=spatial_dims, in_channels=in_channels)


__all__ = ["DiffuseMorph", "diffusemorph"]
