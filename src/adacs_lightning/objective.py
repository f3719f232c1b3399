"""The registration network's objective, shared by every method, by evaluation and by refinement (docs/method.md).

A functional core of tensor functions (the dissimilarity map of a warped image, the smoothness of a
field, the label term, the sum over a micro-batch's directions) and :class:`BackboneObjective`,
which holds one run's settings (similarity, ``λ``, the field ``λ`` penalises, the label weight)
and calls them. Methods differ only in the weight maps they pass in.

Shapes: images ``(B, C, *spatial)``; a dissimilarity map ``r`` ``(B, 1, *spatial)``; displacements
``(B, ndim, *spatial)`` in voxels; an optional field-of-view ``mask`` ``(B, 1, *spatial)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import nn

from .backbones import Backbone, RegistrationOutput
from .errors import ConfigError
from .losses import displacement_data_term, gradient_energy, mean_of
from .similarity import Similarity, SquaredError, similarity_from_name
from .warping import warp_block

Tensor = torch.Tensor

#: Which field ``λ`` penalises: the displacement, or the velocity before integration (the reference).
SMOOTHNESS_TARGETS = ("displacement", "velocity")


@dataclass
class Direction:
    """One registration direction of a micro-batch: what it warps onto what, and how well.

    ``residual`` is the similarity's dissimilarity map ``r`` ``(B, 1, *spatial)``; labels are
    ``(B, 1, *spatial)`` integer maps when the batch has them (for label supervision only).
    """

    moving: Tensor
    fixed: Tensor
    output: RegistrationOutput
    residual: Tensor
    moving_label: Tensor | None = None
    fixed_label: Tensor | None = None
    warped: Tensor | None = None  # ``moving`` warped by the displacement (with its graph), ``fixed``'s shape


# ---------------------------------------------------------------------- the functional core
def split_batch(stacked: Tensor | None, parts: int) -> list[Tensor | None]:
    """A map computed for ``parts`` directions at once ``(parts·B, …)``, back as one ``(B, …)`` per direction."""
    return [None] * parts if stacked is None else list(stacked.chunk(parts, dim=0))


def warped_residual(
    similarity: Similarity, warp: nn.Module, moving: Tensor, fixed: Tensor, ddf: Tensor, mask: Tensor | None = None
) -> Tensor:
    """``r`` ``(B, 1, *spatial)``: ``similarity``'s map of ``moving`` warped by ``ddf`` (``warp``, MONAI's) against ``fixed``."""
    return similarity(warp(moving, ddf), fixed, mask)


def field_smoothness(output: RegistrationOutput, mask: Tensor | None, on: str = "displacement") -> Tensor:
    """``mean‖∇u‖²`` of the displacement, or (``on="velocity"``) of the velocity on its integration grid, inside the mask."""
    if on == "displacement" or output.velocity is None:
        return gradient_energy(output.ddf, mask)
    velocity = output.velocity
    if mask is not None and mask.shape[2:] != velocity.shape[2:]:
        mask = F.interpolate(mask.float(), size=tuple(velocity.shape[2:]), mode="nearest")
    return gradient_energy(velocity, mask)


def label_dice_loss(
    dice: DiceLoss, warp: nn.Module, moving_label: Tensor, fixed_label: Tensor, ddf: Tensor, per_sample: bool = False
) -> Tensor:
    """``dice`` (a MONAI Dice loss) between the one-hot moving labels warped by ``ddf`` and the fixed labels.

    Labels are ``(B, 1, *spatial)`` integer maps. The label values present (and 0, the background) are
    numbered 0…K−1 before the one-hot, so large values (FreeSurfer's 2035) cost K channels, not 2036;
    values 0…K−1 are left as they are. The warp is ``warp`` (bilinear: differentiable in the displacement).
    ``per_sample``: ``dice`` must reduce nothing (``reduction="none"``); returns ``(B,)``, each pair's mean
    over the labels present in that pair, so that a pair's term does not depend on the rest of its batch.
    """
    present = torch.cat([moving_label.flatten(), fixed_label.flatten(), moving_label.new_zeros(1)])
    values = torch.unique(present)
    moving, fixed = (torch.searchsorted(values, label.long().contiguous()) for label in (moving_label, fixed_label))
    classes = len(values)
    loss = dice(warp(one_hot(moving, classes).float(), ddf.float()), one_hot(fixed, classes).float())
    if not per_sample:
        return loss
    loss = loss.flatten(2).mean(2)  # (B, C') with C' the channels Dice kept
    channels = torch.arange(classes - loss.shape[1], classes, device=loss.device)
    in_pair = torch.stack(
        [torch.isin(channels, torch.cat([moving[i].flatten(), fixed[i].flatten()])) for i in range(loss.shape[0])]
    ).to(loss.dtype)
    return (loss * in_pair).sum(1) / in_pair.sum(1).clamp_min(1.0)


def data_terms(
    directions: Sequence[Direction],
    weights: Sequence[Tensor | None],
    mask: Tensor | None,
    weighting: str = "mean",
) -> Tensor:
    """The weighted data term averaged over directions (:func:`~adacs_lightning.losses.displacement_data_term`)."""
    return mean_of(displacement_data_term(d.residual, w, mask, weighting) for d, w in zip(directions, weights))


# ---------------------------------------------------------------------- one run's objective
class BackboneObjective(nn.Module):
    """The backbone's loss ``data term + λ·smoothness [+ the network's own loss] [+ label_weight·Dice loss]``.

    Holds the similarity ``r`` (MONAI-based maps, :mod:`~adacs_lightning.similarity`), the warps
    (MONAI ``Warp``), ``λ``, the field ``λ`` penalises and the label term's weight; a method
    passes the maps that weight each direction's residual.

    Args:
        similarity: the dissimilarity map.
        lam: weight ``λ`` of the smoothness penalty.
        smoothness_on: ``"displacement"`` or ``"velocity"`` (the field before integration, on its grid).
        label_weight: weight of a MONAI Dice loss between warped source and target labels (0: off).

    Example::

        >>> import torch
        >>> from adacs_lightning.backbones import RegistrationOutput
        >>> from adacs_lightning.objective import BackboneObjective
        >>> from adacs_lightning.similarity import SquaredError
        >>> objective = BackboneObjective(SquaredError(), lam=0.05)
        >>> source, target = torch.rand(2, 1, 1, 16, 16).unbind(0)
        >>> directions = objective.directions(source, target, RegistrationOutput(torch.zeros(1, 2, 16, 16)))
        >>> loss, data, logs = objective(directions, [None], None)  # Ŝ ≡ 1: the plain backbone's loss
        >>> bool(torch.isclose(loss, ((source - target) ** 2).mean()))
        True
    """

    def __init__(
        self, similarity: Similarity, lam: float, smoothness_on: str = "displacement", label_weight: float = 0.0
    ) -> None:
        super().__init__()
        self.similarity = similarity
        self.lam, self.smoothness_on, self.label_weight = float(lam), smoothness_on, float(label_weight)
        self.warp = warp_block("bilinear", "border")
        self.dice = DiceLoss(include_background=False) if label_weight > 0 else None

    @classmethod
    def for_backbone(
        cls,
        backbone: Backbone,
        similarity: Similarity | str | None,
        lam: float,
        smoothness_on: str,
        label_weight: float,
    ) -> BackboneObjective:
        """The objective of ``backbone``: ``similarity`` by name (``mse``, ``lncc``, ``mi``) or squared error when None."""
        if smoothness_on == "velocity" and backbone.integrate is None:
            raise ConfigError(
                "smoothness_on",
                f"is 'velocity', but {backbone.name} predicts the displacement directly (no velocity to penalise).",
                "Use smoothness_on=displacement, or a velocity backbone (voxelmorph with integration_steps > 0).",
            )
        if isinstance(similarity, str):
            similarity = similarity_from_name(similarity, backbone.spatial_dims)
        return cls(similarity if similarity is not None else SquaredError(), lam, smoothness_on, label_weight)

    @property
    def uses_labels(self) -> bool:
        return self.dice is not None

    def residual(self, moving: Tensor, fixed: Tensor, ddf: Tensor, mask: Tensor | None = None) -> Tensor:
        """``r`` ``(B, 1, *spatial)`` of ``moving`` warped by ``ddf`` against ``fixed``."""
        return warped_residual(self.similarity, self.warp, moving, fixed, ddf, mask)

    def directions(
        self,
        source: Tensor,
        target: Tensor,
        to_target: RegistrationOutput,
        to_source: RegistrationOutput | None = None,
        mask: Tensor | None = None,
        labels: tuple[Tensor | None, Tensor | None] = (None, None),
    ) -> list[Direction]:
        """``to_target`` warps the source onto the target; ``to_source`` (bidirectional) the target onto the source."""
        pairs = [(source, target, to_target, *labels)]
        if to_source is not None:
            pairs.append((target, source, to_source, labels[1], labels[0]))
        directions = []
        for moving, fixed, out, moving_label, fixed_label in pairs:
            warped = self.warp(moving, out.ddf)
            residual = self.similarity(warped, fixed, mask)
            directions.append(Direction(moving, fixed, out, residual, moving_label, fixed_label, warped))
        return directions

    def smoothness(self, output: RegistrationOutput, mask: Tensor | None) -> Tensor:
        return field_smoothness(output, mask, self.smoothness_on)

    def label_term(self, direction: Direction) -> Tensor | None:
        """The Dice loss of one direction's warped labels; None without labels or a label weight."""
        if self.dice is None or direction.moving_label is None or direction.fixed_label is None:
            return None
        return label_dice_loss(
            self.dice, self.warp, direction.moving_label, direction.fixed_label, direction.output.ddf
        )

    def forward(
        self,
        directions: Sequence[Direction],
        weights: Sequence[Tensor | None],
        mask: Tensor | None,
        weighting: str = "mean",
        data: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(loss, data term μ, terms to log)`` averaged over directions.

        The data term weights each direction's residual by its map in ``weights`` (detached; None
        for ``Ŝ ≡ 1``) as ``weighting`` says, unless a method passes its own ``data``.
        """
        if data is None:
            data = data_terms(directions, weights, mask, weighting)
        smooth = mean_of(self.smoothness(d.output, mask) for d in directions)
        loss = data + self.lam * smooth
        logs = {"train/data": data, "train/smooth_ddf": smooth}
        extras = [d.output.extra_loss for d in directions if d.output.extra_loss is not None]
        if extras:
            loss = loss + mean_of(extras)
            logs["train/backbone_extra"] = mean_of(extras)
        label_terms = [t for t in (self.label_term(d) for d in directions) if t is not None]
        if label_terms:
            loss = loss + self.label_weight * mean_of(label_terms)
            logs["train/label_dice_loss"] = mean_of(label_terms)
        logs["train/loss_de"] = loss
        return loss, data, logs
