"""VoxelMorph from MONAI's building blocks, behind the backbone contract."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import VoxelMorphUNet
from torch import nn

from .adapter import Backbone


def _init_flow_head(net: nn.Module, std: float = 1e-5) -> None:
    """Start the last convolution near zero, as VoxelMorph does, so training starts at identity."""
    last = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))][-1]
    nn.init.normal_(last.weight, mean=0.0, std=std)
    if last.bias is not None:
        nn.init.zeros_(last.bias)


def voxelmorph(
    spatial_dims: int = 2,
    in_channels: int = 1,
    channels: Sequence[int] = (16, 32, 32, 32, 32, 32),
    unet_out_channels: int = 32,
    final_conv_channels: Sequence[int] = (16, 16),
    integration_steps: int = 7,
) -> Backbone:
    """VoxelMorph (Balakrishnan et al., TMI 2019): a U-Net predicting a velocity field.

    The defaults are the VoxelMorph paper's widths (encoder 16, 32, 32, 32; decoder
    32, 32, 32, 32, 32, 16, 16) in MONAI's ``VoxelMorphUNet`` parameterisation, and
    ``integration_steps=7`` of scaling and squaring (0 predicts the displacement directly).

    Returns:
        a :class:`Backbone` taking ``(moving, fixed)`` ``(B, in_channels, *spatial)``
        and returning the displacement ``(B, spatial_dims, *spatial)`` in voxels.
        Spatial sizes must divide by 16.
    """
    unet = VoxelMorphUNet(
        spatial_dims=spatial_dims,
        in_channels=2 * in_channels,
        unet_out_channels=unet_out_channels,
        channels=tuple(channels),
        final_conv_channels=tuple(final_conv_channels),
    )
    _init_flow_head(unet)
    return Backbone(
        unet,
        inputs="concat",
        output="velocity" if integration_steps > 0 else "ddf",
        integration_steps=max(integration_steps, 1),
        spatial_dims=spatial_dims,
        in_channels=in_channels,
    )


__all__ = ["voxelmorph"]
