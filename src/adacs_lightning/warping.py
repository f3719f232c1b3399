"""MONAI's warping blocks, built without their note that PyTorch's own ``grid_sample`` is used.

MONAI's ``Warp`` (and ``DVF2DDF``, which holds one) warns at construction when its optional
compiled extension is absent; PyTorch's ``grid_sample`` is then used, which is exact and what this
project expects. The note is silenced here, where the blocks are built, and nowhere else.
"""

from __future__ import annotations

import warnings

from monai.networks.blocks import DVF2DDF, Warp

_NATIVE_NOTE = ".*Using PyTorch native grid_sample.*"


def warp_block(mode: str = "bilinear", padding_mode: str = "border") -> Warp:
    """MONAI ``Warp``: ``warp(image (B, C, *spatial), ddf (B, ndim, *spatial))`` → ``image(x + ddf(x))``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NATIVE_NOTE)
        return Warp(mode=mode, padding_mode=padding_mode)


def integration_block(num_steps: int = 7) -> DVF2DDF:
    """MONAI ``DVF2DDF``: scaling and squaring of a stationary velocity ``(B, ndim, *spatial)`` in voxels."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NATIVE_NOTE)
        return DVF2DDF(num_steps=num_steps)
