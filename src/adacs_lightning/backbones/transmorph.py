"""TransMorph (Chen et al., MedIA 2022): a Swin-transformer encoder with a convolutional decoder.

Built from MONAI parts: the encoder is ``monai.networks.nets.swin_unetr.SwinTransformer``
and the decoder MONAI ``UnetrUpBlock`` / ``Convolution`` blocks.

Follows the TransMorph paper (3D defaults): patch size 4, embedding dimension 96, stage
depths (2, 2, 4, 2), heads (4, 4, 8, 8), window (5, 6, 7) for 160×192×224 volumes, MLP
ratio 4, no query/key/value bias, stochastic depth 0.3, patch normalisation, relative
position bias, no merging after the last stage; convolutional skips from the input at full
resolution (16 channels) and from its 3×3(×3) average pooling at 1/2 resolution (48);
decoder widths 768 → 384 → 192 → 96 → 48 → 16; a 3×3(×3) flow head initialised from
N(0, 1e-5) with zero bias, predicting the displacement directly (no integration).

Differs from the paper:

* MONAI's ``SwinTransformer`` returns, for a 4-stage encoder, the patch embedding and the
  output of each stage *after* its patch merging. The skip at 1/4, 1/8 and 1/16 resolution
  is therefore each stage's input (patch embedding; stage 1 and stage 2 merged) rather
  than its output; the bottleneck at 1/32 is the output of stage 4, as in TransMorph.
* Decoder blocks are MONAI ``UnetrUpBlock`` (transposed-convolution up-sampling and a
  convolution block with instance norm and leaky ReLU) instead of trilinear up-sampling.
* 2D (changed for 2D slices, e.g. 128×128): 2D patch embedding, patch merging (4C → 2C)
  and convolutions, and window (4, 4), which gives each stage the same number of windows
  per axis as the 3D original (a 32×32 token grid after patch embedding, 8 windows per axis).
  Depths, heads, embedding dimension and decoder widths are the paper's.

Spatial sizes must divide by 32 (patch size 4 × three patch mergings).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, UnetrUpBlock
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinTransformer
from monai.utils import ensure_tuple_rep
from torch import nn

from ..errors import ConfigError
from ._checks import check_divisible
from .adapter import Backbone

PATCH_SIZE = 4
DEFAULT_WINDOW = {2: (4, 4), 3: (5, 6, 7)}


class _MergeAllButLast:
    """Patch merging after every Swin stage except the last (TransMorph keeps its resolution)."""

    def __init__(self, last_dim: int) -> None:
        self.last_dim = last_dim

    def __call__(self, dim: int, norm_layer: type[nn.Module], spatial_dims: int) -> nn.Module | None:
        if dim >= self.last_dim:
            return None
        return PatchMergingV2(dim=dim, norm_layer=norm_layer, spatial_dims=spatial_dims)


def _as_tuple(value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    return tuple(int(v) for v in ensure_tuple_rep(value, spatial_dims))


def check_size(size: Sequence[int], divisor: int, setting: str) -> None:
    """Raise :class:`ConfigError` naming ``setting`` unless every size divides by ``divisor``."""
    check_divisible(size, divisor, setting, "TransMorph", "patch size 4 and three 2× patch mergings")


class TransMorph(nn.Module):
    """TransMorph: maps the concatenated pair ``(B, 2C, *spatial)`` to a displacement ``(B, ndim, *spatial)``.

    The displacement is in voxels, channel ``i`` along spatial axis ``i``, and warps the
    moving image onto the fixed one with MONAI ``Warp``. See the module docstring for the
    architecture and how it follows the TransMorph paper.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the concatenated input (2 for a single-channel pair).
        embed_dim: channels after patch embedding (C); stages have C, 2C, 4C, 8C.
        depths: Swin blocks in each of the four stages.
        num_heads: attention heads in each stage.
        window_size: attention window (tokens per axis); None for (5, 6, 7) in 3D, (4, 4) in 2D.
        mlp_ratio: hidden width of the Swin MLPs over the embedding width.
        qkv_bias: learn a bias in the query/key/value projections.
        drop_path_rate: stochastic depth rate, increasing linearly over the blocks.
        reg_head_channels: channels of the full-resolution skip and the last decoder block.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 4, 2),
        num_heads: Sequence[int] = (4, 4, 8, 8),
        window_size: int | Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop_path_rate: float = 0.3,
        reg_head_channels: int = 16,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError("spatial_dims", f"must be 2 or 3, got {spatial_dims}.")
        if len(depths) != 4 or len(num_heads) != 4:
            raise ConfigError(
                "depths",
                f"TransMorph has four Swin stages; got depths={list(depths)} and num_heads={list(num_heads)}.",
                "Give four values for each, e.g. depths=[2,2,4,2] num_heads=[4,4,8,8].",
            )
        if embed_dim % 2:
            raise ConfigError("embed_dim", f"must be even (the 1/2-resolution skip has embed_dim/2), got {embed_dim}.")
        for stage, heads in enumerate(num_heads):
            if (embed_dim * 2**stage) % heads:
                raise ConfigError(
                    "num_heads",
                    f"stage {stage + 1} has {embed_dim * 2**stage} channels, not divisible by {heads} heads.",
                    "Choose embed_dim and num_heads so that embed_dim·2^stage divides by the heads of each stage.",
                )
        window = _as_tuple(window_size if window_size is not None else DEFAULT_WINDOW[spatial_dims], spatial_dims)
        if len(window) != spatial_dims:
            raise ConfigError("window_size", f"needs {spatial_dims} values for {spatial_dims}D, got {list(window)}.")
        self.spatial_dims = spatial_dims
        self.divisor = PATCH_SIZE * 2 ** (len(depths) - 1)
        c = embed_dim
        self.encoder = SwinTransformer(
            in_chans=in_channels,
            embed_dim=c,
            window_size=window,
            patch_size=(PATCH_SIZE,) * spatial_dims,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            drop_path_rate=drop_path_rate,
            patch_norm=True,
            spatial_dims=spatial_dims,
            downsample=_MergeAllButLast(last_dim=c * 8),
        )
        pool = nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d
        self.pool = pool(3, stride=2, padding=1)

        def conv(cin: int, cout: int) -> Convolution:
            return Convolution(spatial_dims, cin, cout, kernel_size=3, act="LEAKYRELU", norm="INSTANCE")

        self.skip_half = conv(in_channels, c // 2)
        self.skip_full = conv(in_channels, reg_head_channels)

        def up(cin: int, cout: int) -> UnetrUpBlock:
            return UnetrUpBlock(spatial_dims, cin, cout, kernel_size=3, upsample_kernel_size=2, norm_name="instance")

        self.decoder = nn.ModuleList(
            [up(8 * c, 4 * c), up(4 * c, 2 * c), up(2 * c, c), up(c, c // 2), up(c // 2, reg_head_channels)]
        )
        conv_type = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.flow = conv_type(reg_head_channels, spatial_dims, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, mean=0.0, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """``pair`` ``(B, in_channels, *spatial)`` → displacement ``(B, spatial_dims, *spatial)`` in voxels."""
        check_size(pair.shape[2:], self.divisor, "data.image_size")
        embedded, stage1, stage2, _, bottleneck = self.encoder(pair.contiguous(), normalize=True)
        skips = [stage2, stage1, embedded, self.skip_half(self.pool(pair)), self.skip_full(pair)]
        x = bottleneck
        for block, skip in zip(self.decoder, skips):
            x = block(x, skip)
        return self.flow(x)


def transmorph(
    spatial_dims: int = 3,
    in_channels: int = 1,
    embed_dim: int = 96,
    depths: Sequence[int] = (2, 2, 4, 2),
    num_heads: Sequence[int] = (4, 4, 8, 8),
    window_size: int | Sequence[int] | None = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = False,
    drop_path_rate: float = 0.3,
    reg_head_channels: int = 16,
    img_size: int | Sequence[int] | None = None,
) -> Backbone:
    """TransMorph behind the backbone contract: ``(moving, fixed)`` → displacement in voxels.

    Args:
        in_channels: channels of each image (the network sees the pair concatenated).
        img_size: the image size, when known, to check divisibility by 32 when the model is
            built rather than at the first batch; other arguments as :class:`TransMorph`.

    Returns:
        a :class:`Backbone` taking ``(moving, fixed)`` ``(B, in_channels, *spatial)`` and
        returning the displacement ``(B, spatial_dims, *spatial)``; sizes must divide by 32.
    """
    net = TransMorph(
        spatial_dims=spatial_dims,
        in_channels=2 * in_channels,
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        window_size=window_size,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        drop_path_rate=drop_path_rate,
        reg_head_channels=reg_head_channels,
    )
    if img_size is not None:
        check_size(_as_tuple(img_size, spatial_dims), net.divisor, "img_size")
    return Backbone(net, inputs="concat", output="ddf", spatial_dims=spatial_dims, in_channels=in_channels)


__all__ = ["TransMorph", "transmorph"]
