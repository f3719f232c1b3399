"""Registering every test pair with a trained backbone and measuring each case."""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..correspondence import kept_mass
from ..losses import masked_mean
from ..metrics import dice_near_and_away, dice_per_label, folding_percentage, localisation, surface_distances_per_label
from ..warping import warp_block
from .quality import quality_figures, warp_image

Tensor = torch.Tensor

#: Per-case metrics summarised and compared (the mean over the labels of interest), and their direction.
METRICS = {"dice": "higher", "hd95": "lower", "hd": "lower", "asd": "lower", "folding_pct": "lower", "time_ms": "lower"}
#: Per-case metrics of pairs with a no-correspondence mask (``nocorr``); the scores' only with a weight map.
MECHANISM = {
    "kept_mass": "higher",
    "score_mean": "higher",
    "auroc": "higher",
    "score_nocorr": "lower",
    "score_corr": "higher",
    "dice_near": "higher",
    "dice_away": "higher",
}


def iterate_pairs(batches: Iterable[Mapping[str, Any]]) -> Iterator[dict[str, Any]]:
    """Split collated batches into single pairs ``(1, C, *spatial)`` with their ``case_id`` and ``spacing``."""
    index = 0
    for batch in batches:
        size = batch["source"].shape[0]
        meta = batch.get("meta") or {}
        for i in range(size):
            pair = {k: v[i : i + 1] for k, v in batch.items() if isinstance(v, Tensor)}
            case_ids = meta.get("case_id")
            pair["case_id"] = str(case_ids[i]) if case_ids is not None else f"case_{index:04d}"
            spacing = meta.get("spacing")
            pair["spacing"] = None if spacing is None else torch.as_tensor(spacing[i], dtype=torch.float64)
            if meta.get("direction") is not None:
                pair["direction"] = torch.as_tensor(meta["direction"][i])
            index += 1
            yield pair


