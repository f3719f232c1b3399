"""Scoring networks ``g_φ``: target image → correspondence score map ``Ŝ`` ``(B, 1, *spatial)`` in [0, 1].

Two architectures (docs/method.md, *Scorer*):

* :class:`VoxelMorphScorer`: the reference's scorer, VoxelMorph's U-Net with a full-resolution
  sigmoid head, so the map can follow residuals voxel by voxel;
* :class:`ScoringNetwork`: a lighter MONAI ``UNet`` with instance norm, whose last layer is a
  stride-2 transposed convolution (a coarser map).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn

_LEAKY_RELU = ("leakyrelu", {"negative_slope": 0.2})


def _check_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


#: The images a scorer sees: the target alone (the paper), or the target and the warped source (stop-gradient).
SCORER_INPUT_IMAGES = {"target": 1, "pair": 2}


def _input_images(scorer_input: str) -> int:
    if scorer_input not in SCORER_INPUT_IMAGES:
        raise ValueError(f"scorer_input must be one of {tuple(SCORER_INPUT_IMAGES)}, got {scorer_input!r}")
    return SCORER_INPUT_IMAGES[scorer_input]


def map_unet(
    spatial_dims: int,
    in_channels: int,
    channels: Sequence[int] = (16, 32, 32, 32),
    strides: Sequence[int] | None = None,
    num_res_units: int = 0,
) -> UNet:
    """A MONAI ``UNet`` from an image ``(B, in_channels, *spatial)`` to one map ``(B, 1, *spatial)`` (no activation).

    ``strides`` default to 2 between consecutive levels; sizes must divide by their product.
    """
    _check_dims(spatial_dims)
    return UNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=1,
        channels=tuple(channels),
        strides=tuple(strides) if strides is not None else (2,) * (len(channels) - 1),
        num_res_units=num_res_units,
    )


class ScoringNetwork(nn.Module):
    """A MONAI U-Net with one output channel and a sigmoid head.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the image it scores.
        channels: feature widths of the U-Net levels, finest first.
        strides: down-sampling factor between consecutive levels (``len(channels) - 1`` entries).
        num_res_units: residual units per level (0 gives plain convolutions).
        scorer_input: ``"target"`` (the image it scores) or ``"pair"`` (the target and the warped source,
            stacked along the channels: ``2·in_channels`` input channels).

    Input ``(B, in_channels, *spatial)`` (``"pair"``: ``(B, 2·in_channels, *spatial)``); output
    ``(B, 1, *spatial)`` in [0, 1]. Spatial sizes must divide by the product of ``strides``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 32, 32),
        strides: Sequence[int] | None = None,
        num_res_units: int = 0,
        scorer_input: str = "target",
    ) -> None:
        super().__init__()
        self.spatial_dims, self.scorer_input = spatial_dims, scorer_input
        images = _input_images(scorer_input)
        self.unet = map_unet(spatial_dims, in_channels * images, channels, strides, num_res_units)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.unet(image))


def voxelmorph_unet(
    spatial_dims: int,
    in_channels: int,
    encoder: Sequence[int] = (16, 32, 32, 32),
    decoder: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
) -> tuple[nn.Module, int]:
    """VoxelMorph's U-Net from MONAI blocks; returns ``(network, output channels)``.

    One 3×3 convolution (LeakyReLU 0.2, no normalisation) per encoder level, each followed by
    2× max-pooling, so ``len(encoder)`` levels reach ``1/2^len(encoder)`` of the input size; one
    convolution per decoder level from the coarsest up, each followed by nearest-neighbour
    up-sampling and concatenation with the encoder's features of that level; the remaining
    ``decoder`` widths are full-resolution convolutions. Sizes must divide by ``2^len(encoder)``.
    """
    _check_dims(spatial_dims)
    levels = len(encoder)
    if len(decoder) < levels:
        raise ValueError(f"decoder needs at least {levels} widths (one per level), got {list(decoder)}")

    def pool() -> nn.Module:
        return nn.MaxPool2d(2) if spatial_dims == 2 else nn.MaxPool3d(2)

    def conv(cin: int, cout: int) -> Convolution:
        return Convolution(spatial_dims, cin, cout, kernel_size=3, act=_LEAKY_RELU, norm=None)

    def up(channels: int) -> UpSample:
        return UpSample(
            spatial_dims,
            channels,
            channels,
            scale_factor=2,
            mode="nontrainable",
            interp_mode="nearest",
            align_corners=None,
        )

    # Built from the coarsest level up: level i encodes, recurses one level down, decodes back to level i.
    inner: nn.Module | None = None
    inner_out = 0
    for level in reversed(range(levels)):
        cin = in_channels if level == 0 else encoder[level - 1]
        width = decoder[levels - 1 - level]  # the decoder convolution runs one level below this one
        branch = (
            [pool()] + ([inner] if inner is not None else []) + [conv(inner_out or encoder[level], width), up(width)]
        )
        inner = nn.Sequential(conv(cin, encoder[level]), SkipConnection(nn.Sequential(*branch)))
        inner_out = encoder[level] + width
    layers: list[nn.Module] = [inner]
    channels = inner_out
    for width in decoder[levels:]:
        layers.append(conv(channels, width))
        channels = width
    return nn.Sequential(*layers), channels


class VoxelMorphScorer(nn.Module):
    """The reference scorer: VoxelMorph's U-Net (:func:`voxelmorph_unet`), a 3×3 convolution to one channel, sigmoid.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the image it scores.
        encoder, decoder: the U-Net's widths (VoxelMorph's: 16-32-32-32 down to 1/16, then
            32-32-32-32 up and 32-16-16 at full resolution).
        scorer_input: ``"target"`` or ``"pair"`` (as :class:`ScoringNetwork`).

    Input ``(B, in_channels, *spatial)``, sizes divisible by ``2^len(encoder)``; output
    ``(B, 1, *spatial)`` in [0, 1], at full resolution.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int = 1,
        encoder: Sequence[int] = (16, 32, 32, 32),
        decoder: Sequence[int] = (32, 32, 32, 32, 32, 16, 16),
        scorer_input: str = "target",
    ) -> None:
        super().__init__()
        self.spatial_dims, self.scorer_input = spatial_dims, scorer_input
        self.unet, width = voxelmorph_unet(spatial_dims, in_channels * _input_images(scorer_input), encoder, decoder)
        self.head = Convolution(spatial_dims, width, 1, kernel_size=3, conv_only=True)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.unet(image)))


__all__ = ["SCORER_INPUT_IMAGES", "ScoringNetwork", "VoxelMorphScorer", "map_unet", "voxelmorph_unet"]
