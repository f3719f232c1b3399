"""The loss terms of the training methods (docs/method.md), as pure functions: tensors in, tensor out.

Shapes: images and score maps are ``(B, C, *spatial)``; a dissimilarity map ``r`` is
``(B, 1, *spatial)`` (:mod:`adacs_lightning.similarity`); displacement fields are
``(B, ndim, *spatial)`` in voxels; an optional field-of-view ``mask`` is
``(B, 1, *spatial)`` with 1 inside the imaged region. Every data term is a mean
over the voxels inside the mask (over the whole batch at once); gradient
penalties are means over the neighbouring voxel pairs that both lie inside it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

Tensor = torch.Tensor


def squared_residual(warped: Tensor, target: Tensor) -> Tensor:
    """Per-voxel squared intensity residual ``r = (I_t - I_s∘φ)²``, mean over channels.

    Args:
        warped: the warped source ``(B, C, *spatial)``.
        target: the target ``(B, C, *spatial)``.

    Returns:
        ``(B, 1, *spatial)``, in squared intensity units.
    """
    if warped.shape != target.shape:
        raise ValueError(f"warped {tuple(warped.shape)} and target {tuple(target.shape)} differ in shape")
    return (target - warped).pow(2).mean(dim=1, keepdim=True)


def masked_mean(values: Tensor, mask: Tensor | None = None, per_sample: bool = False) -> Tensor:
    """Mean of ``values`` over the voxels inside ``mask`` (all voxels when ``mask`` is None).

    ``values`` ``(B, C, *spatial)`` and ``mask`` ``(B, 1, *spatial)`` broadcast; the
    mean is taken over the batch, channels and masked voxels together, or, with
    ``per_sample``, over each sample's channels and voxels (``(B,)``). A mask with
    no voxel inside gives 0 rather than NaN.
    """
    if mask is None:
        return values.flatten(1).mean(1) if per_sample else values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    if per_sample:
        return (values * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def mean_of(values: Iterable[Tensor]) -> Tensor:
    """The mean of scalar tensors (the tensor itself when there is one, so one direction adds no rounding)."""
    values = list(values)
    return values[0] if len(values) == 1 else torch.stack(values).mean()


def gradient_energy(field: Tensor, mask: Tensor | None = None, per_sample: bool = False) -> Tensor:
    """Mean squared spatial gradient ``mean ‖∇x‖²`` of a field ``(B, C, *spatial)``.

    Forward differences along each spatial axis, squared, summed over axes and
    averaged over voxels and channels; an axis of length 1 adds nothing. With a
    ``mask`` ``(B, 1, *spatial)``, each axis's mean runs over the differences whose
    two voxels both lie inside it. For a displacement field this is VoxelMorph's
    ``Grad('l2')`` up to its division by the number of axes (so λ here is ndim times
    that λ); for a score map (C = 1) it is ``L_smooth``. Forward differences, unlike
    central ones, also penalise a two-voxel checkerboard. ``per_sample`` gives each sample's ``(B,)``.
    """
    total = field.new_zeros(field.shape[0]) if per_sample else field.new_zeros(())
    for axis in (a for a in range(2, field.ndim) if field.shape[a] > 1):
        squared = torch.diff(field, dim=axis).pow(2)
        both_inside = None
        if mask is not None:
            length = field.shape[axis]
            both_inside = mask.narrow(axis, 0, length - 1) * mask.narrow(axis, 1, length - 1)
        total = total + masked_mean(squared, both_inside, per_sample)
    return total


#: How a score map weights the dissimilarity in the backbone's data term (docs/method.md, *Data weighting*).
DATA_WEIGHTINGS = ("mean", "normalised", "scalar")


def displacement_data_term(
    residual: Tensor,
    score: Tensor | None,
    mask: Tensor | None = None,
    weighting: str = "mean",
    per_sample: bool = False,
) -> Tensor:
    """Data term of ``L_de`` inside the mask, the score detached; ``Ŝ ≡ 1`` when ``score`` is None.

    * ``mean`` (the paper): ``mean(sg(Ŝ)·r)``; a mean score below 1 also shrinks the data term
      against ``λ`` (stronger smoothing).
    * ``normalised``: ``Σ sg(Ŝ)·r / Σ sg(Ŝ)``: the same balance against ``λ`` as the baseline, so
      only the spatial re-weighting remains.
    * ``scalar`` (a control): ``mean(r)·mean(sg(Ŝ))``: the shrinkage of ``mean`` without any
      spatial information.

    This is also ``μ_T``, the residual statistic that drives the momentum weight. ``per_sample`` gives
    each sample's ``(B,)`` (registration-time refinement).
    """
    if weighting not in DATA_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {DATA_WEIGHTINGS}, got {weighting!r}")
    if score is None:
        return masked_mean(residual, mask, per_sample)
    score = score.detach()
    if weighting == "mean":
        return masked_mean(score * residual, mask, per_sample)
    if weighting == "normalised":
        total = masked_mean(score, mask, per_sample)
        return masked_mean(score * residual, mask, per_sample) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return masked_mean(residual, mask, per_sample) * masked_mean(score, mask, per_sample)


def closed_form_score(residual: Tensor, alpha: float) -> Tensor:
    """``S* = clip(1 − r/(2α), 0, 1)``: the pointwise minimiser of ``S·r + α·(1 − S)²`` over ``S ∈ [0, 1]``.

    Without ``L_smooth`` and the scorer's limited capacity, AdaCS's score tends to this per voxel.
    Weighting ``r`` by ``sg(S*)`` gives the gradient of the truncated quadratic
    ``ρ(r) = r − r²/(4α)`` for ``r < 2α``, ``α`` beyond: a classical robust penalty.
    Same shape as ``residual``, no gradient.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    return (1.0 - residual.detach() / (2.0 * alpha)).clamp(0.0, 1.0)


