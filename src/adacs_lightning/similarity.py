"""Per-voxel dissimilarity maps ``r(x) ≥ 0``: what every method weights, and what the scorer learns from.

Each similarity maps the warped moving image and the fixed image ``(B, C, *spatial)`` to
``r`` ``(B, 1, *spatial)``, zero (or minimal) where the two correspond perfectly. Methods
take means of ``r`` (weighted or not) inside the field of view; none of them needs to know
which similarity produced it. docs/method.md (section *Similarity*) derives each map.

* :class:`SquaredError`: ``(I_t − I_s∘φ)²``, the paper's data term.
* :class:`LocalNCC`: ``1 − ncc²`` of a local window, MONAI's ``LocalNormalizedCrossCorrelationLoss``
  map (VoxelMorph's NCC); invariant to an affine intensity change between the images.
* :class:`MutualInformation`: each voxel's conditional surprise ``−Σ w_a w_b log p(b|a)`` under
  MONAI's Parzen-window joint histogram; its mean is ``H(I_t) − MI``, so it is minimised by
  maximising MONAI's ``GlobalMutualInformationLoss``'s mutual information.

``kappa`` is each map's residual scale for the momentum weight ``b_T = cos(π/2·min(κ·μ_T, 1))``:
``κ·μ_T`` reaches 1 (so ``b_T = 0``) at a residual typical of a poorly registered pair. The
same scale puts every map on squared error's footing for the scorer (:meth:`Similarity.on_scorer_scale`).
"""

from __future__ import annotations

import torch
from monai.losses import GlobalMutualInformationLoss, LocalNormalizedCrossCorrelationLoss
from torch import nn

from .errors import ConfigError
from .losses import squared_residual

Tensor = torch.Tensor

#: ``κ`` of squared error: the residual scale at which the paper set ``α`` and ``β`` of ``L_se``.
SQUARED_ERROR_KAPPA = 50.0


def _check_pair(warped: Tensor, fixed: Tensor) -> None:
    if warped.shape != fixed.shape:
        raise ValueError(f"warped {tuple(warped.shape)} and fixed {tuple(fixed.shape)} differ in shape")


class Similarity(nn.Module):
    """A per-voxel dissimilarity ``(warped, fixed[, mask]) → r`` ``(B, 1, *spatial)``.

    ``mask`` ``(B, 1, *spatial)`` (1 inside the field of view) is passed to maps whose value
    at a voxel depends on other voxels (the histogram of MI); a pointwise map ignores it.
    """

    #: Residual scale ``κ`` of the momentum weight for this map (see the module docstring).
    kappa: float = SQUARED_ERROR_KAPPA

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def on_scorer_scale(self, residual: Tensor) -> Tensor:
        """``r·κ/50``: the residual on squared error's scale, the one the scorer's loss is set at.

        The score that minimises ``Ŝ·r + α·(1 − Ŝ)²`` at a voxel is ``1 − r/(2α)``: with the paper's
        ``α = 0.02`` it sits mid-range for squared-error residuals (~0.02), but a map whose residuals
        are 25 times larger (LNCC's ~0.5) would score 0 almost everywhere. Rescaling by ``κ``
        (the inverse of a poor pair's residual) keeps ``α`` and ``β`` meaningful for every map.
        Identity for squared error.
        """
        return residual * (self.kappa / SQUARED_ERROR_KAPPA)


class SquaredError(Similarity):
    """``r = (I_t − I_s∘φ)²``, the mean over channels: squared intensity (images in [0, 1]).

    ``κ = 50``: the reference code's scale, ``b_T = 0`` from a mean squared residual of 0.02.
    """

    kappa = SQUARED_ERROR_KAPPA

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        return squared_residual(warped, fixed)


class LocalNCC(Similarity):
    """``r = 1 − ncc²`` in a ``window``-voxel box around each voxel, mean over channels; in [0, 1].

    The squared zero-normalised cross-correlation of MONAI's ``LocalNormalizedCrossCorrelationLoss``
    (rectangular kernel; VoxelMorph uses a window of 9), per voxel. A flat window (variance below
    ``smooth_dr``) carries no correlation and scores 1. ``κ = 2``: ``b_T = 0`` from a mean of 0.5.

    Args:
        spatial_dims: 2 or 3.
        window: odd window size in voxels.
        kernel: ``rectangular``, ``triangular`` or ``gaussian`` (MONAI's kernels).
    """

    kappa = 2.0

    def __init__(self, spatial_dims: int = 2, window: int = 9, kernel: str = "rectangular") -> None:
        super().__init__()
        if window < 3 or window % 2 == 0:
            raise ValueError(f"window must be an odd number of voxels ≥ 3, got {window}")
        self.window = int(window)
        self.ncc = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=spatial_dims, kernel_size=window, kernel_type=kernel, reduction="none"
        )

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        _check_pair(warped, fixed)
        negative_ncc = self.ncc(warped.float(), fixed.float())  # (B, C, *spatial), −ncc² ∈ [−1, 0]
        return (1.0 + negative_ncc).mean(dim=1, keepdim=True).to(warped.dtype)

    def extra_repr(self) -> str:
        return f"window={self.window}"


