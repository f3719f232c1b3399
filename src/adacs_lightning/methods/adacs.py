"""AdaCS: a backbone trained with a learned correspondence score (docs/method.md).

The training step reads as an outline: the terms of the micro-batch, the finiteness check, the
backbone's share of the cycle, and at the cycle's end the backbone's step, ``m_T`` and the
scorer's update. The authors' code's recipe (its leak, per-epoch momentum, recomputed residuals)
is :class:`~adacs_lightning.methods.reference.ReferenceAdaCS`, built on this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..choices import REFERENCE_RECIPE_SETTINGS
from ..correspondence import (
    DEAD_ZONE_HALF,
    DEAD_ZONE_K,
    ROBUST_CALIBRATIONS,
    TUKEY_C,
    ResidualLevels,
    RobustScale,
    ScorerTarget,
    kept_mass,
)
from ..errors import ConfigError
from ..losses import masked_mean, scoring_loss
from ..momentum import MomentumWeight
from ..objective import Direction, mean_of, split_batch
from ..schedule import Phase, phase_at
from ..scoring import ScoringNetwork
from ..similarity import SQUARED_ERROR_KAPPA
from .base import RegistrationModule
from .settings import PAPER, WARMUP_EPOCHS, check_adacs_settings, check_robust_settings
from .steps import Cycle, step

Tensor = torch.Tensor


@dataclass
class MicroBatch:
    """The terms of one micro-batch, before any update."""

    directions: list[Direction]
    mask: Tensor | None
    score: Tensor | None  # (n_dir·B, 1, *spatial) with the scorer's graph; None in warm-up A
    loss_de: Tensor  # L_de (its graph reaches the backbone unless the backbone is frozen)
    mu: Tensor  # the data term of L_de, detached: this micro-batch's μ
    logs: dict[str, Tensor]
    batch: Mapping[str, Any]
    targets: list[Tensor] | None = None  # what L_ucs weights, one per direction (r's units); None in warm-up A

    @property
    def batch_size(self) -> int:
        return self.directions[0].fixed.shape[0]


@dataclass
class _Cycle:
    """What waits for the end of a gradient-accumulation cycle: its μ values and the micro-batches to score."""

    mu: list[Tensor] = field(default_factory=list)
    pending: list[MicroBatch] = field(default_factory=list)


class AdaCS(RegistrationModule):
    """Trains a registration backbone with Adaptive Correspondence Scoring.

    ``AdaCS(net)`` trains what ``adacs-train`` trains (the validated defaults of
    :mod:`~adacs_lightning.methods.settings`); ``AdaCS.paper(net)`` the paper's settings. ``net`` is
    any ``nn.Module`` that follows or can be adapted to the backbone contract
    (:class:`~adacs_lightning.backbones.Backbone`); the scorer defaults to a
    :class:`~adacs_lightning.scoring.ScoringNetwork` for the backbone's spatial dims. ``scoring=False``
    gives the like-for-like baseline: warm-up A for the whole run. Schedule: warm-up A ``[0, N_w)``
    trains the backbone alone (``Ŝ ≡ 1``), warm-up B ``[N_w, 2N_w)`` the scorer alone, then both every step.

    Args:
        backbone: the registration network ``f_θ``.
        scorer: the scoring network ``g_φ`` (fixed image → map in [0, 1]).
        scoring: False trains the plain backbone (no scorer).
        alpha, beta: weights ``α`` of ``L_reg`` and ``β`` of ``L_smooth``.
        gamma: momentum ``γ`` of ``m_T``.
        kappa: residual scale ``κ`` of ``b_T``; None takes the similarity's (50 for squared error),
            ``"auto"`` sets ``κ = 1/μ_1`` at the scorer's first update.
        scorer_lr: Adam learning rate of the scorer (the backbone's ``lr`` when None).
        data_weighting: how the score weights the backbone's data term: ``"normalised"``
            (``Σ Ŝ·r / Σ Ŝ``: the baseline's balance against ``λ``), ``"mean"`` (the paper, ``mean(Ŝ·r)``)
            or ``"scalar"`` (a control: ``mean(r)·mean(Ŝ)``, no spatial information).
        scorer_target: what ``L_ucs`` weights: ``"shift_min"`` (``r`` after the best local shift of a
            small patch, :func:`~adacs_lightning.correspondence.shift_min_residual`: what no nearby
            displacement removes is scored down) or ``"residual"`` (the paper: ``r``).
        shift_radius, shift_patch: the largest shift (voxels per axis) and the patch (voxels) of ``shift_min``.
        calibration: where the scorer's optimum ``Ŝ* = clip(1 − t'/(2α), 0, 1)`` falls (docs/method.md,
            *Calibration*). ``"dead_zone"``: ``Ŝ* = 1`` below ``τ = median + k·σ̂`` of the target, 0.5 at
            ``median + k_½·σ̂`` (σ̂ = 1.4826·MAD, over the images' foreground, last warm-up-A epoch);
            ``"tukey"``: 0.5 where the target, read as a squared error, reaches ``(c·σ̂)²``; ``"data"``: 0.5 at
            the target's *mean* level (the scorer sees ``r·0.02/level``); ``"fixed"``: the paper's constants
            (``r`` on squared error's scale). Except ``"fixed"``, κ is read on the paper's scale (``κ/50/level``
            of the data term).
        tukey_c: ``c`` of ``"tukey"`` in units of σ̂ (4.685: Tukey's biweight, 95 % efficiency).
        dead_zone: ``(k, k_½)`` of ``"dead_zone"`` in units of σ̂.
        scale_momentum: 0 fixes the robust scale at the end of warm-up A; ``γ`` in (0, 1) then tracks it
            with an exponential moving average over the scored micro-batches.
        keep_inliers: the backbone's data term keeps weight 1 wherever the current target lies in the dead
            zone (``t ≤ τ``), whatever the scorer says: the score can only lower what no displacement
            explains (``calibration="dead_zone"`` only).
        scorer_input: ``"target"`` (the paper: ``g_φ`` sees the fixed image) or ``"pair"`` (the fixed image
            and the warped source, stop-gradient).
        warmup_epochs: ``N_w``.
        settings: the base module's (:class:`~adacs_lightning.methods.RegistrationModule`): ``lam``, ``lr``,
            ``accumulate_grad_batches`` (both networks), ``bidirectional`` (the target → source direction is
            scored by ``g_φ(source)``), ``similarity``, ``smoothness_on``, ``label_weight``, ``spatial_dims``,
            ``in_channels``, ``eval_labels``, ``channels_last``, ``compile``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        scorer: nn.Module | None = None,
        *,
        scoring: bool = True,
        alpha: float = 0.02,
        beta: float = 1.5,
        gamma: float = 0.99,
        kappa: float | str | None = None,
        scorer_lr: float | None = None,
        data_weighting: str = "normalised",
        scorer_target: str = "shift_min",
        shift_radius: int = 2,
        shift_patch: int = 3,
        calibration: str = "data",
        tukey_c: float = TUKEY_C,
        dead_zone: tuple[float, float] = (DEAD_ZONE_K, DEAD_ZONE_HALF),
        scale_momentum: float = 0.0,
        keep_inliers: bool = False,
        scorer_input: str = "target",
        warmup_epochs: int = WARMUP_EPOCHS,
        **settings: Any,
    ) -> None:
        _accept_reference_settings(settings)
        dead_zone = tuple(float(v) for v in dead_zone)
        check_adacs_settings(
            alpha, beta, scorer_lr, data_weighting, scorer_target, shift_radius, shift_patch, calibration, kappa
        )
        check_robust_settings(calibration, tukey_c, dead_zone, scale_momentum, keep_inliers, scorer_input, scorer)
        super().__init__(backbone, warmup_epochs=warmup_epochs, **settings)
        self.scorer: nn.Module | None = None
        if scoring:
            self.scorer = scorer if scorer is not None else self._default_scorer(scorer_input)
        elif scorer is not None:
            raise ValueError("scoring=False trains the plain backbone: do not pass a scorer")
        self.momentum = self._momentum(gamma, self.similarity.kappa if kappa is None else kappa)
        # Measured over the last warm-up-A epoch (every calibration but "fixed"); buffers, so checkpoints hold them.
        calibrated = calibration != "fixed" and self.scorer is not None
        self.levels = ResidualLevels() if calibrated else None
        robust = calibrated and calibration in ROBUST_CALIBRATIONS
        self.robust = RobustScale(calibration, tukey_c, dead_zone, scale_momentum) if robust else None
        self.correspondence = ScorerTarget(
            self.similarity, scorer_target, shift_radius, shift_patch, self.levels, self.robust
        )
        # With calibration="data", κ is read on the paper's scale: 50 (the default) puts b_T = 0 at the measured level.
        self._kappa_on_paper_scale = float(kappa) if isinstance(kappa, (int, float)) else SQUARED_ERROR_KAPPA
        self._pending = _Cycle()

    @classmethod
    def paper(cls, backbone: nn.Module, scorer: nn.Module | None = None, **settings: Any) -> AdaCS:
        """AdaCS with the paper's settings (:data:`~adacs_lightning.methods.settings.PAPER`), as ``experiment=paper``."""
        return cls(backbone, scorer, **{**PAPER, **settings})

    def _default_scorer(self, scorer_input: str) -> ScoringNetwork:
        return ScoringNetwork(self.backbone.spatial_dims, self.backbone.in_channels, scorer_input=scorer_input)

    def _momentum(self, gamma: float, kappa: float | str) -> MomentumWeight:
        return MomentumWeight(gamma=gamma, kappa=kappa)

    @property
    def method_name(self) -> str:  # type: ignore[override]
        return "adacs" if self.scorer is not None else "baseline"

    @property
    def weighting_networks(self) -> list[nn.Module]:
        return [self.scorer] if self.scorer is not None else []

    @property
    def phase(self) -> Phase:
        """The schedule phase of the current epoch."""
        return phase_at(self.current_epoch, self.hparams.warmup_epochs, self.scorer is not None)

    @property
    def backbone_idle_epochs(self) -> int:
        return self.hparams.warmup_epochs if self.scorer is not None else 0

    def weight_map(self, fixed: Tensor, residual: Tensor, warped: Tensor | None = None) -> Tensor | None:
        return self.score(fixed, warped) if self.scorer is not None else None

    def score(self, fixed: Tensor, warped: Tensor | None = None) -> Tensor:
        """``Ŝ`` ``(B, 1, *spatial)``: the scorer on ``fixed`` (``scorer_input="pair"``: and ``warped``, the warped
        source, stop-gradient), with its graph."""
        if self.hparams.scorer_input == "pair":
            if warped is None:
                raise ValueError("this run's scorer sees the pair (scorer_input='pair'): pass the warped source")
            return self.scorer(torch.cat([fixed, warped.detach()], dim=1))
        return self.scorer(fixed)

    def configure_optimizers(self):
        if self.scorer is None:
            return self.backbone_optimizer()
        scorer_lr = self.hparams.scorer_lr or self.hparams.lr
        return [self.backbone_optimizer(), torch.optim.Adam(self.scorer.parameters(), lr=scorer_lr)]

    def _optimisers_pair(self) -> tuple[Any, Any | None]:
        opts = self._optimisers()
        return opts[0], (opts[1] if len(opts) > 1 else None)

    # ------------------------------------------------------------------ schedule
    def on_fit_start(self) -> None:
        if self.scorer is not None:
            rank_zero_info(
                "AdaCS: at a converged budget on the synthetic dose-response study no AdaCS variant beat a λ-tuned "
                "baseline on MRI-like pairs (this default lost up to 1.0 Dice, the robust calibrations up to 3.3) and "
                "wins were rare elsewhere (docs/results.md, *Where AdaCS helps*). Check your data with "
                "adacs-train -m experiment=fair_comparison."
            )
        warmup, max_epochs = self.hparams.warmup_epochs, self.trainer.max_epochs
        if self.scorer is not None and max_epochs is not None and max_epochs != -1 and max_epochs <= 2 * warmup:
            rank_zero_warn(
                f"max_epochs={max_epochs} ends before the joint phase, which starts at epoch "
                f"2·warmup_epochs = {2 * warmup}: lower warmup_epochs or raise max_epochs."
            )

    def on_train_epoch_start(self) -> None:
        self._pending = _Cycle()  # a cycle never spans epochs: drop what an unfinished one left
        super().on_train_epoch_start()
        epoch, warmup = self.current_epoch, self.hparams.warmup_epochs
        if self.scorer is not None and epoch in (0, warmup, 2 * warmup):
            descriptions = {
                Phase.WARMUP_BACKBONE: "warm-up A, training the backbone alone (score ≡ 1)",
                Phase.WARMUP_SCORER: "warm-up B, training the scorer with the backbone frozen",
                Phase.JOINT: "joint phase, updating backbone and scorer every step",
            }
            rank_zero_info(f"Epoch {epoch}: {descriptions[self.phase]}.")

    # ------------------------------------------------------------------ the training step
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        cycle = self._cycle(batch_idx)
        terms = self._micro_batch(batch)
        # Before anything changes state: an optimiser step, or m_T (which μ feeds).
        self._check_finite(batch_idx, {"L_de": terms.loss_de, "displacement data term": terms.mu})
        updates_backbone = self.phase is not Phase.WARMUP_SCORER
        if updates_backbone:
            self.manual_backward(terms.loss_de / cycle.length)
        self._pending.mu.append(terms.mu)
        if terms.score is not None:
            self._pending.pending.append(terms)
        logs = self._end_cycle(cycle, batch_idx, updates_backbone) if cycle.end else {}
        self._log_training({**terms.logs, **logs}, terms.batch_size)

    def _micro_batch(self, batch: Mapping[str, Any]) -> MicroBatch:
        """Register (both directions when bidirectional), score the fixed images, and form ``L_de``."""
        directions = self._register(batch, frozen=self._backbone_frozen())
        mask = batch.get("mask")
        scoring = self.phase is not Phase.WARMUP_BACKBONE
        targets = self._scorer_targets(directions, mask) if scoring or self._calibrating else None
        self._calibrate(directions, targets, mask)
        score, weights, logs = None, [None] * len(directions), {}
        if scoring:
            # One scorer call per step: its detached output weights L_de, its graph serves L_se.
            score = self.score(*(torch.cat(images, dim=0) for images in self._scorer_images(directions)))
            weights = self._data_weights(split_batch(score, len(directions)), targets)
            logs["train/kept_mass"] = mean_of(kept_mass(w, d.residual, mask) for w, d in zip(weights, directions))
        loss_de, data, backbone_logs = self.objective(directions, weights, mask, self.hparams.data_weighting)
        return MicroBatch(directions, mask, score, loss_de, data.detach(), {**backbone_logs, **logs}, batch, targets)

    def _scorer_images(self, directions: list[Direction]) -> tuple[list[Tensor], ...]:
        """What the scorer sees of each direction: the fixed images, and with ``scorer_input="pair"`` the warped ones."""
        fixed = [d.fixed for d in directions]
        return (fixed, [d.warped for d in directions]) if self.hparams.scorer_input == "pair" else (fixed,)

    def _data_weights(self, scores: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        """The maps that weight the backbone's data term: ``Ŝ``, or with ``keep_inliers`` 1 where ``t ≤ τ``."""
        if not self.hparams.keep_inliers:
            return scores
        return [torch.where(self.robust.inliers(t), torch.ones_like(s), s.detach()) for s, t in zip(scores, targets)]

    def _end_cycle(self, cycle: Cycle, batch_idx: int, updates_backbone: bool) -> dict[str, Tensor]:
        """The backbone's step, ``m_T`` from the cycle's ``μ``, then the scorer's update on the queued micro-batches."""
        opt_backbone, opt_scorer = self._optimisers_pair()
        if updates_backbone:
            step(opt_backbone)
        logs: dict[str, Tensor] = {}
        if self._folds_momentum(updates_backbone):
            logs = self._update_momentum(self._pending.mu)
        if self._pending.pending:
            m = self.momentum.value.clone()
            for queued in self._pending.pending:
                loss_se, se_logs = self._scoring_loss(queued, m, self._scorer_residuals(queued))
                self._check_finite(batch_idx, {"L_se": loss_se})
                self.manual_backward(loss_se / cycle.length)
            step(opt_scorer)
            logs.update(se_logs)
        self._pending = _Cycle()
        return logs

    # ------------------------------------------------------------------ what the reference recipe changes
    def _backbone_frozen(self) -> bool:
        """Warm-up B runs the backbone without gradients."""
        return self.phase is Phase.WARMUP_SCORER

    def _folds_momentum(self, updates_backbone: bool) -> bool:
        """``m_T`` moves with the scorer's updates."""
        return self.scorer is not None and bool(self._pending.pending)

    def _scorer_residuals(self, terms: MicroBatch) -> list[Tensor]:
        """The maps ``L_ucs`` weights: from the backbone as it was before its update (one backbone pass per step)."""
        return terms.targets

    def _update_momentum(self, mus: list[Tensor]) -> dict[str, Tensor]:
        """Fold the mean of the cycle's ``μ`` (averaged over data-parallel ranks) into ``m_T``; returns its logs."""
        mus = [self.trainer.strategy.reduce(mu, reduce_op="mean") for mu in mus]
        m = self.momentum.update(torch.stack(mus).mean(), epoch=self.current_epoch)
        return {"train/mu": torch.stack(mus).mean(), "train/m": m}

    @property
    def _detach_scorer_target(self) -> bool:
        return True

    # ------------------------------------------------------------------ the scorer's target and loss
    def _scorer_targets(self, directions: list[Direction], mask: Tensor | None, detach: bool = True) -> list[Tensor]:
        """The maps ``L_ucs`` weights, one per direction ``(B, 1, *spatial)``, in ``r``'s units (not yet rescaled)."""
        warped, fixed, residuals = zip(*((d.warped, d.fixed, d.residual) for d in directions))
        return self.correspondence.maps(list(warped), list(fixed), list(residuals), mask, detach)

    def _on_scorer_scale(self, target: Tensor) -> Tensor:
        """The target on the scale the scorer's α and β were set for (:class:`~adacs_lightning.correspondence.ScorerTarget`)."""
        return self.correspondence.on_scorer_scale(target, self.hparams.alpha)

    @property
    def _calibrating(self) -> bool:
        """Whether this micro-batch's targets feed the calibration: the last warm-up-A epoch, unmeasured."""
        return (
            self.levels is not None
            and not self.levels.measured
            and self.current_epoch == self.hparams.warmup_epochs - 1
        )

    def _calibrate(self, directions: list[Direction], targets: list[Tensor] | None, mask: Tensor | None) -> None:
        """Observe the last warm-up-A epoch's targets and data terms; fix the scale when scoring starts (setting κ
        on the paper's scale); with ``scale_momentum`` > 0, keep moving the robust scale.

        Without a warm-up A (or when resuming past it unmeasured), the first scored micro-batch is the measurement.
        """
        correspondence = self.correspondence
        if self.levels is None:
            return
        scoring = self.phase is not Phase.WARMUP_BACKBONE
        if correspondence.measured and not (correspondence.tracking and scoring):
            return
        if self._calibrating or (scoring and self.levels.observed == 0) or correspondence.tracking:
            data = mean_of(masked_mean(d.residual.detach(), mask) for d in directions)
            correspondence.observe(targets, [d.warped for d in directions], [d.fixed for d in directions], mask, data)
        if scoring and not correspondence.measured:
            said = correspondence.fix(lambda t: self.trainer.strategy.reduce(t, reduce_op="mean"))
            self.momentum.kappa.copy_(self._kappa_on_paper_scale / SQUARED_ERROR_KAPPA / self.levels.data)
            rank_zero_info(
                f"Calibrated to the data: {said}; the data term's level {float(self.levels.data):.4g}: "
                f"κ = {float(self.momentum.kappa):.4g}."
            )

    def _scoring_loss(self, terms: MicroBatch, m: Tensor, residuals: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_se`` of one micro-batch (targets on the scorer's scale), averaged over directions, and its logs."""
        scores = split_batch(terms.score, len(residuals))
        residuals = [self._on_scorer_scale(r) for r in residuals]
        alpha, beta, detach = self.hparams.alpha, self.hparams.beta, self._detach_scorer_target
        losses = [scoring_loss(s, r, alpha, beta, m, terms.mask, detach) for s, r in zip(scores, residuals)]
        loss_se, ucs, reg, smooth = (mean_of(t[i] for t in losses) for i in range(4))
        logs = {"train/loss_se": loss_se, "train/ucs": ucs, "train/reg": reg, "train/smooth_score": smooth}
        logs["train/score_mean"] = mean_of(masked_mean(s.detach(), terms.mask) for s in scores)
        if self.robust is not None:
            logs["train/scale_threshold"], logs["train/scale_half"] = self.robust.threshold, self.robust.midpoint
        if self.levels is not None:
            logs["train/kappa"] = self.momentum.kappa.clone()
        return loss_se, logs


def _accept_reference_settings(settings: dict[str, Any]) -> None:
    """Take the reference recipe's settings out of ``settings`` when they hold AdaCS's own values; refuse others.

    Checkpoints written before the recipe had its own class hold those settings among AdaCS's.
    """
    for name, own in REFERENCE_RECIPE_SETTINGS.items():
        if name in settings and settings.pop(name) != own:
            raise ConfigError(
                name,
                f"is a setting of the reference recipe; AdaCS itself trains with {name}={own!r}.",
                "Use experiment=reference, or adacs_lightning.methods.ReferenceAdaCS in Python.",
            )
