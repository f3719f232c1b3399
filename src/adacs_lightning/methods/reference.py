"""AdaCS as the authors' code trains it (``experiment=reference``; docs/method.md, *The reference recipe*).

Everything in which the reference code departs from the paper's equations lives here, as
overrides of :class:`~adacs_lightning.AdaCS`'s extension points: its gradient leak, its per-epoch
momentum with the 1/2 weight of each direction, and residuals recomputed after the backbone's update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..momentum import MOMENTUM_MODES
from ..schedule import Phase
from .adacs import AdaCS, MicroBatch

Tensor = torch.Tensor

SCORE_RESIDUALS = ("recompute", "reuse")


class ReferenceAdaCS(AdaCS):
    """AdaCS with the reference code's recipe; each departure is a switch, so that each can be measured alone.

    Args:
        score_residual: ``"recompute"`` (the reference): the scorer's residual comes from the backbone re-run
            after its update; ``"reuse"``: from before it (AdaCS's, one backbone pass per step).
        momentum_mode: ``"reference"``: ``μ`` is the running mean of the epoch's residuals, each direction's
            weighted 1/2, ``b = cos(π·κμ)`` unclamped, ``γ_e = min(γ, 1 − 1/(e+1))`` per epoch, and ``m_T``
            moves with the backbone's updates (frozen in warm-up B); ``"paper"``: AdaCS's.
        reference_leak: the scorer's loss re-runs the backbone with gradients and does not detach it, and
            those backbone gradients are kept until the backbone's next step (through warm-up B they pile up).
        settings: :class:`~adacs_lightning.AdaCS`'s; the recipe's scorer learns from the residual itself
            with the paper's fixed constants (``scorer_target="residual"``, ``calibration="fixed"``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        scorer: nn.Module | None = None,
        *,
        score_residual: str = "recompute",
        momentum_mode: str = "reference",
        reference_leak: bool = True,
        **settings: Any,
    ) -> None:
        settings = {"scorer_target": "residual", "calibration": "fixed", "data_weighting": "mean", **settings}
        _check_recipe(score_residual, momentum_mode, reference_leak, settings)
        self._momentum_mode = momentum_mode  # read by AdaCS.__init__ when it builds m_T
        super().__init__(backbone, scorer, **settings)

    def _clear_gradients(self) -> None:
        if not self.hparams.reference_leak:
            return super()._clear_gradients()
        # The backbone's leaked gradients span epochs: only the scorer's are dropped.
        opt_scorer = self._optimisers_pair()[1]
        if opt_scorer is not None:
            opt_scorer.zero_grad(set_to_none=True)

    def _backbone_frozen(self) -> bool:
        # With the leak, warm-up B runs the backbone with gradients (they wait for its next step).
        return self.phase is Phase.WARMUP_SCORER and not self.hparams.reference_leak

    def _folds_momentum(self, updates_backbone: bool) -> bool:
        if self.hparams.momentum_mode == "reference":
            return self.scorer is not None and updates_backbone
        return super()._folds_momentum(updates_backbone)

    def _update_momentum(self, mus: list[Tensor]) -> dict[str, Tensor]:
        """Reference mode folds in each micro-batch's ``μ`` divided by the number of directions (the reference
        weights each direction's loss by 1/2 before averaging them)."""
        if self.hparams.momentum_mode != "reference":
            return super()._update_momentum(mus)
        mus = [self._mean_over_ranks(mu) for mu in mus]
        mus = [mu / (2 if self.hparams.bidirectional else 1) for mu in mus]
        for mu in mus:
            m = self.momentum.update(mu, epoch=self.current_epoch)
        return {"train/mu": torch.stack(mus).mean(), "train/m": m}

    def _scorer_residuals(self, terms: MicroBatch) -> tuple[list[Tensor], bool]:
        """With the leak, from a backbone run with gradients (re-run after its update in the joint phase), not
        detached, so ``L_ucs`` also trains the backbone; with ``recompute``, from the updated backbone."""
        joint = self.phase is Phase.JOINT
        if self.hparams.reference_leak:
            directions = self._register(terms.batch) if joint else terms.directions
            return self.correspondence.of(directions, terms.mask, detach=False), False
        if joint and self.hparams.score_residual == "recompute":
            return self.correspondence.of(self._register(terms.batch, frozen=True), terms.mask), True
        return super()._scorer_residuals(terms)


def _check_recipe(score_residual: str, momentum_mode: str, reference_leak: bool, settings: dict[str, Any]) -> None:
    """Reject switches the recipe cannot combine, naming the setting and a usable value."""
    if score_residual not in SCORE_RESIDUALS:
        raise ConfigError(
            "score_residual",
            f"must be one of {SCORE_RESIDUALS}, got {score_residual!r}.",
            "The reference's is 'recompute'.",
        )
    if momentum_mode not in MOMENTUM_MODES:
        raise ConfigError(
            "momentum_mode",
            f"must be one of {MOMENTUM_MODES}, got {momentum_mode!r}.",
            "The reference's is 'reference'.",
        )
    if settings["calibration"] != "fixed" and momentum_mode == "reference":
        raise ConfigError(
            "calibration",
            f"{settings['calibration']!r} sets κ for the paper's momentum target cos(π/2·κμ); the reference's cos(π·κμ) reads κ differently.",
            "Use momentum_mode='paper' with a calibrated scale, or calibration='fixed'.",
        )
    if reference_leak and settings["scorer_target"] != "residual":
        raise ConfigError(
            "reference_leak",
            "reproduces the reference code, whose scorer weights the residual itself.",
            "Use scorer_target='residual'.",
        )