class MutualInformation(Similarity):
    """Each voxel's share of ``H(I_t) − MI(I_s∘φ, I_t)`` under a Parzen-window joint histogram.

    With MONAI's Gaussian Parzen weights ``w_a(·)`` over ``bins`` intensity bins (images in [0, 1]),
    the joint histogram of one image pair is ``p_ab = mean_x w_a(I_s∘φ(x))·w_b(I_t(x))``, over the
    voxels inside the mask. Then

        r(x) = −Σ_ab w_a(I_s∘φ(x)) · w_b(I_t(x)) · log p(b | a) ≥ 0,

    the expected surprise of the target's intensity given the warped source's, and
    ``mean_x r(x) = H(I_t) − MI``. ``H(I_t)`` does not depend on the displacement, so minimising
    the mean of ``r`` maximises MONAI's mutual information (with ``Ŝ ≡ 1`` the gradients are
    equal); weighted by a score, a voxel's term counts as much as its score. ``log p(b|a)`` is
    MONAI's ``log(p_ab / (p_a p_b))`` (with its smoothing constants) plus ``log p_b``. Invariant to
    any monotone (indeed any one-to-one) intensity remapping, up to the binning. Channels share
    one histogram, as in MONAI. ``κ = 0.5``: ``b_T = 0`` from a conditional entropy of 2 nats, the
    residual measured at the start of AdaCS's warm-up B on speckled pairs (docs/method.md).

    Args:
        bins: histogram bins.
        sigma_ratio: Gaussian Parzen window width, in bin spacings.
    """

    kappa = 0.5

    def __init__(self, bins: int = 23, sigma_ratio: float = 0.5) -> None:
        super().__init__()
        if bins < 2:
            raise ValueError(f"bins must be at least 2, got {bins}")
        self.bins = int(bins)
        self.mi = GlobalMutualInformationLoss(kernel_type="gaussian", num_bins=bins, sigma_ratio=sigma_ratio)

    def forward(self, warped: Tensor, fixed: Tensor, mask: Tensor | None = None) -> Tensor:
        _check_pair(warped, fixed)
        batch, channels, spatial = warped.shape[0], warped.shape[1], warped.shape[2:]
        w_a, _, w_b, _ = self.mi.parzen_windowing(warped.float(), fixed.float())  # (B, N, bins), N = C·voxels
        if mask is None:
            inside = torch.ones(w_a.shape[:2] + (1,), dtype=w_a.dtype, device=w_a.device)
        else:
            inside = mask.to(w_a.dtype).expand(batch, channels, *spatial).reshape(batch, -1, 1)
        count = inside.sum(1, keepdim=True).clamp_min(1.0)  # (B, 1, 1)
        p_a = (w_a * inside).sum(1, keepdim=True) / count  # (B, 1, bins)
        p_b = (w_b * inside).sum(1, keepdim=True) / count
        p_ab = torch.bmm((w_a * inside).transpose(1, 2), w_b) / count  # (B, bins, bins)
        nr, dr = self.mi.smooth_nr, self.mi.smooth_dr
        pointwise_mi = torch.log((p_ab + nr) / (torch.bmm(p_a.transpose(1, 2), p_b) + dr) + dr)
        log_conditional = pointwise_mi + torch.log(p_b + dr)  # log p(b|a) = log p_ab/(p_a p_b) + log p_b
        surprise = -(torch.bmm(w_a, log_conditional) * w_b).sum(-1)  # (B, N)
        return surprise.view(batch, channels, *spatial).mean(dim=1, keepdim=True).to(warped.dtype)

    def extra_repr(self) -> str:
        return f"bins={self.bins}"


SIMILARITIES: dict[str, type[Similarity]] = {"mse": SquaredError, "lncc": LocalNCC, "mi": MutualInformation}


def similarity_from_name(name: str, spatial_dims: int) -> Similarity:
    """``mse``, ``lncc`` or ``mi`` with its default settings (those of ``conf/similarity/<name>.yaml``).

    Raises:
        ConfigError: (a ValueError) for another name; the message lists the known ones.
    """
    if name not in SIMILARITIES:
        raise ConfigError("similarity", f"is {name!r}, not a similarity.", f"Use one of {', '.join(SIMILARITIES)}.")
    if SIMILARITIES[name] is LocalNCC:
        return LocalNCC(spatial_dims=spatial_dims)
    return SIMILARITIES[name]()


__all__ = ["SIMILARITIES", "LocalNCC", "MutualInformation", "Similarity", "SquaredError", "similarity_from_name"]
