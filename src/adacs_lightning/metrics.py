"""Registration quality measures: label overlap, surface distances and folding of the displacement field,
and :class:`ValidationMetrics`, the epoch means a training run logs at validation."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence

import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance, prepare_spacing
from monai.networks.utils import one_hot
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric

from .losses import gradient_energy, masked_mean
from .warping import warp_block

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
        ``(B, *spatial)`` in the field's precision (a half-precision field from mixed-precision training is
        cast up to float32); values ≤ 0 mark folding. Derivatives are central
        differences (one-sided at the border), as ``numpy.gradient``.
    """
    if ddf.dtype in (torch.float16, torch.bfloat16) or not ddf.is_floating_point():
        ddf = ddf.float()
    ndim = ddf.shape[1]
    if ddf.ndim != ndim + 2:
        raise ValueError(f"a {ndim}-channel displacement needs {ndim} spatial axes, got shape {tuple(ddf.shape)}")
    # gradients[i][:, j] = ∂u_j/∂x_i; J[j][i] = δ_ij + ∂u_j/∂x_i, each (B, *spatial)
    gradients = torch.gradient(ddf, dim=tuple(range(2, ddf.ndim)))
    jac = [[gradients[i][:, j] + 1.0 if i == j else gradients[i][:, j] for i in range(ndim)] for j in range(ndim)]
    if ndim == 2:  # the determinant written out: elementwise, where a batched LU per voxel is slow
        return jac[0][0] * jac[1][1] - jac[0][1] * jac[1][0]
    if ndim == 3:
        minors = [jac[1][1] * jac[2][2] - jac[1][2] * jac[2][1], jac[1][0] * jac[2][2] - jac[1][2] * jac[2][0],
                  jac[1][0] * jac[2][1] - jac[1][1] * jac[2][0]]  # fmt: skip
        return jac[0][0] * minors[0] - jac[0][1] * minors[1] + jac[0][2] * minors[2]
    return torch.linalg.det(torch.stack([torch.stack(row, dim=-1) for row in jac], dim=-2))


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

    As MONAI's ``compute_hausdorff_distance`` (symmetric; the ``percentile``-th and the maximum)
    and ``compute_average_surface_distance`` (symmetric: the mean over both surfaces' points),
    from one call of MONAI's ``get_edge_surface_distance`` per sample and label: the binary
    masks of the requested labels are built one at a time and their edge distances are computed
    once for all three measures.

    Args:
        prediction, reference: ``(B, 1, *spatial)`` integer labels.
        labels: the label values to score.
        spacing: voxel size in mm per spatial axis, ``(B, ndim)`` or one ``(ndim,)`` for all;
            None for 1 mm.

    Returns:
        ``{"hd95": …, "hd": …, "asd": …}`` (the first key follows ``percentile``), each
        ``(B, len(labels))`` float32; NaN where a label is missing from either map.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    batch, ndim = prediction.shape[0], prediction.ndim - 2
    per_sample = None
    if spacing is not None:
        spacing = torch.as_tensor(spacing, dtype=torch.float64)
        spacing = spacing.expand(batch, ndim) if spacing.ndim == 1 else spacing
        per_sample = [[float(v) for v in row] for row in spacing]
    spacings = prepare_spacing(spacing=per_sample, batch_size=batch, img_dim=ndim)
    key = f"hd{percentile:g}"
    out = {name: torch.full((batch, len(labels)), float("nan")) for name in (key, "hd", "asd")}
    for b, (j, label) in itertools.product(range(batch), enumerate(labels)):
        pred, ref = prediction[b, 0] == label, reference[b, 0] == label
        if not (pred.any() and ref.any()):
            continue  # missing from a map: NaN
        with warnings.catch_warnings():  # MONAI's own call of a deprecated argument of get_mask_edges
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            _, distances, _ = get_edge_surface_distance(
                pred, ref, spacing=spacings[b], symmetric=True, class_index=int(label), warn_empty=False
            )
        distances = [d.double() for d in distances]  # pred → ref, ref → pred
        out[key][b, j] = max(torch.quantile(d, percentile / 100.0) for d in distances)
        out["hd"][b, j] = max(d.max() for d in distances)
        out["asd"][b, j] = torch.cat(distances).mean()
    return out


def localisation(weight: Tensor, nocorr: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """How well a weight map finds the voxels without correspondence, per pair.

    Args:
        weight: ``(B, 1, *spatial)`` the method's weight of each voxel's residual (the score ``Ŝ``), in [0, 1].
        nocorr: ``(B, 1, *spatial)`` 1 where the target has no counterpart in the source.
        mask: optional field of view ``(B, 1, *spatial)``; only voxels inside it count.

    Returns ``(B,)`` tensors: ``auroc``, the area under the ROC curve of ``1 − weight`` as a detector
    of ``nocorr`` (0.5: no better than chance; 1: every such voxel weighted below every other);
    ``score_nocorr`` and ``score_corr``, the mean weight inside and outside ``nocorr``. Each is NaN
    for a pair where that region is empty (no AUROC without both classes).
    """
    from torchmetrics.functional.classification import binary_auroc

    rows: dict[str, list[Tensor]] = {"auroc": [], "score_nocorr": [], "score_corr": []}
    nan = weight.new_tensor(float("nan"))
    for i in range(weight.shape[0]):
        inside = torch.ones_like(nocorr[i], dtype=torch.bool) if mask is None else mask[i] > 0.5
        lost = (nocorr[i] > 0.5) & inside
        kept = (nocorr[i] <= 0.5) & inside
        w = weight[i].float()
        rows["score_nocorr"].append(w[lost].mean() if bool(lost.any()) else nan)
        rows["score_corr"].append(w[kept].mean() if bool(kept.any()) else nan)
        if bool(lost.any()) and bool(kept.any()):
            rows["auroc"].append(binary_auroc(1.0 - w[inside], lost[inside].long()))
        else:
            rows["auroc"].append(nan)
    return {k: torch.stack(v) for k, v in rows.items()}


def dice_near_and_away(
    warped_label: Tensor, target_label: Tensor, nocorr: Tensor, labels: Sequence[int], margin: int = 3
) -> tuple[Tensor, Tensor]:
    """Dice of the labels within ``margin`` voxels of ``nocorr`` and away from it, per pair.

    Args:
        warped_label, target_label: ``(B, 1, *spatial)`` integer label maps.
        nocorr: ``(B, 1, *spatial)`` 1 where the target has no counterpart in the source.
        labels: label values whose mean Dice is returned.
        margin: the neighbourhood, in voxels (a cube of side ``2·margin + 1`` around each such voxel).

    Returns ``(near, away)``, each ``(B,)``: the mean over ``labels`` of the Dice restricted to that
    region; NaN where no label of interest falls in it.
    """
    pool = torch.nn.functional.max_pool2d if nocorr.ndim == 4 else torch.nn.functional.max_pool3d
    near = pool(nocorr.float(), kernel_size=2 * margin + 1, stride=1, padding=margin) > 0.5
    results = []
    for region in (near, ~near):
        dice = dice_per_label(warped_label * region, target_label * region, labels)
        results.append(dice.nanmean(dim=1))
    return results[0], results[1]


class ValidationMetrics(nn.Module):
    """The validation means of a training run: torchmetrics ``MeanMetric``s keyed by the names they are logged under.

    :meth:`update` takes one batch's registration and returns the metrics to log; Lightning computes,
    synchronises across processes and resets them at the epoch's end. Every pair counts once:

    * ``val/residual``, ``val/smoothness`` (``mean‖∇u‖²``), ``val/displacement`` (mean ``|u|``, voxels),
      ``val/folding_pct``: inside the field of view;
    * ``val/auroc``, ``val/score_nocorr``, ``val/score_corr`` (:func:`localisation`) for pairs with a
      no-correspondence mask, of a method with a weight map;
    * ``val/dice`` (mean over the labels), ``val/dice_identity`` (before registration) and
      ``val/dice_label<k>`` for pairs with labels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.warp_labels = warp_block("nearest", "border")
        names = ("residual", "smoothness", "displacement", "folding_pct")
        self.field = nn.ModuleDict({name: MeanMetric() for name in names})
        self.localisation = nn.ModuleDict(
            {name: MeanMetric(nan_strategy="ignore") for name in ("auroc", "score_nocorr", "score_corr")}
        )
        self.dice = MeanMetric(nan_strategy="ignore")
        self.dice_identity = MeanMetric(nan_strategy="ignore")
        self.dice_per_label = nn.ModuleDict()

    def update(
        self,
        ddf: Tensor,
        residual: Tensor,
        mask: Tensor | None = None,
        weight: Tensor | None = None,
        nocorr: Tensor | None = None,
        labels: tuple[Tensor | None, Tensor | None, Sequence[int] | None] = (None, None, None),
    ) -> dict[str, Metric]:
        """Add one batch; returns ``{logged name: metric}`` for what this batch measured.

        Args:
            ddf: ``(B, ndim, *spatial)`` displacement in voxels; residual: ``(B, 1, *spatial)`` its ``r``.
            mask: field of view ``(B, 1, *spatial)``.
            weight: the method's weight map ``(B, 1, *spatial)`` (None: ``Ŝ ≡ 1``); nocorr: where the
                target has no counterpart ``(B, 1, *spatial)``.
            labels: ``(source label, target label, label values)``: integer maps ``(B, 1, *spatial)`` (None
                without), and the values to score (None: every non-zero value in the target's map).
        """
        pairs = [slice(i, i + 1) for i in range(ddf.shape[0])]

        def per_pair(values: Tensor, fn=masked_mean) -> Tensor:
            return torch.stack([fn(values[i], None if mask is None else mask[i]) for i in pairs])

        self.field["residual"].update(per_pair(residual))
        self.field["smoothness"].update(per_pair(ddf, gradient_energy))
        self.field["displacement"].update(per_pair(ddf.norm(dim=1, keepdim=True)))
        self.field["folding_pct"].update(folding_percentage(ddf, mask))
        logged: dict[str, Metric] = {f"val/{name}": metric for name, metric in self.field.items()}
        if nocorr is not None and weight is not None:
            for name, values in localisation(weight, nocorr, mask).items():
                self.localisation[name].update(values)
                logged[f"val/{name}"] = self.localisation[name]
        source_label, target_label, values = labels
        if source_label is not None and target_label is not None:
            values = values or [int(v) for v in torch.unique(target_label).tolist() if v != 0]
            if values:  # no label in these maps: no Dice
                logged.update(self._update_dice(ddf, source_label, target_label, values))
        return logged

    def _update_dice(self, ddf: Tensor, source_label: Tensor, target_label: Tensor, labels: Sequence[int]):
        # float32 whatever the precision: bf16 cannot hold label values above 256 exactly
        warped_label = self.warp_labels(source_label.float(), ddf.float()).round().long()
        dice = dice_per_label(warped_label, target_label, labels)
        self.dice.update(dice.nanmean(dim=1))
        self.dice_identity.update(dice_per_label(source_label, target_label, labels).nanmean(dim=1))
        for column, label in enumerate(labels):
            self._label_metric(label, dice.device).update(dice[:, column])
        logged: dict[str, Metric] = {"val/dice_identity": self.dice_identity}
        logged.update({f"val/dice_label{k}": metric for k, metric in self.dice_per_label.items()})
        logged["val/dice"] = self.dice
        return logged

    def _label_metric(self, label: int, device: torch.device) -> MeanMetric:
        key = str(label)
        if key not in self.dice_per_label:
            self.dice_per_label[key] = MeanMetric(nan_strategy="ignore").to(device)
        return self.dice_per_label[key]
