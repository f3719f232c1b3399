"""A conditional Laplacian-pyramid registration network in the style of c-LapIRN (Mok & Chung, MICCAI 2021).

Three levels register the pair coarse to fine, at 1/4, 1/2 and full resolution (pyramids
by 3×3(×3) average pooling with stride 2). Each level is a small convolutional network:
two input convolutions, a stride-2 convolution, residual blocks whose instance norms are
conditioned on the regularisation weight λ, and a transposed-convolution decoder with a
skip from the input features. A level sees the moving image warped by the upsampled
displacement of the previous level, the fixed image and that displacement, and predicts a
residual displacement that refines it:

* ``combine="add"`` (c-LapIRN's displacement variant): ``u = up(u_prev) + r``;
* ``combine="compose"``: ``u(x) = r(x) + up(u_prev)(x + r(x))``, the exact composition of
  the two warps (MONAI ``Warp`` resamples the previous displacement).

Conditioning: λ goes through a two-layer MLP to an embedding that sets the scale and
shift of every conditional instance norm (FiLM). Training fixes λ from the config
(``reg_weight``, by default the method's λ); ``forward(moving, fixed, reg_weight=...)``
evaluates the same network at another weight. c-LapIRN samples λ during training and
trains the levels progressively with a multi-resolution similarity loss; here the levels
are trained together end to end on AdaCS's loss of the final displacement. Widths follow
c-LapIRN (28 feature channels, 5 residual blocks per level). Any image size works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from ..errors import ConfigError
from ..warping import warp_block
from .adapter import Backbone


def _conv(spatial_dims: int, cin: int, cout: int, stride: int = 1, act: bool = True) -> Convolution:
    return Convolution(
        spatial_dims,
        cin,
        cout,
        kernel_size=3,
        strides=stride,
        act=("LEAKYRELU", {"negative_slope": 0.2}) if act else None,
    )


class ConditionalInstanceNorm(nn.Module):
    """Instance norm with a scale ``1 + γ(e)`` and shift ``β(e)`` set by a condition embedding ``e`` (B, E)."""

    def __init__(self, spatial_dims: int, channels: int, embedding_dim: int) -> None:
        super().__init__()
        norm = nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d
        self.norm = norm(channels, affine=False)
        self.film = nn.Linear(embedding_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(embedding).view(x.shape[0], 2, x.shape[1], *([1] * (x.ndim - 2))).unbind(1)
        return self.norm(x) * (1 + gamma) + beta


class ConditionalResidualBlock(nn.Module):
    """Pre-activation residual block: (CIN, LeakyReLU, conv) twice, plus the input."""

    def __init__(self, spatial_dims: int, channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.norms = nn.ModuleList([ConditionalInstanceNorm(spatial_dims, channels, embedding_dim) for _ in range(2)])
        self.convs = nn.ModuleList([_conv(spatial_dims, channels, channels, act=False) for _ in range(2)])

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        out = x
        for norm, conv in zip(self.norms, self.convs):
            out = conv(F.leaky_relu(norm(out, embedding), 0.2))
        return x + out


class PyramidLevel(nn.Module):
    """One level: ``(warped moving, fixed, previous displacement)`` and λ's embedding → residual displacement."""

    def __init__(self, spatial_dims: int, in_channels: int, features: int, res_blocks: int, embedding_dim: int):
        super().__init__()
        self.encoder = nn.Sequential(
            _conv(spatial_dims, in_channels, features), _conv(spatial_dims, features, features, act=False)
        )
        self.down = _conv(spatial_dims, features, features, stride=2)
        self.blocks = nn.ModuleList(
            [ConditionalResidualBlock(spatial_dims, features, embedding_dim) for _ in range(res_blocks)]
        )
        transposed = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        self.up = transposed(features, features, kernel_size=2, stride=2)
        self.decoder = _conv(spatial_dims, 2 * features, features)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.flow = conv(features, spatial_dims, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        skip = self.encoder(x)
        h = self.down(skip)
        for block in self.blocks:
            h = block(h, embedding)
        h = self.up(h)
        if h.shape[2:] != skip.shape[2:]:  # odd sizes: the stride-2 grid rounds up
            h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
        return self.flow(self.decoder(torch.cat([h, skip], dim=1)))


def _downsample(image: torch.Tensor) -> torch.Tensor:
    pool = F.avg_pool2d if image.ndim == 4 else F.avg_pool3d
    return pool(image, kernel_size=3, stride=2, padding=1, count_include_pad=False)


def _upsample_displacement(ddf: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A displacement resampled to ``size``, its components rescaled to the new grid's voxels."""
    mode = "bilinear" if ddf.ndim == 4 else "trilinear"
    scale = torch.tensor([new / old for new, old in zip(size, ddf.shape[2:])], dtype=ddf.dtype, device=ddf.device)
    resized = F.interpolate(ddf, size=tuple(size), mode=mode, align_corners=True)
    return resized * scale.view(1, -1, *([1] * len(size)))


class ConditionalLapIRN(nn.Module):
    """Conditional Laplacian-pyramid network: ``(moving, fixed)`` → displacement ``(B, ndim, *spatial)`` in voxels.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each image.
        levels: pyramid levels (3 in c-LapIRN), coarsest at 1/2^(levels-1).
        features: channels inside each level.
        res_blocks: conditional residual blocks per level.
        embedding_dim: width of λ's embedding.
        reg_weight: λ fed to the conditional norms when ``forward`` is not given one.
        combine: ``"add"`` or ``"compose"`` (see the module docstring).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        levels: int = 3,
        features: int = 28,
        res_blocks: int = 5,
        embedding_dim: int = 64,
        reg_weight: float = 0.05,  # every method's default λ (methods.settings.LAM)
        combine: Literal["add", "compose"] = "add",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError("spatial_dims", f"must be 2 or 3, got {spatial_dims}.")
        if combine not in ("add", "compose"):
            raise ConfigError("combine", f"must be 'add' or 'compose', got {combine!r}.")
        if levels < 1:
            raise ConfigError("levels", f"must be at least 1, got {levels}.")
        self.spatial_dims, self.combine, self.reg_weight = spatial_dims, combine, float(reg_weight)
        self.condition = nn.Sequential(
            nn.Linear(1, embedding_dim), nn.LeakyReLU(0.2), nn.Linear(embedding_dim, embedding_dim), nn.LeakyReLU(0.2)
        )
        level_inputs = 2 * in_channels + spatial_dims
        self.levels = nn.ModuleList(
            [PyramidLevel(spatial_dims, level_inputs, features, res_blocks, embedding_dim) for _ in range(levels)]
        )
        self.warp_image = warp_block("bilinear", "zeros")
        self.warp_field = warp_block("bilinear", "border")

    def forward(
        self, moving: torch.Tensor, fixed: torch.Tensor, reg_weight: float | torch.Tensor | None = None
    ) -> torch.Tensor:
        """``moving``, ``fixed`` ``(B, C, *spatial)`` and λ (a number or ``(B,)``) → displacement in voxels."""
        weight = self.reg_weight if reg_weight is None else reg_weight
        weight = torch.as_tensor(weight, dtype=moving.dtype, device=moving.device).reshape(-1, 1)
        embedding = self.condition(weight.expand(moving.shape[0], 1))
        pyramid = [(moving, fixed)]
        for _ in range(len(self.levels) - 1):
            pyramid.append((_downsample(pyramid[-1][0]), _downsample(pyramid[-1][1])))
        ddf = None
        for level, (mov, fix) in zip(self.levels, reversed(pyramid)):
            if ddf is None:
                prev, warped = mov.new_zeros(mov.shape[0], self.spatial_dims, *mov.shape[2:]), mov
            else:
                prev = _upsample_displacement(ddf, mov.shape[2:])
                warped = self.warp_image(mov, prev)
            residual = level(torch.cat([warped, fix, prev], dim=1), embedding)
            ddf = prev + residual if self.combine == "add" else residual + self.warp_field(prev, residual)
        return ddf


def lapirn(spatial_dims: int = 2, in_channels: int = 1, **kwargs) -> Backbone:
    """The conditional LapIRN behind the backbone contract; ``kwargs`` as :class:`ConditionalLapIRN`.

    Returns:
        a :class:`Backbone` taking ``(moving, fixed)`` ``(B, in_channels, *spatial)`` and
        returning the displacement ``(B, spatial_dims, *spatial)`` in voxels.
    """
    net = ConditionalLapIRN(spatial_dims=spatial_dims, in_channels=in_channels, **kwargs)
    return Backbone(net, inputs="pair", output="ddf", spatial_dims=spatial_dims, in_channels=in_channels)


__all__ = ["ConditionalInstanceNorm", "ConditionalLapIRN", "lapirn"]
