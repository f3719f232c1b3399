"""AdaCS: a backbone trained with a learned correspondence score (docs/method.md).

The training step reads as an outline: the terms of the micro-batch, the finiteness check,
then either one fused backward pass for both networks or the accumulated per-network
updates, and one place that logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..correspondence import CALIBRATIONS, REFERENCE_LEVEL, SCORER_TARGETS, ResidualLevels, shift_min_residual
from ..errors import ConfigError
from ..losses import DATA_WEIGHTINGS, masked_mean, scoring_loss
from ..momentum import MOMENTUM_MODES, MomentumWeight
from ..schedule import Phase, phase_at
from ..scoring import ScoringNetwork
from ..similarity import SQUARED_ERROR_KAPPA
from .base import Direction, RegistrationModule, mean_of, split_batch, step

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

    @property
    def batch_size(self) -> int:
        return self.directions[0].fixed.shape[0]


@dataclass
class _Cycle:
    """The scorer's work waiting for the end of a gradient-accumulation cycle."""

    mu: list[Tensor] = field(default_factory=list)
    pending: list[MicroBatch] = field(default_factory=list)


class AdaCS(RegistrationModule):
    """Trains a registration backbone with Adaptive Correspondence Scoring.

    ``AdaCS(net)`` is all that is required: ``net`` is any ``nn.Module`` that follows or
    can be adapted to the backbone contract (see :class:`~adacs_lightning.backbones.Backbone`),
    and the scorer defaults to a :class:`~adacs_lightning.scoring.ScoringNetwork` built for the
    backbone's spatial dims. ``scoring=False`` gives the like-for-like baseline: warm-up A for
    the whole run. Schedule: warm-up A ``[0, N_w)`` trains the backbone alone (``Ŝ ≡ 1``), warm-up
    B ``[N_w, 2N_w)`` the scorer alone, then both every step.

    Args:
        backbone: the registration network ``f_θ``.
        scorer: the scoring network ``g_φ`` (fixed image → map in [0, 1]).
        scoring: False trains the plain backbone (no scorer).
        alpha: weight ``α`` of ``L_reg``.
        beta: weight ``β`` of ``L_smooth``.
        gamma: momentum ``γ`` of ``m_T``.
        kappa: residual scale ``κ`` of ``b_T``; None takes the similarity's (50 for squared error),
            ``"auto"`` sets ``κ = 1/μ_1`` at the scorer's first update.
        scorer_lr: Adam learning rate of the scorer (the backbone's ``lr`` when None).
        score_residual: the displacement the scorer's residual uses in the joint phase: ``"reuse"``
            the one from before the backbone's update (one backward pass serves both networks);
            ``"recompute"`` re-runs the backbone after its update, as the reference code does.
        data_weighting: how the score weights the backbone's data term: ``"mean"`` (the paper,
            ``mean(Ŝ·r)``), ``"normalised"`` (``Σ Ŝ·r / Σ Ŝ``: the baseline's balance against ``λ``;
            ``adacs-train``'s default, chosen on validation pairs) or ``"scalar"`` (a control:
            ``mean(r)·mean(Ŝ)``, no spatial information).
        momentum_mode: ``"paper"`` or ``"reference"`` (see :class:`~adacs_lightning.momentum.MomentumWeight`).
        reference_leak: reproduce the reference code's gradient leak: the scorer's loss re-runs the
            backbone with gradients and does not detach it, and those backbone gradients are kept
            until the backbone's next step (through warm-up B they pile up). Off by default.
        scorer_target: what ``L_ucs`` weights: ``"residual"`` (the paper: ``r``) or ``"shift_min"``
            (``r`` after the best local shift of a small patch, :func:`~adacs_lightning.correspondence.shift_min_residual`:
            misalignment that a small displacement removes keeps its weight; what no nearby
            displacement removes is scored down).
        shift_radius, shift_patch: the largest shift (voxels per axis) and the patch (voxels) of ``shift_min``.
        calibration: ``"fixed"`` (the paper's constants: the scorer sees ``r`` on squared error's scale,
            κ the similarity's) or ``"data"`` (the residual levels of the last warm-up-A epoch set
            the scale: the scorer sees ``r·0.02/level`` and κ is read on the paper's scale, ``κ/50/level``
            of the data term (``kappa`` None: 50), so α, β and κ mean on any data what they meant on the paper's).
        settings: the base module's (:class:`~adacs_lightning.methods.RegistrationModule`): ``lam``,
            ``lr``, ``warmup_epochs`` (``N_w``, 20 here), ``accumulate_grad_batches`` (both networks),
            ``bidirectional`` (the target → source direction is scored by ``g_φ(source)``), ``similarity``,
            ``smoothness_on``, ``label_weight``, ``spatial_dims``, ``in_channels``, ``eval_labels``,
            ``channels_last``, ``compile``.
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
        score_residual: Literal["recompute", "reuse"] = "reuse",
        data_weighting: str = "mean",
        momentum_mode: str = "paper",
        reference_leak: bool = False,
        scorer_target: str = "residual",
        shift_radius: int = 2,
        shift_patch: int = 3,
        calibration: str = "fixed",
        **settings: Any,
    ) -> None:
        _check_settings(alpha, beta, scorer_lr, score_residual, data_weighting, momentum_mode)
        _check_target(scorer_target, shift_radius, shift_patch, calibration, kappa, reference_leak, momentum_mode)
        super().__init__(backbone, **{"warmup_epochs": 20, **settings})
        self.scorer: nn.Module | None = None
        if scoring:
            self.scorer = (
                scorer if scorer is not None else ScoringNetwork(self.backbone.spatial_dims, self.backbone.in_channels)
            )
        elif scorer is not None:
            raise ValueError("scoring=False trains the plain backbone: do not pass a scorer")
        self.momentum = MomentumWeight(
            gamma=gamma, kappa=self.similarity.kappa if kappa is None else kappa, mode=momentum_mode
        )
        # Measured over the last warm-up-A epoch (calibration="data"); buffers, so checkpoints hold them.
        self.levels = ResidualLevels() if calibration == "data" and self.scorer is not None else None
        # With calibration="data", κ is read on the paper's scale: 50 (the default) puts b_T = 0 at the measured level.
        self._kappa_on_paper_scale = float(kappa) if isinstance(kappa, (int, float)) else SQUARED_ERROR_KAPPA
        self._pending = _Cycle()

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

    def weight_map(self, fixed: Tensor, residual: Tensor) -> Tensor | None:
        return self.scorer(fixed) if self.scorer is not None else None

    # ------------------------------------------------------------------ optimisers
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
                "AdaCS: on the synthetic dose-response study no AdaCS variant beat a λ-tuned baseline on clean pairs; "
                "it won only where targets had large regions without correspondence (docs/results.md, *Where AdaCS "
                "helps*). Check your data with adacs-train -m experiment=fair_comparison."
            )
        warmup, max_epochs = self.hparams.warmup_epochs, self.trainer.max_epochs
        if self.scorer is not None and max_epochs is not None and max_epochs != -1 and max_epochs <= 2 * warmup:
            rank_zero_warn(
                f"max_epochs={max_epochs} ends before the joint phase, which starts at epoch "
                f"2·warmup_epochs = {2 * warmup}: lower warmup_epochs or raise max_epochs."
            )

    def on_train_epoch_start(self) -> None:
        # A cycle never spans epochs; drop whatever an unfinished one left behind (with the
        # reference's leak, the backbone's leaked gradients are kept: they span epochs there).
        self._pending = _Cycle()
        opt_backbone, opt_scorer = self._optimisers_pair()
        if not self.hparams.reference_leak:
            opt_backbone.zero_grad(set_to_none=True)
        if opt_scorer is not None:
            opt_scorer.zero_grad(set_to_none=True)
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
        if self._fuses(cycle, terms):
            logs = self._fused_update(terms, batch_idx)
        else:
            logs = self._accumulated_update(terms, cycle, batch_idx)
        self._log_training({**terms.logs, **logs}, terms.batch_size)

    def _micro_batch(self, batch: Mapping[str, Any]) -> MicroBatch:
        """Register (both directions when bidirectional), score the fixed images, and form ``L_de``."""
        phase = self.phase
        frozen = phase is Phase.WARMUP_SCORER and not self.hparams.reference_leak
        directions = self._register(batch, frozen=frozen)
        mask = batch.get("mask")
        self._calibrate(directions, mask)
        score = None
        if phase is not Phase.WARMUP_BACKBONE:
            # One scorer call per step: its detached output weights L_de, its graph serves L_se.
            score = self.scorer(torch.cat([d.fixed for d in directions], dim=0))
        weights = split_batch(score, len(directions))
        loss_de, data, logs = self._backbone_loss(directions, weights, mask, self.hparams.data_weighting)
        return MicroBatch(directions, mask, score, loss_de, data.detach(), logs, batch)

    # ------------------------------------------------------------------ the scorer's target
    def _scorer_targets(self, directions: list[Direction], mask: Tensor | None, detach: bool = True) -> list[Tensor]:
        """The maps ``L_ucs`` weights, one per direction ``(B, 1, *spatial)``, in ``r``'s units (not yet rescaled)."""
        if self.hparams.scorer_target == "residual":
            return [d.residual.detach() if detach else d.residual for d in directions]
        radius, patch = self.hparams.shift_radius, self.hparams.shift_patch
        with torch.no_grad():
            warped = [self.warp(d.moving, d.output.ddf.detach()) for d in directions]
            return [
                shift_min_residual(self.similarity, w, d.fixed, mask, radius, patch) for w, d in zip(warped, directions)
            ]

    def _on_scorer_scale(self, target: Tensor) -> Tensor:
        """The target on the scale the paper's α and β were set for: fixed by the similarity, or by the data's level."""
        if self.levels is None:
            return self.similarity.on_scorer_scale(target)
        return target * (REFERENCE_LEVEL / self.levels.scorer)

    def _calibrate(self, directions: list[Direction], mask: Tensor | None) -> None:
        """``calibration="data"``: observe the last warm-up-A epoch's residuals; fix the levels when scoring starts.

        Without a warm-up A (or when resuming past it unmeasured), the first scored micro-batch is the measurement.
        """
        if self.levels is None or self.levels.measured:
            return
        last_warmup_epoch = self.current_epoch == self.hparams.warmup_epochs - 1
        scoring = self.phase is not Phase.WARMUP_BACKBONE
        if last_warmup_epoch or (scoring and self.levels.observed == 0):
            targets = self._scorer_targets(directions, mask)
            data = mean_of(masked_mean(d.residual.detach(), mask) for d in directions)
            self.levels.observe(
                torch.cat(targets, dim=0),
                data,
                None if mask is None else mask.repeat(len(targets), *[1] * (mask.ndim - 1)),
            )
        if scoring:
            self.levels.fix(lambda t: self.trainer.strategy.reduce(t, reduce_op="mean"))
            self.momentum.kappa.copy_(self._kappa_on_paper_scale / SQUARED_ERROR_KAPPA / self.levels.data)
            rank_zero_info(
                f"Calibrated to the data: the scorer's target level {float(self.levels.scorer):.4g} "
                f"(shown to it as {REFERENCE_LEVEL}), the data term's {float(self.levels.data):.4g}: κ = {float(self.momentum.kappa):.4g}."
            )

    def _updates_backbone(self) -> bool:
        return self.phase is not Phase.WARMUP_SCORER

    def _fuses(self, cycle, terms: MicroBatch) -> bool:
        """One backward pass for both networks: possible when the stop-gradients make their graphs disjoint.

        L_de then reaches only f_θ and L_se only g_φ, so the sum's gradient is each one's own.
        Not with accumulation (the scorer waits for the cycle's μ), ``recompute``, the reference's
        leak or momentum, or a gradient scaler (16-bit precision needs one backward pass per optimiser).
        """
        if terms.score is None or cycle.length != 1 or self._uses_grad_scaler():
            return False
        if self.hparams.reference_leak or self.hparams.momentum_mode == "reference":
            return False
        return self.phase is Phase.WARMUP_SCORER or self.hparams.score_residual == "reuse"

    def _fused_update(self, terms: MicroBatch, batch_idx: int) -> dict[str, Tensor]:
        opt_backbone, opt_scorer = self._optimisers_pair()
        m, logs = self._update_momentum([terms.mu])
        loss_se, se_logs = self._scoring_loss(terms, m, self._scorer_targets(terms.directions, terms.mask))
        self._check_finite(batch_idx, {"L_se": loss_se})
        self.manual_backward(loss_se + terms.loss_de if self._updates_backbone() else loss_se)
        if self._updates_backbone():
            step(opt_backbone)
        step(opt_scorer)
        return {**logs, **se_logs}

    def _accumulated_update(self, terms: MicroBatch, cycle, batch_idx: int) -> dict[str, Tensor]:
        """The backbone's share now; the scorer's update at the cycle's end, after the backbone has stepped."""
        opt_backbone, opt_scorer = self._optimisers_pair()
        updates_backbone = self._updates_backbone()
        if updates_backbone:
            self.manual_backward(terms.loss_de / cycle.length)
        self._pending.mu.append(terms.mu)
        if terms.score is not None:
            self._pending.pending.append(terms)
        if not cycle.end:
            return {}
        if updates_backbone:
            step(opt_backbone)
        logs: dict[str, Tensor] = {}
        # m_T moves with the scorer's updates (paper) or with the backbone's (reference).
        reference = self.hparams.momentum_mode == "reference"
        if self.scorer is not None and (updates_backbone if reference else bool(self._pending.pending)):
            _, logs = self._update_momentum(self._pending.mu)
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

    def _scorer_residuals(self, terms: MicroBatch) -> list[Tensor]:
        """The residuals ``L_ucs`` weights: detached, and from the updated backbone with ``recompute``.

        With the reference's leak the residuals come from a backbone run with gradients (re-run
        after its update in the joint phase) and are not detached, so ``L_ucs`` also trains the
        backbone: those gradients wait for its next step.
        """
        if self.hparams.reference_leak:
            joint = self.phase is Phase.JOINT
            directions = self._register(terms.batch) if joint else terms.directions
            return self._scorer_targets(directions, terms.mask, detach=False)
        if self.phase is Phase.JOINT and self.hparams.score_residual == "recompute":
            return self._scorer_targets(self._register(terms.batch, frozen=True), terms.mask)
        return self._scorer_targets(terms.directions, terms.mask)

    def _update_momentum(self, mus: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Fold the cycle's ``μ`` (averaged over data-parallel ranks) into ``m_T``; returns ``m_T`` and its logs.

        ``paper`` mode folds in the mean over the cycle's micro-batches once; ``reference`` mode
        folds in each micro-batch's ``μ`` divided by the number of directions (the reference
        weights each direction's loss by 1/2 before averaging them).
        """
        mus = [self.trainer.strategy.reduce(mu, reduce_op="mean") for mu in mus]
        if self.hparams.momentum_mode == "reference":
            mus = [mu / (2 if self.hparams.bidirectional else 1) for mu in mus]
            for mu in mus:
                m = self.momentum.update(mu, epoch=self.current_epoch)
        else:
            m = self.momentum.update(torch.stack(mus).mean(), epoch=self.current_epoch)
        return m, {"train/mu": torch.stack(mus).mean(), "train/m": m}

    def _scoring_loss(self, terms: MicroBatch, m: Tensor, residuals: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_se`` of one micro-batch (targets on the scorer's scale), averaged over directions, and its logs."""
        scores = split_batch(terms.score, len(residuals))
        residuals = [self._on_scorer_scale(r) for r in residuals]
        leak = self.hparams.reference_leak
        losses = [
            scoring_loss(s, r, self.hparams.alpha, self.hparams.beta, m, terms.mask, detach_residual=not leak)
            for s, r in zip(scores, residuals)
        ]
        loss_se, ucs, reg, smooth = (mean_of(t[i] for t in losses) for i in range(4))
        logs = {
            "train/loss_se": loss_se,
            "train/ucs": ucs,
            "train/reg": reg,
            "train/smooth_score": smooth,
            "train/score_mean": mean_of(masked_mean(s.detach(), terms.mask) for s in scores),
        }
        if self.levels is not None:
            logs["train/kappa"] = self.momentum.kappa.clone()
        return loss_se, logs

    def _uses_grad_scaler(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None


def _check_target(scorer_target, shift_radius, shift_patch, calibration, kappa, reference_leak, momentum_mode) -> None:
    """Reject scorer-target and calibration settings AdaCS cannot use, naming the setting and a usable value."""
    if scorer_target not in SCORER_TARGETS:
        raise ConfigError(
            "scorer_target", f"must be one of {SCORER_TARGETS}, got {scorer_target!r}.", "The paper's is 'residual'."
        )
    if calibration not in CALIBRATIONS:
        raise ConfigError(
            "calibration", f"must be one of {CALIBRATIONS}, got {calibration!r}.", "The paper's is 'fixed'."
        )
    if shift_radius < 1 or shift_patch < 1 or shift_patch % 2 == 0:
        raise ConfigError(
            "shift_radius",
            f"and shift_patch must be a positive radius and an odd patch, got {shift_radius} and {shift_patch}.",
            "The default is shift_radius=2, shift_patch=3.",
        )
    if calibration == "data" and kappa == "auto":
        raise ConfigError(
            "kappa", "is 'auto', another calibration of κ, but calibration='data' sets it.", "Give a number or null."
        )
    if calibration == "data" and momentum_mode == "reference":
        raise ConfigError(
            "calibration",
            "'data' sets κ for the paper's momentum target cos(π/2·κμ); the reference's cos(π·κμ) reads κ differently.",
            "Use momentum_mode='paper' with calibration='data', or calibration='fixed'.",
        )
    if reference_leak and scorer_target != "residual":
        raise ConfigError(
            "reference_leak",
            "reproduces the reference code, whose scorer weights the residual itself.",
            "Use scorer_target='residual'.",
        )


def _check_settings(alpha, beta, scorer_lr, score_residual, data_weighting, momentum_mode) -> None:
    """Reject values AdaCS cannot use, naming the setting and a usable value."""
    for name, value, paper in (("alpha", alpha, 0.02), ("beta", beta, 1.5)):
        if value < 0:
            raise ConfigError(name, f"must be non-negative, got {value}.", f"The paper uses {paper}.")
    if scorer_lr is not None and scorer_lr <= 0:
        raise ConfigError("scorer_lr", f"must be positive, got {scorer_lr}.", "The paper uses 0.0001.")
    if score_residual not in ("recompute", "reuse"):
        raise ConfigError(
            "score_residual",
            f"must be 'recompute' or 'reuse', got {score_residual!r}.",
            "The reference is 'recompute'.",
        )
    if data_weighting not in DATA_WEIGHTINGS:
        raise ConfigError(
            "data_weighting", f"must be one of {DATA_WEIGHTINGS}, got {data_weighting!r}.", "The paper's is 'mean'."
        )
    if momentum_mode not in MOMENTUM_MODES:
        raise ConfigError(
            "momentum_mode", f"must be one of {MOMENTUM_MODES}, got {momentum_mode!r}.", "The default is 'paper'."
        )
