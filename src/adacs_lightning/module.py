"""The AdaCS LightningModule: any registration backbone plus a correspondence scorer (METHOD.md)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from monai.networks.blocks import Warp
from torch import nn
from torchmetrics import MeanMetric

from .backbones import Backbone, RegistrationOutput, as_backbone
from .checkpoint import BACKBONE_CONFIG_KEY, METHOD_KEY
from .errors import ConfigError, NonFiniteLossError
from .losses import displacement_loss, masked_mean, scoring_loss, squared_residual
from .metrics import dice_per_label, folding_percentage
from .momentum import MomentumWeight
from .schedule import Phase, phase_at
from .scoring import ScoringNetwork

Tensor = torch.Tensor

warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample.*")


@dataclass
class _Direction:
    """One registration direction of a micro-batch: what it warps onto what, and how well."""

    moving: Tensor  # (B, C, *spatial)
    fixed: Tensor  # (B, C, *spatial)
    residual: Tensor  # (B, 1, *spatial), squared intensity
    output: RegistrationOutput


@dataclass
class _PendingScoring:
    """A micro-batch whose scorer loss waits for the end of its accumulation cycle."""

    score: Tensor  # (n_dir·B, 1, *spatial), with the scorer's autograd graph
    residuals: list[Tensor]  # per direction (B, 1, *spatial), detached
    pairs: list[tuple[Tensor, Tensor]]  # per direction (moving, fixed), for recomputing the residual
    mask: Tensor | None


@dataclass
class _Cycle:
    """State of the current gradient-accumulation cycle."""

    mu: list[Tensor] = field(default_factory=list)
    pending: list[_PendingScoring] = field(default_factory=list)


class AdaCS(L.LightningModule):
    """Trains a registration backbone with Adaptive Correspondence Scoring.

    ``AdaCS(net)`` is all that is required: ``net`` is any ``nn.Module`` that follows or
    can be adapted to the backbone contract (see :class:`~adacs_lightning.backbones.Backbone`),
    and the scorer defaults to a MONAI U-Net built for the backbone's spatial dims. Batches
    are dicts with ``source`` and ``target`` ``(B, C, *spatial)`` in [0, 1] and optionally
    ``mask`` (field of view), ``source_label`` and ``target_label`` (for validation only).

    Args:
        backbone: the registration network ``f_θ``.
        scorer: the scoring network ``g_φ`` (target image → map in [0, 1]); a
            :class:`~adacs_lightning.scoring.ScoringNetwork` when omitted.
        scoring: False trains the plain backbone (the like-for-like baseline: same data
            term and regulariser, no scorer).
        alpha: weight ``α`` of ``L_reg``.
        beta: weight ``β`` of ``L_smooth``.
        lam: weight ``λ`` of the displacement smoothness.
        gamma: momentum ``γ`` of ``m_T``.
        kappa: residual scale ``κ`` of ``b_T`` (50: the reference code's, for images in [0, 1]), or
            ``"auto"`` for ``κ = 1/μ_1`` (see README for when auto switches the smoothness off).
        warmup_epochs: ``N_w``; warm-up A is epochs ``[0, N_w)``, warm-up B ``[N_w, 2N_w)``.
        lr: Adam learning rate of the backbone.
        scorer_lr: Adam learning rate of the scorer (``lr`` when None).
        accumulate_grad_batches: micro-batches per optimiser step, for both networks.
        bidirectional: also register target → source; the backward direction is scored by
            ``g_φ(source)`` and the two directions are averaged.
        score_residual: which displacement the scorer's residual uses in the joint phase:
            ``"reuse"`` (default) the one from before the backbone's update, so one backward
            pass serves both networks; ``"recompute"`` re-runs the backbone after its update,
            as the reference code does (one more backbone forward per step).
        spatial_dims, in_channels: for a backbone from which they cannot be read.
        eval_labels: label values whose mean Dice is ``val/dice``; by default the datamodule's
            ``eval_labels``, else every non-zero label.
        channels_last: keep both networks and the images in channels-last memory format
            (faster convolutions on recent GPUs; numerics unchanged up to rounding).
        compile: ``torch.compile`` backbone and scorer in place when training starts; state
            dicts, checkpoints and the exported backbone are unaffected.
    """

    def __init__(
        self,
        backbone: nn.Module,
        scorer: nn.Module | None = None,
        *,
        scoring: bool = True,
        alpha: float = 0.02,
        beta: float = 1.5,
        lam: float = 0.01,
        gamma: float = 0.99,
        kappa: float | str = 50.0,
        warmup_epochs: int = 20,
        lr: float = 1e-4,
        scorer_lr: float | None = None,
        accumulate_grad_batches: int = 1,
        bidirectional: bool = False,
        score_residual: Literal["recompute", "reuse"] = "reuse",
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        eval_labels: Sequence[int] | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_settings(alpha, beta, lam, warmup_epochs, lr, scorer_lr, accumulate_grad_batches, score_residual)
        self.save_hyperparameters(ignore=["backbone", "scorer"])
        self.automatic_optimization = False

        adapter_kwargs = {k: v for k, v in (("spatial_dims", spatial_dims), ("in_channels", in_channels)) if v}
        self.backbone: Backbone = as_backbone(backbone, **adapter_kwargs)
        self.scorer: nn.Module | None = None
        if scoring:
            self.scorer = (
                scorer if scorer is not None else ScoringNetwork(self.backbone.spatial_dims, self.backbone.in_channels)
            )
        elif scorer is not None:
            raise ValueError("scoring=False trains the plain backbone: do not pass a scorer")
        self.momentum = MomentumWeight(gamma=gamma, kappa=kappa)
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.warp_labels = Warp(mode="nearest", padding_mode="border")

        self._cycle = _Cycle()
        self._eval_labels: list[int] | None = None
        # The backbone's Hydra config, when the CLI built it: stored in checkpoints so that
        # load_backbone() can rebuild the network from the checkpoint alone.
        self.backbone_config: dict | None = None
        self.val_residual = MeanMetric()
        self.val_folding = MeanMetric()
        self.val_dice = MeanMetric(nan_strategy="ignore")
        self.val_dice_identity = MeanMetric(nan_strategy="ignore")
        self.val_dice_per_label = nn.ModuleDict()

    # ------------------------------------------------------------------ public helpers
    @property
    def phase(self) -> Phase:
        """The schedule phase of the current epoch."""
        return phase_at(self.current_epoch, self.hparams.warmup_epochs, self.scorer is not None)

    def export_backbone(self) -> Backbone:
        """A standalone copy of the trained registration network, in eval mode, without the scorer.

        It maps ``(moving, fixed)`` to the displacement ``(B, ndim, *spatial)`` in voxels and
        costs exactly what the bare network costs at inference.
        """
        exported = copy.deepcopy(self.backbone).eval()
        exported.requires_grad_(False)
        return exported

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """Displacement from the backbone alone (inference)."""
        return self.backbone(moving, fixed)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.backbone_config is not None:
            checkpoint[BACKBONE_CONFIG_KEY] = self.backbone_config
        checkpoint[METHOD_KEY] = "adacs" if self.scorer is not None else "baseline"

    def configure_model(self) -> None:
        """Memory format and compilation, once the module is on its device."""
        networks = [net for net in (self.backbone, self.scorer) if net is not None]
        if self.hparams.channels_last:
            for net in networks:
                net.to(memory_format=self._memory_format)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            # The adapter's own methods (forward_train) call its children, so compile those.
            for net in [*self.backbone.children(), *([self.scorer] if self.scorer is not None else [])]:
                net.compile()
            self._compiled = True

    @property
    def _memory_format(self) -> torch.memory_format:
        if not self.hparams.channels_last:
            return torch.contiguous_format
        return torch.channels_last if self.backbone.spatial_dims == 2 else torch.channels_last_3d

    # ------------------------------------------------------------------ optimisers
    def configure_optimizers(self):
        opt_backbone = torch.optim.Adam(self.backbone.parameters(), lr=self.hparams.lr)
        if self.scorer is None:
            return opt_backbone
        scorer_lr = self.hparams.scorer_lr or self.hparams.lr
        return [opt_backbone, torch.optim.Adam(self.scorer.parameters(), lr=scorer_lr)]

    def _optimisers(self) -> tuple[Any, Any | None]:
        opts = self.optimizers()
        if isinstance(opts, (list, tuple)):
            return opts[0], opts[1]
        return opts, None

    # ------------------------------------------------------------------ training
    def on_fit_start(self) -> None:
        warmup = self.hparams.warmup_epochs
        max_epochs = self.trainer.max_epochs
        if self.scorer is not None and max_epochs is not None and max_epochs != -1 and max_epochs <= 2 * warmup:
            rank_zero_warn(
                f"max_epochs={max_epochs} ends before the joint phase, which starts at epoch "
                f"2·warmup_epochs = {2 * warmup}: lower warmup_epochs or raise max_epochs."
            )

    def on_train_epoch_start(self) -> None:
        # A cycle never spans epochs; drop whatever an unfinished one left behind.
        self._cycle = _Cycle()
        for optimiser in self._optimisers():
            if optimiser is not None:
                optimiser.zero_grad(set_to_none=True)
        epoch, warmup = self.current_epoch, self.hparams.warmup_epochs
        phase = self.phase
        if self.scorer is not None and (epoch in (0, warmup, 2 * warmup)):
            descriptions = {
                Phase.WARMUP_BACKBONE: "warm-up A, training the backbone alone (score ≡ 1)",
                Phase.WARMUP_SCORER: "warm-up B, training the scorer with the backbone frozen",
                Phase.JOINT: "joint phase, updating backbone and scorer every step",
            }
            rank_zero_info(f"Epoch {epoch}: {descriptions[phase]}.")

    def _images(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
        source, target, mask = _unpack(batch)
        if source.shape[1] != self.backbone.in_channels:
            raise ValueError(
                f"The images have {source.shape[1]} channel(s), but the backbone and scorer were built for "
                f"{self.backbone.in_channels}: pass in_channels={source.shape[1]} to AdaCS (or to the backbone's "
                "config) to match the data."
            )
        if self.hparams.channels_last:
            source, target = (t.contiguous(memory_format=self._memory_format) for t in (source, target))
        return source, target, mask

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        source, target, mask = self._images(batch)
        phase = self.phase
        cycle_end, cycle_len = self._cycle_position(batch_idx)
        batch_size = source.shape[0]
        updates_backbone = phase is not Phase.WARMUP_SCORER

        if updates_backbone:
            forward, backward = self.backbone.forward_train(source, target, self.hparams.bidirectional)
        else:
            forward, backward = self._frozen_backbone(source, target, self.hparams.bidirectional)
        directions = self._directions(source, target, forward, backward)
        pending = None
        if phase is not Phase.WARMUP_BACKBONE:
            # One scorer call per step: its detached output weights L_de, its graph serves L_se.
            score = self.scorer(torch.cat([d.fixed for d in directions], dim=0))
            pending = _PendingScoring(
                score=score,
                residuals=[d.residual.detach() for d in directions],
                pairs=[(d.moving, d.fixed) for d in directions],
                mask=mask,
            )
        loss_de, data = self._displacement_loss(directions, pending, mask, updates_backbone, batch_size)
        # Before anything changes state: an optimiser step, or m_T (which μ_T = data feeds).
        self._check_finite(batch_idx, phase, {"L_de": loss_de, "displacement data term": data})
        opt_backbone, opt_scorer = self._optimisers()

        single_pass = pending is not None and cycle_len == 1 and not self._uses_grad_scaler()
        single_pass &= phase is Phase.WARMUP_SCORER or self.hparams.score_residual == "reuse"
        if single_pass:
            # L_de reaches only f_θ and L_se only g_φ (the stop-gradients make the graphs
            # disjoint), so one backward pass of their sum gives both networks their gradients.
            # (A gradient scaler, 16-bit precision, needs one backward pass per optimiser.)
            m = self._update_momentum([data.detach()])
            loss_se = self._scoring_loss(pending, m, batch_size, recompute=False)
            self._check_finite(batch_idx, phase, {"L_se": loss_se})
            self.manual_backward(loss_se + loss_de if updates_backbone else loss_se)
            if updates_backbone:
                _step(opt_backbone)
            _step(opt_scorer)
            return

        if updates_backbone:
            self.manual_backward(loss_de / cycle_len)
        if pending is not None:
            self._cycle.mu.append(data.detach())
            self._cycle.pending.append(pending)
        if not cycle_end:
            return
        if updates_backbone:
            _step(opt_backbone)
        if pending is not None:
            # The scorer's update waits for the cycle's end: m_T needs the whole cycle's μ_T,
            # and "recompute" needs the backbone as it is after its step.
            m = self._update_momentum(self._cycle.mu)
            recompute = phase is Phase.JOINT and self.hparams.score_residual == "recompute"
            for queued in self._cycle.pending:
                loss_se = self._scoring_loss(queued, m, batch_size, recompute)
                self._check_finite(batch_idx, phase, {"L_se": loss_se})
                self.manual_backward(loss_se / cycle_len)
            _step(opt_scorer)
        self._cycle = _Cycle()

    def _displacement_loss(
        self,
        directions: list[_Direction],
        pending: _PendingScoring | None,
        mask: Tensor | None,
        with_extra_loss: bool,
        batch_size: int,
    ) -> tuple[Tensor, Tensor]:
        """``L_de`` averaged over directions, and its data term (``μ`` of this micro-batch); logged."""
        scores = _split(None if pending is None else pending.score, len(directions))
        terms = [
            displacement_loss(d.residual, d.output.ddf, s, self.hparams.lam, mask) for d, s in zip(directions, scores)
        ]
        loss_de, data, smooth = (_mean(t[i] for t in terms) for i in range(3))
        extras = [d.output.extra_loss for d in directions if d.output.extra_loss is not None]
        if extras and with_extra_loss:
            loss_de = loss_de + _mean(extras)
        logs = {"train/loss_de": loss_de, "train/data": data, "train/smooth_ddf": smooth}
        self.log_dict(logs, on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log("train/phase", float(self.phase.index), on_step=True, on_epoch=False, batch_size=batch_size)
        return loss_de, data

    def _update_momentum(self, mus: list[Tensor]) -> Tensor:
        """Fold this step's ``μ_T`` (mean over micro-batches and data-parallel ranks) into ``m_T``."""
        mu = self.trainer.strategy.reduce(torch.stack(mus).mean(), reduce_op="mean")
        m = self.momentum.update(mu)
        self.log_dict({"train/mu": mu, "train/m": m}, on_step=True, on_epoch=True, batch_size=1, sync_dist=True)
        return m

    def _scoring_loss(self, queued: _PendingScoring, m: Tensor, batch_size: int, recompute: bool) -> Tensor:
        """``L_se`` of one micro-batch, averaged over directions; logged."""
        residuals = self._recomputed_residuals(queued) if recompute else queued.residuals
        scores = _split(queued.score, len(residuals))
        terms = [
            scoring_loss(s, r, self.hparams.alpha, self.hparams.beta, m, queued.mask) for s, r in zip(scores, residuals)
        ]
        loss_se, ucs, reg, smooth = (_mean(t[i] for t in terms) for i in range(4))
        logs = {
            "train/loss_se": loss_se,
            "train/ucs": ucs,
            "train/reg": reg,
            "train/smooth_score": smooth,
            "train/score_mean": _mean(masked_mean(s.detach(), queued.mask) for s in scores),
        }
        self.log_dict(logs, on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        return loss_se

    def _recomputed_residuals(self, pending: _PendingScoring) -> list[Tensor]:
        """Residuals of the pending micro-batch under the backbone as it is after its update."""
        moving, fixed = pending.pairs[0]
        forward, backward = self._frozen_backbone(moving, fixed, len(pending.pairs) == 2)
        return [d.residual for d in self._directions(moving, fixed, forward, backward)]

    def _frozen_backbone(
        self, moving: Tensor, fixed: Tensor, bidirectional: bool
    ) -> tuple[RegistrationOutput, RegistrationOutput | None]:
        """Backbone outputs without gradients, in eval mode (the backbone is frozen)."""
        was_training = self.backbone.training
        self.backbone.eval()
        with torch.no_grad():
            outputs = self.backbone.forward_train(moving, fixed, bidirectional)
        self.backbone.train(was_training)
        return outputs

    def _directions(
        self, source: Tensor, target: Tensor, forward: RegistrationOutput, backward: RegistrationOutput | None
    ) -> list[_Direction]:
        pairs = [(source, target, forward)] + ([(target, source, backward)] if backward is not None else [])
        return [
            _Direction(moving, fixed, squared_residual(self.warp(moving, out.ddf), fixed), out)
            for moving, fixed, out in pairs
        ]

    def _cycle_position(self, batch_idx: int) -> tuple[bool, int]:
        """Whether ``batch_idx`` ends its accumulation cycle, and that cycle's length.

        A cycle also ends at the last batch of an epoch (the phase may change there).
        """
        k = self.hparams.accumulate_grad_batches
        num_batches = self.trainer.num_training_batches
        start = batch_idx - batch_idx % k
        if num_batches == float("inf"):
            return (batch_idx + 1) % k == 0, k
        length = min(k, int(num_batches) - start)
        return batch_idx + 1 == start + length, length

    def _check_finite(self, batch_idx: int, phase: Phase, terms: Mapping[str, Tensor]) -> None:
        """Raise before any state changes if a term is NaN or infinite on any rank (all ranks raise)."""
        values = torch.stack([t.detach().float() for t in terms.values()])
        bad = (~torch.isfinite(values)).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bool(bad.any()):
            names = [name for name, flag in zip(terms, bad.tolist()) if flag]
            raise NonFiniteLossError(batch_idx, self.current_epoch, phase.value, names)

    def _uses_grad_scaler(self) -> bool:
        return getattr(self.trainer.precision_plugin, "scaler", None) is not None

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self._eval_labels = self._resolve_eval_labels()

    def _resolve_eval_labels(self) -> list[int] | None:
        if self.hparams.eval_labels:
            return [int(v) for v in self.hparams.eval_labels]
        # Datamodule settings are the same on every rank, unlike labels read from batches.
        datamodule = getattr(self.trainer, "datamodule", None)
        labels = getattr(datamodule, "eval_labels", None) or sorted(getattr(datamodule, "label_names", None) or {})
        return [int(v) for v in labels] if labels else None

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        source, target, mask = self._images(batch)
        ddf = self.backbone(source, target)
        warped = self.warp(source, ddf)
        residual = squared_residual(warped, target)
        batch_size = source.shape[0]
        per_sample_residual = torch.stack(
            [masked_mean(residual[i : i + 1], None if mask is None else mask[i : i + 1]) for i in range(batch_size)]
        )
        self.val_residual.update(per_sample_residual)
        self.val_folding.update(folding_percentage(ddf, mask))
        log = {"val/residual": self.val_residual, "val/folding_pct": self.val_folding}

        if "source_label" in batch and "target_label" in batch:
            source_label, target_label = batch["source_label"], batch["target_label"]
            labels = self._eval_labels or _nonzero_labels(target_label)
            # float32 whatever the precision: bf16 cannot hold label values above 256 exactly
            warped_label = self.warp_labels(source_label.float(), ddf.float()).round().long()
            dice = dice_per_label(warped_label, target_label, labels)
            self.val_dice.update(dice.nanmean(dim=1))
            self.val_dice_identity.update(dice_per_label(source_label, target_label, labels).nanmean(dim=1))
            for column, label in enumerate(labels):
                self._label_metric(label).update(dice[:, column])
            log.update({"val/dice": self.val_dice, "val/dice_identity": self.val_dice_identity})
            log.update({f"val/dice_label{k}": metric for k, metric in self.val_dice_per_label.items()})
        dice_metric = log.pop("val/dice", None)
        self.log_dict(log, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)
        if dice_metric is not None:
            self.log("val/dice", dice_metric, prog_bar=True, on_epoch=True, batch_size=batch_size, sync_dist=True)

    def _label_metric(self, label: int) -> MeanMetric:
        key = str(label)
        if key not in self.val_dice_per_label:
            self.val_dice_per_label[key] = MeanMetric(nan_strategy="ignore").to(self.device)
        return self.val_dice_per_label[key]


def _check_settings(alpha, beta, lam, warmup_epochs, lr, scorer_lr, accumulate, score_residual) -> None:
    """Reject values the method cannot use, naming the setting and a usable value."""
    paper = {"alpha": 0.02, "beta": 1.5, "lam": 0.01, "warmup_epochs": 20, "lr": 1e-4, "scorer_lr": 1e-4}
    for name, value in (("alpha", alpha), ("beta", beta), ("lam", lam), ("warmup_epochs", warmup_epochs)):
        if value < 0:
            raise ConfigError(name, f"must be non-negative, got {value}.", f"The paper uses {paper[name]}.")
    for name, value in (("lr", lr), ("scorer_lr", scorer_lr)):
        if value is not None and value <= 0:
            raise ConfigError(name, f"must be positive, got {value}.", f"The paper uses {paper[name]}.")
    if accumulate < 1:
        raise ConfigError(
            "accumulate_grad_batches", f"must be at least 1, got {accumulate}.", "Use 1 for no accumulation."
        )
    if score_residual not in ("recompute", "reuse"):
        raise ConfigError(
            "score_residual",
            f"must be 'recompute' or 'reuse', got {score_residual!r}.",
            "The reference is 'recompute'.",
        )


def _unpack(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(source, target, mask or None)`` from a batch dict, with a clear error for anything else."""
    if not isinstance(batch, Mapping) or "source" not in batch or "target" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"AdaCS expects batches as dicts with 'source' and 'target' (and optionally 'mask', "
            f"'source_label', 'target_label'); got {keys}."
        )
    source, target = batch["source"], batch["target"]
    if source.shape != target.shape:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    return source, target, batch.get("mask")


def _step(optimiser) -> None:
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)


def _split(score: Tensor | None, parts: int) -> list[Tensor | None]:
    return [None] * parts if score is None else list(score.chunk(parts, dim=0))


def _mean(values) -> Tensor:
    values = list(values)
    return values[0] if len(values) == 1 else torch.stack(values).mean()


def _nonzero_labels(label_map: Tensor) -> list[int]:
    return [int(v) for v in torch.unique(label_map).tolist() if v != 0]
