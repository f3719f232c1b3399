"""What every training method shares: the backbone, its objective, accumulation, validation, export.

A method (:class:`~adacs_lightning.AdaCS`, the variance-weighted likelihoods, the closed-form robust
control) extends :class:`RegistrationModule` and adds only the map it weights the dissimilarity with
and how it updates its networks. The objective is :class:`~adacs_lightning.objective.BackboneObjective`,
the validation means :class:`~adacs_lightning.metrics.ValidationMetrics` (docs/architecture.md).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn

from ..backbones import Backbone, as_backbone
from ..checkpoint import BACKBONE_CONFIG_KEY, METHOD_KEY, SIMILARITY_KEY
from ..errors import NonFiniteLossError
from ..metrics import ValidationMetrics
from ..objective import BackboneObjective, Direction
from ..schedule import Phase
from ..similarity import Similarity
from .settings import LAM, LR, check_base_settings
from .speed import SpeedOptions
from .steps import Cycle, cycle_at, eval_labels_of, frozen_forward_train, non_finite, step, unpack

Tensor = torch.Tensor


class RegistrationModule(SpeedOptions, L.LightningModule):
    """Base of every training method: owns the backbone ``f_θ`` and everything that is not the weighting.

    Batches are dicts with ``source`` and ``target`` ``(B, C, *spatial)`` in [0, 1] and optionally
    ``mask`` (field of view), ``nocorr``, ``source_label`` and ``target_label``.

    Args:
        backbone: the registration network (any network, through :func:`~adacs_lightning.backbones.as_backbone`).
        similarity: the dissimilarity map, or its name (``mse``, ``lncc``, ``mi``); squared error when None.
        lam: weight ``λ`` of the smoothness penalty ``mean‖∇·‖²``.
        smoothness_on: ``"displacement"`` or ``"velocity"`` (before integration, on its grid, as the reference).
        label_weight: weight of a Dice loss between warped source labels and target labels (0: off).
        warmup_epochs: epochs of plain-baseline training before the method's weighting starts.
        lr: Adam learning rate of the backbone.
        accumulate_grad_batches: micro-batches per optimiser step, for every network.
        bidirectional: also register target → source; the two directions are averaged.
        spatial_dims, in_channels: for a backbone from which they cannot be read.
        eval_labels: label values whose mean Dice is ``val/dice``; by default the datamodule's.
        channels_last, compile: channels-last memory format; ``torch.compile`` when training starts (speed only).
    """

    #: The name checkpoints record (``adacs_method``); subclasses override it.
    method_name = "registration"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        similarity: Similarity | str | None = None,
        lam: float = LAM,
        smoothness_on: str = "displacement",
        label_weight: float = 0.0,
        warmup_epochs: int = 0,
        lr: float = LR,
        accumulate_grad_batches: int = 1,
        bidirectional: bool = False,
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        eval_labels: Sequence[int] | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_base_settings(lam, label_weight, warmup_epochs, lr, accumulate_grad_batches, smoothness_on)
        # Collects the init arguments of the whole class chain (Lightning walks the __init__ frames).
        self.save_hyperparameters(ignore=["backbone", "scorer", "variance_net", "similarity"])
        self.automatic_optimization = False
        geometry = {k: v for k, v in (("spatial_dims", spatial_dims), ("in_channels", in_channels)) if v}
        self.backbone: Backbone = as_backbone(backbone, **geometry)
        self.objective = BackboneObjective.for_backbone(self.backbone, similarity, lam, smoothness_on, label_weight)
        self.val_metrics = ValidationMetrics()
        # The backbone's Hydra config, when the CLI built it: checkpoints store it (load_backbone rebuilds from it).
        self.backbone_config: dict | None = None
        self._eval_labels: list[int] | None = None

    @property
    def similarity(self) -> Similarity:
        return self.objective.similarity

    @property
    def warp(self) -> nn.Module:
        return self.objective.warp

    # ------------------------------------------------------------------ what a method defines
    @property
    def weighting_networks(self) -> list[nn.Module]:
        """The method's own networks besides the backbone (a scorer, a variance network)."""
        return []

    @property
    def phase(self) -> Phase:
        """Warm-up A (the plain baseline) for ``epoch < warmup_epochs``, then the method's own phase."""
        return Phase.WARMUP_BACKBONE if self.current_epoch < self.hparams.warmup_epochs else Phase.JOINT

    @property
    def backbone_idle_epochs(self) -> int:
        """Epochs in which the backbone is not updated (AdaCS's warm-up B); an equal budget adds them."""
        return 0

    def weight_map(self, fixed: Tensor, residual: Tensor, warped: Tensor | None = None) -> Tensor | None:
        """The weight ``(B, 1, *spatial)`` in [0, 1] the method gives ``residual`` measured on ``fixed`` (``warped``: the
        warped source, for a scorer that sees the pair); None: ``Ŝ ≡ 1``."""
        return None

    # ------------------------------------------------------------------ inference and checkpoints
    def export_backbone(self) -> Backbone:
        """A standalone copy of the trained network in eval mode: ``(moving, fixed)`` → displacement, nothing else."""
        exported = copy.deepcopy(self.backbone).eval()
        exported.requires_grad_(False)
        return exported

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """Displacement from the backbone alone (inference)."""
        return self.backbone(moving, fixed)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.backbone_config is not None:
            checkpoint[BACKBONE_CONFIG_KEY] = self.backbone_config
        checkpoint[METHOD_KEY] = self.method_name
        checkpoint[SIMILARITY_KEY] = repr(self.similarity)

    # ------------------------------------------------------------------ training
    def backbone_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.backbone.parameters(), lr=self.hparams.lr)

    def on_train_epoch_start(self) -> None:
        self._clear_gradients()

    def _clear_gradients(self) -> None:
        """A cycle never spans epochs: drop whatever an unfinished one left behind."""
        for optimiser in self._optimisers():
            optimiser.zero_grad(set_to_none=True)

    def _optimisers(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _mean_over_ranks(self, value: Tensor) -> Tensor:
        """``value``'s mean over the data-parallel ranks (``value`` itself on one)."""
        return self.trainer.strategy.reduce(value, reduce_op="mean")

    def _optimisers_pair(self) -> tuple[Any, Any | None]:
        """The backbone's optimiser and the weighting network's (None when the method has none)."""
        opts = self._optimisers()
        return opts[0], (opts[1] if len(opts) > 1 else None)

    def _images(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
        source, target, mask = unpack(batch, self.backbone.in_channels)
        return (*self._in_memory_format(source, target), mask)

    def _register(self, batch: Mapping[str, Any], frozen: bool = False) -> list[Direction]:
        """The micro-batch's directions with their maps; ``frozen`` runs the backbone in eval mode without gradients."""
        source, target, mask = self._images(batch)
        if frozen:
            outputs = frozen_forward_train(self.backbone, source, target, self.hparams.bidirectional)
        else:
            outputs = self.backbone.forward_train(source, target, self.hparams.bidirectional)
        labels = (batch.get("source_label"), batch.get("target_label")) if self.objective.uses_labels else (None,) * 2
        return self.objective.directions(source, target, *outputs, mask, labels)

    def _cycle(self, batch_idx: int) -> Cycle:
        return cycle_at(batch_idx, self.hparams.accumulate_grad_batches, self.trainer.num_training_batches)

    def _accumulate(self, loss: Tensor, cycle: Cycle, *optimisers) -> None:
        """Backpropagate ``loss`` as 1/``cycle.length`` of the cycle's gradient; step ``optimisers`` at its end."""
        self.manual_backward(loss / cycle.length)
        if cycle.end:
            for optimiser in optimisers:
                step(optimiser)

    def _check_finite(self, batch_idx: int, terms: Mapping[str, Tensor]) -> None:
        """Raise before any state changes if a term is NaN or infinite on any rank (all ranks raise)."""
        reduce = (lambda t: self.trainer.strategy.reduce(t, reduce_op="sum")) if self.trainer.world_size > 1 else None
        names = non_finite(terms, reduce)
        if names:
            raise NonFiniteLossError(batch_idx, self.current_epoch, self.phase.value, names)

    def _log_training(self, logs: Mapping[str, Tensor], batch_size: int) -> None:
        """The one place a training step logs: scalars (step and epoch means, synced) and the phase."""
        scalars = {k: v.detach() if isinstance(v, Tensor) else v for k, v in logs.items()}
        self.log_dict(scalars, on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log("train/phase", float(self.phase.index), on_step=True, on_epoch=False, batch_size=batch_size)

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        # Datamodule settings are the same on every rank, unlike labels read from batches.
        self._eval_labels = eval_labels_of(self.hparams.eval_labels, getattr(self.trainer, "datamodule", None))

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        source, target, mask = self._images(batch)
        ddf = self.backbone(source, target)
        warped = self.warp(source, ddf)
        residual = self.similarity(warped, target, mask)
        nocorr = batch.get("nocorr")
        weight = self.weight_map(target, residual, warped) if nocorr is not None else None
        labels = (batch.get("source_label"), batch.get("target_label"), self._eval_labels)
        logged = self.val_metrics.update(ddf, residual, mask, weight, nocorr, labels)
        size = source.shape[0]
        if "val/dice" in logged:
            self.log("val/dice", logged.pop("val/dice"), prog_bar=True, on_epoch=True, batch_size=size, sync_dist=True)
        self.log_dict(logged, on_step=False, on_epoch=True, batch_size=size, sync_dist=True)
