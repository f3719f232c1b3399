"""MONAI's GlobalNet (an affine registration network) with its image size read from the data config."""

from __future__ import annotations

from collections.abc import Sequence

from monai.networks.nets import GlobalNet
from monai.utils import ensure_tuple_rep

from ._checks import check_divisible
from .adapter import Backbone


def globalnet(
    spatial_dims: int = 2,
    in_channels: int = 1,
    image_size: int | Sequence[int] = 128,
    num_channel_initial: int = 16,
    depth: int = 3,
) -> Backbone:
    """GlobalNet (Hu et al., 2018): predicts an affine map and returns its displacement.

    MONAI's ``GlobalNet`` needs the image size per axis (its dense layer sees the whole
    bottleneck); ``image_size`` may be one number for a square/cubic image. The output is
    ``affine(x) - x`` in voxels, ``(B, spatial_dims, *image_size)``, starting at identity.
    Sizes must divide by ``2**depth`` and every batch must have exactly ``image_size``.
    """
    size = [int(s) for s in ensure_tuple_rep(image_size, spatial_dims)]
    check_divisible(size, 2**depth, "image_size", "GlobalNet", f"depth {depth} halves the size {depth} times")
    net = GlobalNet(
        image_size=size,
        spatial_dims=spatial_dims,
        in_channels=2 * in_channels,
        num_channel_initial=num_channel_initial,
        depth=depth,
    )
    return Backbone(net, inputs="concat", output="ddf", spatial_dims=spatial_dims, in_channels=in_channels)


__all__ = ["globalnet"]
