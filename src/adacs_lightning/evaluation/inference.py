"""Registering one image pair with a trained backbone: preprocessing, padding, warping."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import DivisiblePad
from monai.utils import convert_to_tensor

from ..backbones import Backbone
from ..data.transforms import INTENSITY_MODES, intensity
from ..errors import AdaCSError
from ..warping import warp_block

Tensor = torch.Tensor


@dataclass
class Registration:
    """Result of :func:`register_arrays`, arrays in the input's shape.

    ``warped``: the source warped onto the target (its original intensities); ``ddf``:
    the displacement ``(ndim, *spatial)`` in voxels; ``warped_labels``: the source labels
    warped with nearest-neighbour interpolation, or None; ``inverse_ddf``: when asked for.
    """

    warped: np.ndarray
    ddf: np.ndarray
    warped_labels: np.ndarray | None = None
    inverse_ddf: np.ndarray | None = None  # (ndim, *spatial): maps the source back onto the target
    refinement: dict | None = None  # what refinement did (objective before/after, steps, seconds, folding)
    network_ddf: np.ndarray | None = None  # the network's own displacement, when refined


def scale_to_unit(array: np.ndarray, mode: str = "minmax") -> Tensor:
    """``(1, *spatial)`` float tensor scaled to [0, 1] as the training data: ``mode`` is ``minmax``
    (the image's min and max) or ``percentile`` (its 1st–99th percentiles, clipped), the ``data.intensity``
    settings of the data modules."""
    if mode not in INTENSITY_MODES:
        raise AdaCSError(f"Intensity scaling must be one of {INTENSITY_MODES}, got {mode!r}.")
    image = torch.as_tensor(array, dtype=torch.float32)[None]
    scaled = intensity(["image"], mode)({"image": image})["image"]
    return convert_to_tensor(scaled, track_meta=False).float()


@dataclass
class NetworkField:
    """What :func:`network_displacement` returns: ``ddf`` ``(ndim, *spatial)`` in voxels, the network's own
    displacement ``network_ddf`` when refined, and the refinement's record."""

    ddf: Tensor
    network_ddf: Tensor | None = None
    refinement: dict | None = None


@torch.no_grad()
def register_arrays(
    backbone: Backbone,
    source: np.ndarray,
    target: np.ndarray,
    source_labels: np.ndarray | None = None,
    scale: str | None = "minmax",
    divisible: int = 16,
    device: str | torch.device = "cpu",
    roi_size: tuple[int, ...] | None = None,
    inverse: bool = False,
    refiner=None,
    target_labels: np.ndarray | None = None,
) -> Registration:
    """Register ``source`` onto ``target`` (both ``(*spatial)``, on one grid) with the backbone alone.

    :func:`network_displacement` then :func:`apply_displacement`, on the images' own grid.
    """
    field = network_displacement(
        backbone, source, target, scale, divisible, device, roi_size, refiner, source_labels, target_labels
    )
    return apply_displacement(source, field, source_labels, inverse)


@torch.no_grad()
def network_displacement(
    backbone: Backbone,
    source: np.ndarray,
    target: np.ndarray,
    scale: str | None = "minmax",
    divisible: int = 16,
    device: str | torch.device = "cpu",
    roi_size: tuple[int, ...] | None = None,
    refiner=None,
    source_labels: np.ndarray | None = None,
    target_labels: np.ndarray | None = None,
) -> NetworkField:
    """The network's displacement ``(ndim, *spatial)`` (voxels) from ``source`` to ``target`` (``(*spatial)``, one grid).

    The network sees both images scaled to [0, 1] by ``scale`` (``minmax`` or ``percentile``, see
    :func:`scale_to_unit`; None uses them as they are) and,
    when ``divisible > 1``, zero-padded symmetrically to a multiple of ``divisible`` per axis
    (U-Net backbones need sizes that divide by their total down-sampling, 16 for VoxelMorph);
    the displacement is cropped back to the input's shape. With ``roi_size`` the network runs on
    overlapping windows of that size, blended with Gaussian weights (MONAI's sliding-window
    inference), for images larger than the network can take at once. A ``refiner``
    (:class:`~adacs_lightning.refine.Refiner`) then optimises the network's displacement for this pair,
    on the scaled images, inside the image (not its padding); with ``source_labels`` and
    ``target_labels`` its label term applies.
    """
    if source.shape != target.shape:
        raise AdaCSError(
            f"source {source.shape} and target {target.shape} differ in shape: resample one onto the other's grid first."
        )
    if source.ndim != backbone.spatial_dims:
        raise AdaCSError(f"The images are {source.ndim}D but the network registers {backbone.spatial_dims}D images.")
    if backbone.in_channels != 1:
        raise AdaCSError(f"The network takes {backbone.in_channels}-channel images; these are scalar images.")
    device = torch.device(device)
    moving, fixed = (
        scale_to_unit(image, scale) if scale else torch.as_tensor(image, dtype=torch.float32)[None]
        for image in (source, target)
    )
    pad = DivisiblePad(k=max(divisible, 1), mode="constant")
    padded_moving, padded_fixed = (convert_to_tensor(pad(image), track_meta=False) for image in (moving, fixed))
    backbone = backbone.to(device).eval()
    try:
        pair = (padded_moving[None].to(device), padded_fixed[None].to(device))
        ddf = _windowed(backbone, *pair, roi_size) if roi_size else backbone(*pair)
        ddf = ddf[0].cpu()
    except (RuntimeError, ValueError) as error:
        raise AdaCSError(
            f"The network could not register images of shape {source.shape} (padded to "
            f"{tuple(padded_moving.shape[1:])}): {error}. U-Net backbones need sizes divisible by their "
            "down-sampling: try --divisible 16 or 32."
        ) from error
    crop = (slice(None), *(slice(lo, lo + n) for lo, n in zip(_pad_before(source.shape, divisible), source.shape)))
    if refiner is None:
        return NetworkField(ddf[crop].contiguous())
    network_ddf = ddf[crop].contiguous().clone()
    ddf, refinement = _refine(refiner, pair, ddf, pad, source, source_labels, target_labels)
    return NetworkField(ddf[crop].contiguous(), network_ddf, refinement)


@torch.no_grad()
def apply_displacement(
    source: np.ndarray, field: NetworkField, source_labels: np.ndarray | None = None, inverse: bool = False
) -> Registration:
    """``source`` (its original intensities) and its labels warped by ``field.ddf`` ``(ndim, *spatial)`` on one grid.

    Labels are warped with nearest-neighbour interpolation; ``inverse`` also returns the inverse
    displacement (fixed-point iteration, :func:`invert_displacement`).
    """
    ddf = field.ddf.float()
    original = torch.as_tensor(source, dtype=torch.float32)[None, None]
    warped = warp_block("bilinear", "border")(original, ddf[None])[0, 0]
    warped_labels = None
    if source_labels is not None:
        if source_labels.shape != source.shape:
            raise AdaCSError(f"source labels {source_labels.shape} and source {source.shape} differ in shape.")
        labels = torch.as_tensor(np.asarray(source_labels), dtype=torch.float32)[None, None]
        warped_labels = warp_block("nearest", "border")(labels, ddf[None])[0, 0].round().numpy()
        warped_labels = warped_labels.astype(np.asarray(source_labels).dtype)
    inverse_ddf = invert_displacement(ddf[None])[0].numpy() if inverse else None
    network_ddf = None if field.network_ddf is None else field.network_ddf.numpy()
    return Registration(warped.numpy(), ddf.numpy(), warped_labels, inverse_ddf, field.refinement, network_ddf)


def _refine(refiner, pair: tuple[Tensor, Tensor], ddf: Tensor, pad, source: np.ndarray, source_labels, target_labels):
    """The refined padded displacement ``(ndim, *padded)`` and the refinement's record; the padding is masked out."""
    device = pair[0].device
    inside = convert_to_tensor(pad(torch.ones((1, *source.shape))), track_meta=False)[None].to(device)
    labels = {}
    if source_labels is not None and target_labels is not None:
        for key, array in (("moving_label", source_labels), ("fixed_label", target_labels)):
            tensor = torch.as_tensor(np.rint(np.asarray(array, dtype=np.float64)), dtype=torch.float32)[None]
            labels[key] = convert_to_tensor(pad(tensor), track_meta=False)[None].to(device)
    with torch.enable_grad():
        refinement = refiner.refine(*pair, ddf[None].to(device), mask=inside, **labels)
    return refinement.ddf[0].detach().cpu(), refinement.record(0)


def _windowed(backbone: Backbone, moving: Tensor, fixed: Tensor, roi_size: tuple[int, ...]) -> Tensor:
    """The displacement from overlapping windows of ``roi_size`` (MONAI ``sliding_window_inference``)."""
    from monai.inferers import sliding_window_inference

    channels = moving.shape[1]

    def predict(pair: Tensor) -> Tensor:
        return backbone(pair[:, :channels], pair[:, channels:])

    return sliding_window_inference(
        torch.cat([moving, fixed], dim=1), roi_size, sw_batch_size=1, predictor=predict, overlap=0.25, mode="gaussian"
    )


def invert_displacement(ddf: Tensor, iterations: int = 30) -> Tensor:
    """The inverse ``v`` of a displacement ``u`` ``(B, ndim, *spatial)`` in voxels: ``v(y) = −u(y + v(y))``.

    Fixed-point iteration, as ITK's ``InvertDisplacementFieldImageFilter``; it converges for
    fields without folding. ``x + u(x)`` maps target to source voxels; ``y + v(y)`` maps back.
    """
    warp = warp_block("bilinear", "border")
    inverse = -ddf
    for _ in range(iterations):
        inverse = -warp(ddf, inverse)
    return inverse


def _pad_before(shape: tuple[int, ...], divisible: int) -> list[int]:
    """Voxels :class:`~monai.transforms.DivisiblePad` (symmetric) adds before each axis."""
    k = max(divisible, 1)
    return [(-(-n // k) * k - n) // 2 for n in shape]