class CaseEvaluator:
    """Registers pairs with ``backbone`` and returns one row of metrics per case.

    Args:
        backbone: ``(moving, fixed) → displacement (1, ndim, *spatial)`` in voxels.
        labels: label values of interest; ``names`` maps them to column names (``label<k>`` by default).
        device: where the backbone runs.
        weighting: the whole trained method (a :class:`~adacs_lightning.methods.RegistrationModule`), whose
            weight map (AdaCS's score) is measured against the pairs' no-correspondence masks; None: not measured.

    A row holds ``case_id``; per label ``dice_<name>`` (fraction), ``hd95_<name>``, ``hd_<name>``,
    ``asd_<name>`` (mm, from the pair's spacing; 1 mm when it has none); their means over the labels
    ``dice``, ``hd95``, ``hd``, ``asd``; ``dice_initial`` (before registration); ``folding_pct``
    (% of voxels, inside the field-of-view mask if any, with a non-positive Jacobian determinant)
    and ``time_ms`` (the backbone's forward pass for this pair, after one untimed warm-up call).
    Pairs with a ``nocorr`` mask add ``dice_near``/``dice_away`` (:func:`~adacs_lightning.metrics.dice_near_and_away`)
    and, with a ``weighting`` that has a map, ``auroc``, ``score_nocorr``, ``score_corr``
    (:func:`~adacs_lightning.metrics.localisation`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        labels: Sequence[int],
        names: Mapping[int, str] | None = None,
        device: str | torch.device = "cpu",
        weighting: nn.Module | None = None,
    ) -> None:
        if not labels:
            raise ValueError("no labels of interest to evaluate")
        self.device = torch.device(device)
        self.backbone = backbone.to(self.device).eval()
        self.labels = [int(v) for v in labels]
        self.names = {k: str((names or {}).get(k, f"label{k}")) for k in self.labels}
        self.weighting = weighting.to(self.device).eval() if weighting is not None else None
        self._warm = False
        self._warned_spacing = False

    @torch.no_grad()
    def register(self, source: Tensor, target: Tensor) -> tuple[Tensor, float]:
        """``(displacement, milliseconds)`` for one pair on the evaluator's device."""
        source, target = source.to(self.device), target.to(self.device)
        if not self._warm:
            self.backbone(source, target)
            self._warm = True
        self._sync()
        start = time.perf_counter()
        ddf = self.backbone(source, target)
        self._sync()
        return ddf, 1000.0 * (time.perf_counter() - start)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def evaluate(self, pair: Mapping[str, Any], refiner=None) -> dict[str, Any]:
        """Metrics of one pair from :func:`iterate_pairs` (``source_label``/``target_label`` required).

        With a ``refiner`` (:class:`~adacs_lightning.refine.Refiner`) the network's displacement is refined
        first (``time_ms`` includes it) and the row adds ``objective_before``, ``objective_after``, ``refine_steps``.
        """
        if "source_label" not in pair or "target_label" not in pair:
            raise ValueError(f"case '{pair.get('case_id')}' has no source_label/target_label to evaluate with")
        ddf, ms = self.register(pair["source"], pair["target"])
        refined = None
        if refiner is not None:
            mask = pair.get("mask")
            with torch.enable_grad():
                refined = refiner.refine(
                    pair["source"].to(self.device),
                    pair["target"].to(self.device),
                    ddf,
                    None if mask is None else mask.to(self.device),
                )
            ddf, ms = refined.ddf, ms + 1000.0 * refined.seconds
        spacing = pair.get("spacing")
        if spacing is None and not self._warned_spacing:
            warnings.warn("The data gives no voxel spacing: distances are in voxels (1 mm assumed).", stacklevel=2)
            self._warned_spacing = True
        row = {"case_id": pair["case_id"]}
        row.update(
            case_metrics(
                ddf.float().cpu(),
                pair["source_label"],
                pair["target_label"],
                self.labels,
                self.names,
                spacing,
                pair.get("mask"),
            )
        )
        row["time_ms"] = ms
        if refined is not None:
            record = refined.record(0)
            row.update(
                objective_before=record["objective_before"],
                objective_after=record["objective_after"],
                refine_steps=record["steps"],
            )
        weight, residual, mask = self._weight_map(pair, ddf)
        if weight is not None:
            row["score_mean"] = float(masked_mean(weight, mask))
            row["kept_mass"] = float(kept_mass(weight, residual, mask))
        if pair.get("nocorr") is not None:
            row.update(self._mechanism(pair, ddf, weight, mask))
        return {**row, **self._quality(pair, ddf, weight)}

    def _quality(self, pair: Mapping[str, Any], ddf: Tensor, weight: Tensor | None) -> dict[str, Any]:
        """``adacs-register``'s quality figures and flag for this case (:func:`~.quality.quality_figures`), over the
        target's foreground; the two the row already has over its mask are named ``foreground_folding_pct`` and
        ``foreground_score_mean``. The score counts for a method with a scorer (AdaCS), as in ``adacs-register``."""
        source, target = (pair[k][0].float().mean(0) for k in ("source", "target"))  # (*spatial), channels averaged
        field = ddf[0].float().cpu()
        scored = weight is not None and getattr(self.weighting, "scorer", None) is not None
        score = weight[0, 0].float().cpu() if scored else None
        figures = quality_figures(field, source, target, warp_image(source, field), score)
        return {f"foreground_{k}" if k in ("folding_pct", "score_mean") else k: v for k, v in figures.items()}

    def _weight_map(self, pair: Mapping[str, Any], ddf: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """``(weight, residual, mask)`` of the registered pair: the method's map (Ŝ for AdaCS) and the residual it
        weights ``(1, 1, *spatial)``, and the pair's mask; the first two None without a map."""
        mask = pair.get("mask")
        mask = None if mask is None else mask.to(self.device)
        if self.weighting is None or not hasattr(self.weighting, "weight_map"):
            return None, None, mask
        source, target = pair["source"].to(self.device), pair["target"].to(self.device)
        warped = self.weighting.warp(source, ddf)
        residual = self.weighting.similarity(warped, target, mask)
        return self.weighting.weight_map(target, residual, warped), residual, mask

    def _mechanism(
        self, pair: Mapping[str, Any], ddf: Tensor, weight: Tensor | None, mask: Tensor | None
    ) -> dict[str, float]:
        """Dice near and away from the pair's no-correspondence mask; with a weight map, how well it finds the mask."""
        nocorr = pair["nocorr"].float()
        warped = warp_block("nearest", "border")(pair["source_label"].float(), ddf.float().cpu()).round().long()
        near, away = dice_near_and_away(warped, pair["target_label"].long(), nocorr, self.labels)
        row = {"dice_near": float(near[0]), "dice_away": float(away[0])}
        if weight is not None:
            row.update({k: float(v[0]) for k, v in localisation(weight, nocorr.to(self.device), mask).items()})
        return row


@torch.no_grad()
def case_metrics(
    ddf: Tensor,
    source_label: Tensor,
    target_label: Tensor,
    labels: Sequence[int],
    names: Mapping[int, str],
    spacing: Tensor | Sequence[float] | None = None,
    mask: Tensor | None = None,
) -> dict[str, float]:
    """Label overlap, surface distances and folding of one registered pair.

    Args:
        ddf: ``(1, ndim, *spatial)`` displacement in voxels.
        source_label, target_label: ``(1, 1, *spatial)`` integer label maps.
        labels: label values of interest; ``names`` their column names.
        spacing: mm per voxel (``(ndim,)``), None for 1 mm.
        mask: optional field of view ``(1, 1, *spatial)`` for the folding percentage.

    Returns ``dice_<name>``, ``hd95_<name>``, ``hd_<name>``, ``asd_<name>`` per label, their means
    ``dice``, ``hd95``, ``hd``, ``asd``, ``dice_initial`` (before registration) and ``folding_pct``.
    """
    source_label, target_label = source_label.long(), target_label.long()
    warped = warp_block("nearest", "border")(source_label.float(), ddf.float()).round().long()
    dice = dice_per_label(warped, target_label, labels)[0]
    initial = dice_per_label(source_label, target_label, labels)[0]
    surface = surface_distances_per_label(warped, target_label, labels, spacing)
    row: dict[str, float] = {}
    for j, label in enumerate(labels):
        name = names[label]
        row[f"dice_{name}"] = float(dice[j])
        for metric in ("hd95", "hd", "asd"):
            row[f"{metric}_{name}"] = float(surface[metric][0, j])
    row["dice"] = float(dice.nanmean())
    for metric in ("hd95", "hd", "asd"):
        row[metric] = float(surface[metric][0].nanmean())
    row["dice_initial"] = float(initial.nanmean())
    row["folding_pct"] = float(folding_percentage(ddf, mask)[0])
    return row
