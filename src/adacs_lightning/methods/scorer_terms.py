"""AdaCS's scorer terms: what the scorer sees, the weights it gives the backbone's data term, and its loss ``L_se``.

Shapes: images ``(B, C, *spatial)``; a score map ``Ŝ`` and a target map ``(B, 1, *spatial)``; a micro-batch's
directions scored at once ``(n_dir·B, …)``. Targets are in the similarity's units until
:meth:`~adacs_lightning.scorer_target.ScorerTarget.on_scorer_scale` shows them on the scale α and β were set for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..losses import masked_mean, mean_of, scoring_loss
from ..objective import Direction, split_batch
from ..scorer_target import ScorerTarget

Tensor = torch.Tensor


@dataclass(frozen=True)
class ScorerTerms:
    """The scorer's side of an AdaCS step, without its networks or optimisers (docs/method.md).

    Args:
        target: the run's target map and its scale.
        alpha, beta: weights ``α`` of ``L_reg`` and ``β`` of ``L_smooth``.
        scorer_input: ``"target"`` (the scorer sees the fixed image) or ``"pair"`` (and the warped source).
        keep_inliers: the data term keeps weight 1 where the target lies in the dead zone (``t ≤ τ``).
    """

    target: ScorerTarget
    alpha: float
    beta: float
    scorer_input: str = "target"
    keep_inliers: bool = False

    def inputs(self, fixed: Tensor, warped: Tensor | None = None) -> Tensor:
        """What the scorer is called on: ``fixed``, or with ``"pair"`` ``fixed`` and ``warped`` (stop-gradient) stacked
        on the channels ``(B, 2C, *spatial)``."""
        if self.scorer_input != "pair":
            return fixed
        if warped is None:
            raise ValueError("this run's scorer sees the pair (scorer_input='pair'): pass the warped source")
        return torch.cat([fixed, warped.detach()], dim=1)

    def images(self, directions: Sequence[Direction]) -> tuple[Tensor, ...]:
        """Every direction's fixed image ``(n_dir·B, C, *spatial)``, and with ``"pair"`` its warped source, same shape."""
        fixed = torch.cat([d.fixed for d in directions], dim=0)
        if self.scorer_input != "pair":
            return (fixed,)
        return fixed, torch.cat([d.warped for d in directions], dim=0)

    def data_weights(self, scores: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        """The maps that weight the backbone's data term: ``Ŝ``, or with ``keep_inliers`` 1 where ``t ≤ τ``."""
        if not self.keep_inliers:
            return scores
        inliers = self.target.robust.inliers
        return [torch.where(inliers(t), torch.ones_like(s), s.detach()) for s, t in zip(scores, targets)]

    def loss(
        self, score: Tensor, targets: list[Tensor], m: Tensor, mask: Tensor | None, detach: bool, kappa: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_se`` of one micro-batch, averaged over its directions, and its logs.

        Args:
            score: ``Ŝ`` of every direction ``(n_dir·B, 1, *spatial)``, with the scorer's graph.
            targets: what ``L_ucs`` weights, one ``(B, 1, *spatial)`` per direction, in the similarity's units.
            m: ``m_T``, the weight of ``L_smooth``; ``mask``: the field of view.
            detach: stop the gradient of ``L_ucs`` into the targets (False: the reference's leak).
            kappa: the momentum's κ, logged when the data set it.
        """
        scores = split_batch(score, len(targets))
        targets = [self.target.on_scorer_scale(t, self.alpha) for t in targets]
        losses = [scoring_loss(s, t, self.alpha, self.beta, m, mask, detach) for s, t in zip(scores, targets)]
        loss_se, ucs, reg, smooth = (mean_of(t[i] for t in losses) for i in range(4))
        logs = {"train/loss_se": loss_se, "train/ucs": ucs, "train/reg": reg, "train/smooth_score": smooth}
        logs["train/score_mean"] = mean_of(masked_mean(s.detach(), mask) for s in scores)
        robust, levels = self.target.robust, self.target.levels
        if robust is not None:
            logs["train/scale_threshold"], logs["train/scale_half"] = robust.threshold, robust.midpoint
        if levels is not None:
            logs["train/kappa"] = kappa.clone()
        return loss_se, logs
