"""VoxelMorph from MONAI's building blocks, behind the backbone contract."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF
from monai.networks.nets import VoxelMorphUNet
from torch import nn

from ..errors import ConfigError
from .adapter import Backbone


def _init_flow_head(net: nn.Module, std: float = 1e-5) -> None:
    """Start the last convolution near zero, as VoxelMorph does, so training starts at identity."""
    last = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))][-1]
    nn.init.normal_(last.weight, mean=0.0, std=std)
    if last.bias is not None:
        nn.init.zeros_(last.bias)


def _resize_field(field: torch.Tensor, size: Sequence[int], factor: float) -> torch.Tensor:
    """A displacement or velocity field ``(B, ndim, *spatial)`` resampled to ``size``, in the new grid's voxels."""
    mode = "bilinear" if field.ndim == 4 else "trilinear"
    return F.interpolate(field, size=tuple(size), mode=mode, align_corners=True) * factor


class HalfResolutionFlow(nn.Module):
    """VoxelMorph's ``int_downsize=2``: integrate the velocity at half resolution, then upsample.

    Wraps a network mapping the concatenated pair ``(B, 2C, *spatial)`` to a velocity field
    ``(B, ndim, *spatial)`` in voxels. The velocity is resampled to half size (its values
    halved, to half-grid voxels), integrated by scaling and squaring (MONAI ``DVF2DDF``),
    and the displacement resampled back (values doubled). Returns the displacement
    ``(B, ndim, *spatial)`` in full-resolution voxels. Spatial sizes must be even.
    """

    def __init__(self, net: nn.Module, integration_steps: int = 7) -> None:
        super().__init__()
        self.net = net
        self.integrate = DVF2DDF(num_steps=integration_steps)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        velocity = self.net(pair)
        full = velocity.shape[2:]
        half = [s // 2 for s in full]
        ddf_half = self.integrate(_resize_field(velocity, half, 0.5))
        return _resize_field(ddf_half, full, 2.0)


def voxelmorph(
    spatial_dims: int = 2,
    in_channels: int = 1,
    channels: Sequence[int] = (16, 32, 32, 32, 32, 32),
    unet_out_channels: int = 32,
    final_conv_channels: Sequence[int] = (16, 16),
    integration_steps: int = 7,
    half_resolution: bool = False,
) -> Backbone:
    """VoxelMorph (Balakrishnan et al., TMI 2019): a U-Net predicting a velocity field.

    The defaults are the VoxelMorph paper's widths (encoder 16, 32, 32, 32; decoder
    32, 32, 32, 32, 32, 16, 16) in MONAI's ``VoxelMorphUNet`` parameterisation, and
    ``integration_steps=7`` of scaling and squaring (0 predicts the displacement directly).
    ``half_resolution=True`` integrates the velocity on a half-size grid, as VoxelMorph's
    ``int_downsize=2`` (its 3D default). MONAI's ``VoxelMorph(half_res=True)`` is not used: it
    scales the velocity by 2 before integrating and by 1/2 after, the inverse of the grid
    change, and interpolates trilinearly only (3D).

    Returns:
        a :class:`Backbone` taking ``(moving, fixed)`` ``(B, in_channels, *spatial)``
        and returning the displacement ``(B, spatial_dims, *spatial)`` in voxels.
        Spatial sizes must divide by 16.
    """
    if half_resolution and integration_steps <= 0:
        raise ConfigError(
            "half_resolution",
            "integrates the velocity on a half-size grid, but integration_steps is 0 (no integration).",
            "Set integration_steps to a positive number (7 in VoxelMorph) or half_resolution=false.",
        )
    unet = VoxelMorphUNet(
        spatial_dims=spatial_dims,
        in_channels=2 * in_channels,
        unet_out_channels=unet_out_channels,
        channels=tuple(channels),
        final_conv_channels=tuple(final_conv_channels),
    )
    _init_flow_head(unet)
    if half_resolution:
        return Backbone(
            HalfResolutionFlow(unet, integration_steps),
            inputs="concat",
            output="ddf",
            spatial_dims=spatial_dims,
            in_channels=in_channels,
        )
    return Backbone(
        unet,
        inputs="concat",
        output="velocity" if integration_steps > 0 else "ddf",
        integration_steps=max(integration_steps, 1),
        spatial_dims=spatial_dims,
        in_channels=in_channels,
    )


__all__ = ["HalfResolutionFlow", "voxelmorph"]
