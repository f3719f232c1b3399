"""VoxelMorph from MONAI's building blocks, behind the backbone contract."""

from __future__ import annotations

from collections.abc import Sequence

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


def voxelmorph(
    spatial_dims: int = 2,
    in_channels: int = 1,
    channels: Sequence[int] = (16, 32, 32, 32, 32, 32, 32, 32),
    unet_out_channels: int = 32,
    final_conv_channels: Sequence[int] = (16, 16),
    integration_steps: int = 7,
    half_resolution: bool = False,
) -> Backbone:
    """VoxelMorph (Balakrishnan et al., TMI 2019): a U-Net predicting a velocity field.

    The defaults are the VoxelMorph paper's network, as the AdaCS reference trains it: encoder
    16, 32, 32, 32 down to 1/16 of the input size, decoder 32, 32, 32, 32 back up and 32, 16, 16
    at full resolution (109,170 parameters in 2D, 327,331 in 3D), in MONAI's ``VoxelMorphUNet``
    parameterisation (``channels`` pairs an encoder level with its decoder level, coarsest last;
    ``unet_out_channels`` and ``final_conv_channels`` are the full-resolution convolutions), and
    ``integration_steps=7`` of scaling and squaring (0 predicts the displacement directly).
    ``half_resolution=True`` integrates the velocity on a half-size grid, as VoxelMorph's
    ``int_downsize=2`` (the reference's setting); the bidirectional mode then integrates the
    negated half-size velocity. MONAI's ``VoxelMorph(half_res=True)`` is not used: it scales the
    velocity by 2 before integrating and by 1/2 after, the inverse of the grid change.

    Returns:
        a :class:`Backbone` taking ``(moving, fixed)`` ``(B, in_channels, *spatial)``
        and returning the displacement ``(B, spatial_dims, *spatial)`` in voxels.
        Spatial sizes must divide by ``2^(len(channels)/2)`` (16 by default).
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
    return Backbone(
        unet,
        inputs="concat",
        output="velocity" if integration_steps > 0 else "ddf",
        integration_steps=max(integration_steps, 1),
        integration_downsize=2 if half_resolution else 1,
        spatial_dims=spatial_dims,
        in_channels=in_channels,
    )


__all__ = ["voxelmorph"]
