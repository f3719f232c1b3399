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

    :func:`padded_network_field`, then, with a ``refiner`` (:class:`~adacs_lightning.refine.Refiner`), its
    optimisation for this pair on the scaled images inside the image (not its padding), with the label term
    when ``source_labels`` and ``target_labels`` are given (:func:`refine_fields`).
    """
    labels = (source_labels, target_labels) if refiner is not None else (None, None)
    padded = padded_network_field(backbone, source, target, scale, divisible, device, roi_size, *labels)
    return refine_fields(refiner, [padded])[0]


@dataclass
class PaddedField:
    """The network's displacement for one pair on the padded grid it ran on, and what refining it needs.

    ``moving``, ``fixed``: the scaled, padded images ``(1, C, *padded)``; ``ddf``: ``(1, ndim, *padded)`` in
    voxels; ``inside``: 1 on the image, 0 on its padding ``(1, 1, *padded)``; ``labels``: ``moving_label`` and
    ``fixed_label`` ``(1, 1, *padded)`` when given; ``crop``: the image's region of the padded grid.
    """

    moving: Tensor
    fixed: Tensor
    ddf: Tensor
    inside: Tensor
    crop: tuple[slice, ...]
    labels: dict[str, Tensor]

    def network_field(self, refined: Tensor | None = None, refinement: dict | None = None) -> NetworkField:
        """The field on the image's own grid; with ``refined`` ``(ndim, *padded)``, that one and the network's."""
        network = self.ddf[0].cpu()[self.crop].contiguous()
        if refined is None:
            return NetworkField(network)
        return NetworkField(refined[self.crop].contiguous(), network, refinement)


@torch.no_grad()
def padded_network_field(
    backbone: Backbone,
    source: np.ndarray,
    target: np.ndarray,
    scale: str | None = "minmax",
    divisible: int = 16,
    device: str | torch.device = "cpu",
    roi_size: tuple[int, ...] | None = None,
    source_labels: np.ndarray | None = None,
    target_labels: np.ndarray | None = None,
) -> PaddedField:
    """The network's displacement for ``source`` → ``target`` (``(*spatial)``, one grid) on its padded grid.

    The network sees both images scaled to [0, 1] by ``scale`` (``minmax`` or ``percentile``, see
    :func:`scale_to_unit`; None uses them as they are) and,
    when ``divisible > 1``, zero-padded symmetrically to a multiple of ``divisible`` per axis
    (U-Net backbones need sizes that divide by their total down-sampling, 16 for VoxelMorph).
    With ``roi_size`` the network runs on overlapping windows of that size, blended with Gaussian
    weights (MONAI's sliding-window inference), for images larger than the network can take at once.
    Label maps, when both are given, are padded alike for refinement's label term.
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

    def padded(image: Tensor) -> Tensor:  # (C, *spatial) → (1, C, *padded) on the device
        return convert_to_tensor(pad(image), track_meta=False)[None].to(device)

    padded_moving, padded_fixed = padded(moving), padded(fixed)
    backbone = backbone.to(device).eval()
    try:
        ddf = (
            _windowed(backbone, padded_moving, padded_fixed, roi_size)
            if roi_size
            else backbone(padded_moving, padded_fixed)
        )
    except (RuntimeError, ValueError) as error:
        raise AdaCSError(
            f"The network could not register images of shape {source.shape} (padded to "
            f"{tuple(padded_moving.shape[2:])}): {error}. U-Net backbones need sizes divisible by their "
            "down-sampling: try --divisible 16 or 32."
        ) from error
    crop = (slice(None), *(slice(lo, lo + n) for lo, n in zip(_pad_before(source.shape, divisible), source.shape)))
    labels = {}
    if source_labels is not None and target_labels is not None:
        for key, array in (("moving_label", source_labels), ("fixed_label", target_labels)):
            labels[key] = padded(
                torch.as_tensor(np.rint(np.asarray(array, dtype=np.float64)), dtype=torch.float32)[None]
            )
    inside = padded(torch.ones((1, *source.shape)))
    return PaddedField(padded_moving, padded_fixed, ddf, inside, crop, labels)


def refine_fields(refiner, fields: list[PaddedField]) -> list[NetworkField]:
    """Each pair's field refined by ``refiner``, pairs of one padded shape (and the same labels given) in one batch;
    without a refiner, the network's fields.

    Adam is elementwise and every term is per pair, so a pair refined in a batch moves as if alone
    (:func:`~adacs_lightning.refine.minimise_per_pair`); batching only shares each step's passes over the images.
    """
    if refiner is None:
        return [field.network_field() for field in fields]
    groups: dict[tuple, list[int]] = {}
    for index, field in enumerate(fields):
        groups.setdefault((tuple(field.moving.shape), tuple(sorted(field.labels))), []).append(index)
    refined: list[NetworkField | None] = [None] * len(fields)
    for members in groups.values():

        def stacked(name: str, members=members) -> Tensor:
            return torch.cat([getattr(fields[i], name) for i in members])

        labels = {key: torch.cat([fields[i].labels[key] for i in members]) for key in fields[members[0]].labels}
        with torch.enable_grad():
            refinement = refiner.refine(
                stacked("moving"), stacked("fixed"), stacked("ddf"), mask=stacked("inside"), **labels
            )
        for row, index in enumerate(members):
            refined[index] = fields[index].network_field(refinement.ddf[row].detach().cpu(), refinement.record(row))
    return refined


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