def correspondence_loss(score: Tensor, residual: Tensor, mask: Tensor | None = None, detach: bool = True) -> Tensor:
    """``L_ucs = mean(Ŝ·sg(r))``: the residual is detached so the scorer never moves the backbone.

    ``detach=False`` keeps the residual's graph: the reference code's gradient leak, for reproduction only.
    """
    return masked_mean(score * (residual.detach() if detach else residual), mask)


def score_regulariser(score: Tensor, mask: Tensor | None = None) -> Tensor:
    """``L_reg = mean((1 - Ŝ)²)``, the guard against the trivial answer ``Ŝ ≡ 0``."""
    return masked_mean((1.0 - score).pow(2), mask)


def scoring_loss(
    score: Tensor,
    residual: Tensor,
    alpha: float,
    beta: float,
    momentum: Tensor | float,
    mask: Tensor | None = None,
    detach_residual: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``L_se = L_ucs + α·L_reg + β·m_T·L_smooth`` (``detach_residual``: see :func:`correspondence_loss`).

    Returns:
        ``(L_se, L_ucs, L_reg, L_smooth)``, each a scalar.
    """
    ucs = correspondence_loss(score, residual, mask, detach_residual)
    reg = score_regulariser(score, mask)
    smooth = gradient_energy(score, mask)
    return ucs + alpha * reg + beta * momentum * smooth, ucs, reg, smooth


def beta_nll(residual: Tensor, log_variance: Tensor, beta: float = 0.5, mask: Tensor | None = None) -> Tensor:
    """β-NLL (Seitzer et al., ICLR 2022): the per-voxel Gaussian NLL weighted by ``sg(σ^{2β})``, mean inside the mask.

    The per-voxel NLL is ``0.5·(r/σ² + log σ²)`` (the constant ``0.5·log 2π`` left out); ``beta = 0``
    is the plain heteroscedastic NLL, ``beta = 1`` gives the mean-squared-error gradient to the residual.

    Args:
        residual: the squared residual ``r`` ``(B, 1, *spatial)`` (not detached: the backbone learns from it).
        log_variance: the predicted ``log σ²`` ``(B, 1, *spatial)``.
        beta: the exponent ``β ≥ 0``.
        mask: optional field of view ``(B, 1, *spatial)``.
    """
    if beta < 0:
        raise ValueError(f"beta must be non-negative, got {beta}")
    weight = torch.exp(beta * log_variance.detach())
    return masked_mean(weight * _voxel_nll(residual, log_variance), mask)


def _voxel_nll(residual: Tensor, log_variance: Tensor) -> Tensor:
    return 0.5 * (residual * torch.exp(-log_variance) + log_variance)
