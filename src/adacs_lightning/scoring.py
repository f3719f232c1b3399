"""The scoring network ``g_φ``: target image → correspondence score map ``Ŝ`` in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet
from torch import nn


class ScoringNetwork(nn.Module):
    """A MONAI U-Net with one output channel and a sigmoid head.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the image it scores.
        channels: feature widths of the U-Net levels, finest first.
        strides: down-sampling factor between consecutive levels (``len(channels) - 1`` entries).
        num_res_units: residual units per level (0 gives plain convolutions).

    Input ``(B, in_channels, *spatial)``; output ``(B, 1, *spatial)`` in [0, 1].
    Spatial sizes must divide by the product of ``strides``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 32, 32),
        strides: Sequence[int] | None = None,
        num_res_units: int = 0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        strides = tuple(strides) if strides is not None else (2,) * (len(channels) - 1)
        self.spatial_dims = spatial_dims
        self.unet = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=1,
            channels=tuple(channels),
            strides=strides,
            num_res_units=num_res_units,
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(image))
