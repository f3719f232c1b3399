"""Registration quality measures: label overlap, surface distances and folding of the displacement field."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot

Tensor = torch.Tensor


def dice_per_label(prediction: Tensor, reference: Tensor, labels: Sequence[int]) -> Tensor:
    """Dice overlap of integer label maps, per sample and label.

    Args:
        prediction: ``(B, 1, *spatial)`` integer labels (e.g. the warped source labels).
        reference: ``(B, 1, *spatial)`` integer labels (the target labels).
        labels: the label values to score.

    Returns:
        ``(B, len(labels))`` Dice in [0, 1]; NaN where a label is absent from both maps.
    """
    num_classes = int(max(max(labels), prediction.max().item(), reference.max().item())) + 1
    pred = one_hot(prediction.long(), num_classes)
    ref = one_hot(reference.long(), num_classes)
    dice = compute_dice(pred, ref, include_background=True, ignore_empty=False)
    both_empty = (pred.flatten(2).sum(-1) == 0) & (ref.flatten(2).sum(-1) == 0)
    dice = torch.where(both_empty, torch.full_like(dice, float("nan")), dice)
    return dice[:, list(labels)]


def jacobian_determinant(ddf: Tensor) -> Tensor:
    """Determinant of the Jacobian of ``x ↦ x + ddf(x)``, per voxel.

    Args:
        ddf: ``(B, ndim, *spatial)`` displacement in voxels, channel ``i`` along axis ``i``.

    Returns:
        ``(B, *spatial)``; values ≤ 0 mark folding. Derivatives are central differences
        (one-sided at the border), as ``numpy.gradient``.
    """
    ndim = ddf.shape[1]
    if ddf.ndim != ndim + 2:
        raise ValueError(f"a {ndim}-channel displacement needs {ndim} spatial axes, got shape {tuple(ddf.shape)}")
    # gradients[i][:, j] = ∂u_j/∂x_i
    gradients = torch.gradient(ddf, dim=tuple(range(2, ddf.ndim)))
    jac = torch.stack([g for g in gradients], dim=-1)  # (B, j, *spatial, i)
    jac = jac.movedim(1, -2)  # (B, *spatial, j, i) = ∂u_j/∂x_i
    jac = jac + torch.eye(ndim, dtype=ddf.dtype, device=ddf.device)
    return torch.linalg.det(jac)


def folding_percentage(ddf: Tensor, mask: Tensor | None = None) -> Tensor:
    """Percentage of voxels (inside ``mask`` if given) with a non-positive Jacobian determinant, per sample ``(B,)``."""
    folded = (jacobian_determinant(ddf) <= 0).to(ddf.dtype)
    if mask is None:
        return 100.0 * folded.flatten(1).mean(1)
    inside = mask[:, 0].to(ddf.dtype)
    return 100.0 * (folded * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp_min(1.0)


def surface_distances_per_label(
    prediction: Tensor,
    reference: Tensor,
    labels: Sequence[int],
    spacing: Tensor | Sequence[Sequence[float]] | None = None,
    percentile: float = 95.0,
) -> dict[str, Tensor]:
    """Hausdorff distances and average surface distance of integer label maps, per sample and label, in mm.

    MONAI's ``compute_hausdorff_distance`` (symmetric; the ``percentile``-th and the maximum)
    and ``compute_average_surface_distance`` (symmetric: the mean over both surfaces' points).

    Args:
        prediction, reference: ``(B, 1, *spatial)`` integer labels.
        labels: the label values to score.
        spacing: voxel size in mm per spatial axis, ``(B, ndim)`` or one ``(ndim,)`` for all;
            None for 1 mm.

    Returns:
        ``{"hd95": …, "hd": …, "asd": …}`` (the first key follows ``percentile``), each
        ``(B, len(labels))``; NaN where a label is missing from either map.
    """
    num_classes = int(max(max(labels), prediction.max().item(), reference.max().item())) + 1
    pred = one_hot(prediction.long(), num_classes)[:, list(labels)]
    ref = one_hot(reference.long(), num_classes)[:, list(labels)]
    per_sample = None
    if spacing is not None:
        spacing = torch.as_tensor(spacing, dtype=torch.float64)
        spacing = spacing.expand(pred.shape[0], pred.ndim - 2) if spacing.ndim == 1 else spacing
        per_sample = [[float(v) for v in row] for row in spacing]
    kwargs = dict(include_background=True, spacing=per_sample)
    with warnings.catch_warnings():  # MONAI warns for empty maps; they become NaN below
        warnings.simplefilter("ignore")
        hd_p = compute_hausdorff_distance(pred, ref, percentile=percentile, **kwargs)
        hd = compute_hausdorff_distance(pred, ref, **kwargs)
        asd = compute_average_surface_distance(pred, ref, symmetric=True, **kwargs)
    missing = (pred.flatten(2).sum(-1) == 0) | (ref.flatten(2).sum(-1) == 0)
    key = f"hd{percentile:g}"
    return {
        name: torch.where(missing, torch.full_like(v, float("nan")), v).float()
        for name, v in ((key, hd_p), ("hd", hd), ("asd", asd))
    }
