"""AdaCS: a backbone trained with a learned correspondence score (docs/method.md).

The training step reads as an outline: the terms of the micro-batch, the finiteness check, the
backbone's share of the cycle, and at the cycle's end the backbone's step, ``m_T`` and the
scorer's update. The scorer's target and its calibration are a
:class:`~adacs_lightning.scorer_target.ScorerTarget`, its inputs, data weights and loss
:class:`~adacs_lightning.methods.scorer_terms.ScorerTerms`. The authors' code's recipe (its leak,
per-epoch momentum, recomputed residuals) is :class:`~adacs_lightning.methods.reference.ReferenceAdaCS`,
built on this one through the hooks listed under *Extension points*.

Example (wrapping a network in one line; Lightning trains it)::

    >>> import torch
    >>> from adacs_lightning import AdaCS, voxelmorph
    >>> model = AdaCS(voxelmorph(spatial_dims=2, channels=[4, 8, 8, 8], unet_out_channels=8, final_conv_channels=[8]))
    >>> source, target = torch.rand(2, 1, 1, 32, 32).unbind(0)
    >>> model.backbone(source, target).shape  # the displacement, voxels
    torch.Size([1, 2, 32, 32])
    >>> model.scorer(target).shape  # the score map Ŝ in [0, 1]
    torch.Size([1, 1, 32, 32])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from ..calibration import DEAD_ZONE_HALF, DEAD_ZONE_K, TUKEY_C
from ..choices import REFERENCE_RECIPE_SETTINGS
from ..correspondence import kept_mass
from ..errors import ConfigError
from ..momentum import MomentumWeight
from ..objective import Direction, mean_of, split_batch
from ..schedule import Phase, phase_at
from ..scorer_target import ScorerTarget
from ..scoring import ScoringNetwork
from .base import RegistrationModule
from .scorer_terms import ScorerTerms
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

    def add(self, terms: MicroBatch) -> None:
        """Queue a micro-batch: its ``μ``, and the micro-batch itself when it was scored."""
        self.mu.append(terms.mu)
        if terms.score is not None:
            self.pending.append(terms)


class AdaCS(RegistrationModule):
    """Trains a registration backbone with Adaptive Correspondence Scoring.

    ``AdaCS(net)`` trains what ``adacs-train`` trains (the validated defaults of
    :mod:`~adacs_lightning.methods.settings`), ``AdaCS.paper(net)`` the paper's settings; ``net`` is any network the
    backbone contract accepts (:class:`~adacs_lightning.backbones.Backbone`). ``scoring=False`` gives the like-for-like
    baseline: warm-up A for the whole run. Schedule: warm-up A ``[0, N_w)`` trains the backbone alone (``Ŝ ≡ 1``),
    warm-up B ``[N_w, 2N_w)`` the scorer alone, then both every step.

    Args:
        backbone: the registration network ``f_θ``.
        scorer, scoring: the scoring network ``g_φ`` (fixed image → map in [0, 1]; by default a
            :class:`~adacs_lightning.scoring.ScoringNetwork`); ``scoring=False`` trains the plain backbone, without one.
        alpha, beta, gamma: weights ``α`` of ``L_reg`` and ``β`` of ``L_smooth``; momentum ``γ`` of ``m_T``.
        kappa: residual scale ``κ`` of ``b_T``; None: the similarity's (50 for squared error); ``"auto"``: ``1/μ_1``.
        scorer_lr: Adam learning rate of the scorer (the backbone's ``lr`` when None).
        data_weighting: how ``Ŝ`` weights the data term: ``"normalised"`` (``Σ Ŝ·r / Σ Ŝ``, the baseline's balance
            against ``λ``), ``"mean"`` (the paper's ``mean(Ŝ·r)``) or ``"scalar"`` (a control: ``mean(r)·mean(Ŝ)``).
        scorer_target: what ``L_ucs`` weights: ``"residual"`` (the paper: ``r``) or ``"shift_min"`` (``r`` after the
            best shift of a small patch, :func:`~adacs_lightning.correspondence.shift_min_residual`: what no nearby
            displacement removes).
        shift_radius, shift_patch: the largest shift (voxels per axis) and the patch (voxels) of ``shift_min``.
        calibration, tukey_c, dead_zone: where the scorer's optimum ``Ŝ* = clip(1 − t'/(2α), 0, 1)`` falls
            (docs/method.md, *Calibration*; :mod:`~adacs_lightning.calibration`). ``"dead_zone"``: ``Ŝ* = 1`` below
            ``τ = median + k·σ̂`` of the target, 0.5 at ``median + k_½·σ̂`` (``dead_zone = (k, k_½)``; σ̂ = 1.4826·MAD
            over the images' foreground, last warm-up-A epoch); ``"tukey"``: 0.5 where the target, read as a squared
            error, reaches ``(c·σ̂)²`` (``tukey_c = c``; 4.685: Tukey's biweight, 95 % efficiency); ``"data"``: 0.5
            at the target's *mean* level (the scorer sees ``r·0.02/level``); ``"fixed"``: the paper's constants
            (``r`` on squared error's scale). Except ``"fixed"``, κ is read on the paper's scale (``κ/50/level``).
        scale_momentum: 0 fixes the robust scale at the end of warm-up A; ``γ`` in (0, 1) then tracks it with an
            exponential moving average over the scored micro-batches.
        keep_inliers: the backbone's data term keeps weight 1 wherever the current target lies in the dead zone
            (``t ≤ τ``), whatever the scorer says (``calibration="dead_zone"`` only).
        scorer_input: ``"target"`` (the paper: ``g_φ`` sees the fixed image) or ``"pair"`` (and the warped source).
        warmup_epochs: ``N_w``.
        settings: the base module's (:class:`~adacs_lightning.methods.RegistrationModule`): ``lam``, ``lr``,
            ``accumulate_grad_batches`` (both networks), ``bidirectional`` (target → source is scored by
            ``g_φ(source)``), ``similarity``, ``smoothness_on``, ``label_weight``, ``spatial_dims``, ``in_channels``,
            ``eval_labels``, ``channels_last``, ``compile``.
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
        self.scorer: nn.Module | None = _scorer_for(self.backbone, scoring, scorer, scorer_input)
        self.momentum = MomentumWeight(gamma, self.similarity.kappa if kappa is None else kappa, self._momentum_mode)
        scale = calibration if scoring else "fixed"  # without a scorer, nothing to calibrate
        self.correspondence = ScorerTarget.calibrated(
            self.similarity, scorer_target, shift_radius, shift_patch, scale, tukey_c, dead_zone, scale_momentum, kappa
        )
        # The scale's buffers are the method's own submodules: checkpoints hold them as levels.* and robust.*.
        self.levels, self.robust = self.correspondence.levels, self.correspondence.robust
        self.scorer_terms = ScorerTerms(self.correspondence, alpha, beta, scorer_input, keep_inliers)
        self._pending = _Cycle()

    @classmethod
    def paper(cls, backbone: nn.Module, scorer: nn.Module | None = None, **settings: Any) -> AdaCS:
        """AdaCS with the paper's settings (:data:`~adacs_lightning.methods.settings.PAPER`), as ``experiment=paper``."""
        return cls(backbone, scorer, **{**PAPER, **settings})

    @property
    def method_name(self) -> str:  # type: ignore[override]
        return "adacs" if self.scorer is not None else "baseline"

    @property
    def weighting_networks(self) -> list[nn.Module]:
        return [self.scorer] if self.scorer is not None else []

    @property
    def phase(self) -> Phase:
        return phase_at(self.current_epoch, self.hparams.warmup_epochs, self.scorer is not None)

    @property
    def backbone_idle_epochs(self) -> int:
        return self.hparams.warmup_epochs if self.scorer is not None else 0

    def weight_map(self, fixed: Tensor, residual: Tensor, warped: Tensor | None = None) -> Tensor | None:
        return self.score(fixed, warped) if self.scorer is not None else None

    def score(self, fixed: Tensor, warped: Tensor | None = None) -> Tensor:
        """``Ŝ`` ``(B, 1, *spatial)`` with its graph: the scorer on ``fixed`` (with ``"pair"``: and ``warped``)."""
        return self.scorer(self.scorer_terms.inputs(fixed, warped))

    def configure_optimizers(self):
        if self.scorer is None:
            return self.backbone_optimizer()
        scorer_lr = self.hparams.scorer_lr or self.hparams.lr
        return [self.backbone_optimizer(), torch.optim.Adam(self.scorer.parameters(), lr=scorer_lr)]

    # ------------------------------------------------------------------ schedule
    def on_fit_start(self) -> None:
        if self.scorer is not None:
            _say_fit_start(self.hparams.warmup_epochs, self.trainer.max_epochs)

    def on_train_epoch_start(self) -> None:
        self._pending = _Cycle()  # a cycle never spans epochs: drop what an unfinished one left
        super().on_train_epoch_start()
        if self.scorer is not None:
            _say_phase(self.current_epoch, self.hparams.warmup_epochs, self.phase)

    # ------------------------------------------------------------------ the training step
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        cycle = self._cycle(batch_idx)
        terms = self._micro_batch(batch)
        # Before anything changes state: an optimiser step, or m_T (which μ feeds).
        self._check_finite(batch_idx, {"L_de": terms.loss_de, "displacement data term": terms.mu})
        updates_backbone = self.phase is not Phase.WARMUP_SCORER
        if updates_backbone:
            self.manual_backward(terms.loss_de / cycle.length)
        self._pending.add(terms)
        logs = self._end_cycle(cycle, batch_idx, updates_backbone) if cycle.end else {}
        self._log_training({**terms.logs, **logs}, terms.batch_size)

    def _micro_batch(self, batch: Mapping[str, Any]) -> MicroBatch:
        """Register (both directions when bidirectional), calibrate, score the fixed images, and form ``L_de``."""
        directions = self._register(batch, frozen=self._backbone_frozen())
        mask, scoring = batch.get("mask"), self.phase is not Phase.WARMUP_BACKBONE
        calibrating = self.correspondence.calibrating(self.current_epoch, self.hparams.warmup_epochs)
        targets = self.correspondence.of(directions, mask) if scoring or calibrating else None
        self.correspondence.calibrate(
            directions, targets, mask, calibrating, scoring, self.momentum.kappa, self._mean_over_ranks, rank_zero_info
        )
        score, weights, logs = None, [None] * len(directions), {}
        if scoring:
            # One scorer call per step: its detached output weights L_de, its graph serves L_se.
            score = self.score(*self.scorer_terms.images(directions))
            weights = self.scorer_terms.data_weights(split_batch(score, len(directions)), targets)
            logs["train/kept_mass"] = mean_of(kept_mass(w, d.residual, mask) for w, d in zip(weights, directions))
        loss_de, data, backbone_logs = self.objective(directions, weights, mask, self.hparams.data_weighting)
        return MicroBatch(directions, mask, score, loss_de, data.detach(), {**backbone_logs, **logs}, batch, targets)

    def _end_cycle(self, cycle: Cycle, batch_idx: int, updates_backbone: bool) -> dict[str, Tensor]:
        """The backbone's step, ``m_T`` from the cycle's ``μ``, then the scorer's update on the queued micro-batches."""
        opt_backbone, opt_scorer = self._optimisers_pair()
        if updates_backbone:
            step(opt_backbone)
        logs = self._update_momentum(self._pending.mu) if self._folds_momentum(updates_backbone) else {}
        if self._pending.pending:
            m, kappa = self.momentum.value.clone(), self.momentum.kappa
            for queued in self._pending.pending:
                targets, detach = self._scorer_residuals(queued)
                loss_se, se_logs = self.scorer_terms.loss(queued.score, targets, m, queued.mask, detach, kappa)
                self._check_finite(batch_idx, {"L_se": loss_se})
                self.manual_backward(loss_se / cycle.length)
            step(opt_scorer)
            logs.update(se_logs)
        self._pending = _Cycle()
        return logs

    # ------------------------------------------------------------------ extension points
    # ReferenceAdaCS (methods/reference.py) trains the authors' recipe by overriding these, and no others:
    # _momentum_mode and _update_momentum (m_T from each micro-batch's μ, 1/2 per direction, a per-epoch running
    # mean, cos(π·κμ)); _folds_momentum (m_T moves with the backbone's updates); _scorer_residuals (recomputed after
    # the backbone's update; with the leak, attached to its graph); _backbone_frozen and the base's _clear_gradients
    # (with the leak, warm-up B runs the backbone with gradients and keeps them until its next step).
    _momentum_mode = "paper"  # MomentumWeight's mode

    def _backbone_frozen(self) -> bool:
        return self.phase is Phase.WARMUP_SCORER

    def _folds_momentum(self, updates_backbone: bool) -> bool:
        return self.scorer is not None and bool(self._pending.pending)

    def _update_momentum(self, mus: list[Tensor]) -> dict[str, Tensor]:
        """Fold the mean of the cycle's ``μ`` (averaged over data-parallel ranks) into ``m_T``; returns its logs."""
        mus = [self._mean_over_ranks(mu) for mu in mus]
        m = self.momentum.update(torch.stack(mus).mean(), epoch=self.current_epoch)
        return {"train/mu": torch.stack(mus).mean(), "train/m": m}

    def _scorer_residuals(self, terms: MicroBatch) -> tuple[list[Tensor], bool]:
        """What ``L_ucs`` weights, and whether it stops the gradient into them (the backbone)."""
        return terms.targets, True


#: The start of a run with a scorer says what the study found.
CAUTION = (
    "AdaCS: at a converged budget on the synthetic dose-response study no AdaCS variant beat a λ-tuned "
    "baseline on MRI-like pairs (this default lost up to 1.0 Dice, the robust calibrations up to 3.3) and "
    "wins were rare elsewhere (docs/results.md, *Where AdaCS helps*). Check your data with "
    "adacs-train -m experiment=fair_comparison."
)
#: What each phase of the schedule trains, said when it starts.
PHASE_DESCRIPTIONS = {
    Phase.WARMUP_BACKBONE: "warm-up A, training the backbone alone (score ≡ 1)",
    Phase.WARMUP_SCORER: "warm-up B, training the scorer with the backbone frozen",
    Phase.JOINT: "joint phase, updating backbone and scorer every step",
}


def _scorer_for(backbone: nn.Module, scoring: bool, scorer: nn.Module | None, scorer_input: str) -> nn.Module | None:
    """The run's scorer: ``scorer``, else a :class:`~adacs_lightning.scoring.ScoringNetwork` for the backbone's
    images; None for the plain backbone (``scoring=False``)."""
    if not scoring:
        if scorer is not None:
            raise ValueError("scoring=False trains the plain backbone: do not pass a scorer")
        return None
    if scorer is not None:
        return scorer
    return ScoringNetwork(backbone.spatial_dims, backbone.in_channels, scorer_input=scorer_input)


def _say_phase(epoch: int, warmup: int, phase: Phase) -> None:
    """Say which phase starts at ``epoch`` when one does (epochs 0, ``N_w`` and ``2N_w``)."""
    if epoch in (0, warmup, 2 * warmup):
        rank_zero_info(f"Epoch {epoch}: {PHASE_DESCRIPTIONS[phase]}.")


def _say_fit_start(warmup: int, max_epochs: int | None) -> None:
    """Say what the study found; warn when a run of ``max_epochs`` ends before the joint phase (``2·warmup``)."""
    rank_zero_info(CAUTION)
    if max_epochs is not None and max_epochs != -1 and max_epochs <= 2 * warmup:
        rank_zero_warn(
            f"max_epochs={max_epochs} ends before the joint phase, which starts at epoch "
            f"2·warmup_epochs = {2 * warmup}: lower warmup_epochs or raise max_epochs."
        )


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
