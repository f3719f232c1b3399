"""What every training method shares: the backbone, warping, the data term's map, validation, export.

A method (:class:`~adacs_lightning.AdaCS`, the variance-weighted likelihoods, the closed-form
robust control) extends :class:`RegistrationModule` and adds only what it weights the
dissimilarity map with and how it updates its networks. docs/method.md describes each.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import nn
from torchmetrics import MeanMetric

from ..backbones import Backbone, RegistrationOutput, as_backbone
from ..checkpoint import BACKBONE_CONFIG_KEY, METHOD_KEY, SIMILARITY_KEY
from ..errors import ConfigError, NonFiniteLossError
from ..losses import displacement_data_term, gradient_energy, masked_mean
from ..metrics import dice_per_label, folding_percentage, localisation
from ..schedule import Phase
from ..similarity import Similarity, SquaredError, similarity_from_name
from ..warping import warp_block

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


@dataclass(frozen=True)
class Cycle:
    """Where a micro-batch sits in its gradient-accumulation cycle: ``length`` micro-batches, ``end`` the last."""

    end: bool
    length: int


class RegistrationModule(L.LightningModule):
    """Base of every training method: owns the backbone ``f_θ`` and everything that is not the weighting.

    Shared here: the backbone (any network, through :func:`~adacs_lightning.backbones.as_backbone`),
    warping (MONAI ``Warp``), the dissimilarity map ``r`` of ``similarity``, the smoothness
    penalty ``λ·mean‖∇·‖²`` on the displacement or the velocity, optional label supervision,
    gradient accumulation under manual optimisation, the finiteness check, validation metrics
    (Dice, residual, smoothness, folding), checkpoint entries and :meth:`export_backbone`.

    Batches are dicts with ``source`` and ``target`` ``(B, C, *spatial)`` in [0, 1] and optionally
    ``mask`` (field of view), ``source_label`` and ``target_label`` (validation Dice; training too
    when ``label_weight > 0``).

    Args:
        backbone: the registration network.
        similarity: the dissimilarity map, or its name (``mse``, ``lncc``, ``mi``, with default settings);
            :class:`~adacs_lightning.similarity.SquaredError` when None.
        lam: weight ``λ`` of the smoothness penalty.
        smoothness_on: ``"displacement"`` (default) or ``"velocity"``: the field before integration,
            on its integration grid, as the reference penalises it (velocity backbones only).
        label_weight: weight of a Dice loss between warped source labels and target labels (0: off).
        warmup_epochs: epochs of plain-baseline training before the method's weighting starts.
        lr: Adam learning rate of the backbone.
        accumulate_grad_batches: micro-batches per optimiser step, for every network.
        bidirectional: also register target → source; the two directions are averaged.
        spatial_dims, in_channels: for a backbone from which they cannot be read.
        eval_labels: label values whose mean Dice is ``val/dice``; by default the datamodule's.
        channels_last: channels-last memory format for the networks and images (speed only).
        compile: ``torch.compile`` the networks in place when training starts (speed only).
    """

    #: The name checkpoints record (``adacs_method``); subclasses override it.
    method_name = "registration"

    def __init__(
        self,
        backbone: nn.Module,
        *,
        similarity: Similarity | str | None = None,
        lam: float = 0.01,
        smoothness_on: str = "displacement",
        label_weight: float = 0.0,
        warmup_epochs: int = 0,
        lr: float = 1e-4,
        accumulate_grad_batches: int = 1,
        bidirectional: bool = False,
        spatial_dims: int | None = None,
        in_channels: int | None = None,
        eval_labels: Sequence[int] | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        _check_base_settings(lam, label_weight, warmup_epochs, lr, accumulate_grad_batches, smoothness_on)
        # Collects the init arguments of the whole class chain (Lightning walks the __init__ frames).
        self.save_hyperparameters(ignore=["backbone", "scorer", "variance_net", "similarity"])
        self.automatic_optimization = False

        adapter_kwargs = {k: v for k, v in (("spatial_dims", spatial_dims), ("in_channels", in_channels)) if v}
        self.backbone: Backbone = as_backbone(backbone, **adapter_kwargs)
        if smoothness_on == "velocity" and self.backbone.integrate is None:
            raise ConfigError(
                "smoothness_on",
                f"is 'velocity', but {self.backbone.name} predicts the displacement directly (no velocity to penalise).",
                "Use smoothness_on=displacement, or a velocity backbone (voxelmorph with integration_steps > 0).",
            )
        if isinstance(similarity, str):
            similarity = similarity_from_name(similarity, self.backbone.spatial_dims)
        self.similarity: Similarity = similarity if similarity is not None else SquaredError()
        self.warp = warp_block("bilinear", "border")
        self.warp_labels = warp_block("nearest", "border")
        self.label_loss = DiceLoss(include_background=False) if label_weight > 0 else None
        # The backbone's Hydra config, when the CLI built it: stored in checkpoints so that
        # load_backbone() can rebuild the network from the checkpoint alone.
        self.backbone_config: dict | None = None
        self._eval_labels: list[int] | None = None
        self.val_residual = MeanMetric()
        self.val_smoothness = MeanMetric()
        self.val_displacement = MeanMetric()
        self.val_folding = MeanMetric()
        self.val_dice = MeanMetric(nan_strategy="ignore")
        self.val_dice_identity = MeanMetric(nan_strategy="ignore")
        self.val_dice_per_label = nn.ModuleDict()
        # Where the target has no counterpart (batches with ``nocorr``): does the weight map fall there?
        self.val_localisation = nn.ModuleDict(
            {name: MeanMetric(nan_strategy="ignore") for name in ("auroc", "score_nocorr", "score_corr")}
        )

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

    def weight_map(self, fixed: Tensor, residual: Tensor) -> Tensor | None:
        """The per-voxel weight the method gives ``residual`` ``(B, 1, *spatial)`` in [0, 1]; None for ``Ŝ ≡ 1``.

        Drawn in the figures' score panel. ``fixed`` is the image the residual is measured on.
        """
        return None

    # ------------------------------------------------------------------ public helpers
    def export_backbone(self) -> Backbone:
        """A standalone copy of the trained registration network, in eval mode, without any other network.

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
        checkpoint[METHOD_KEY] = self.method_name
        checkpoint[SIMILARITY_KEY] = repr(self.similarity)

    def configure_model(self) -> None:
        """Memory format and compilation, once the module is on its device."""
        networks = [self.backbone, *self.weighting_networks]
        if self.hparams.channels_last:
            for net in networks:
                net.to(memory_format=self._memory_format)
        if self.hparams.compile and not getattr(self, "_compiled", False):
            # The adapter's own methods (forward_train) call its children, so compile those.
            for net in [*self.backbone.children(), *self.weighting_networks]:
                net.compile()
            self._compiled = True

    @property
    def _memory_format(self) -> torch.memory_format:
        if not self.hparams.channels_last:
            return torch.contiguous_format
        return torch.channels_last if self.backbone.spatial_dims == 2 else torch.channels_last_3d

    def backbone_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.backbone.parameters(), lr=self.hparams.lr)

    # ------------------------------------------------------------------ training helpers
    def on_train_epoch_start(self) -> None:
        # A cycle never spans epochs; drop whatever an unfinished one left behind.
        for optimiser in self._optimisers():
            optimiser.zero_grad(set_to_none=True)

    def _optimisers(self) -> list:
        opts = self.optimizers()
        return list(opts) if isinstance(opts, (list, tuple)) else [opts]

    def _images(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
        source, target, mask = _unpack(batch)
        if source.shape[1] != self.backbone.in_channels:
            raise ValueError(
                f"The images have {source.shape[1]} channel(s), but the backbone and scorer were built for "
                f"{self.backbone.in_channels}: pass in_channels={source.shape[1]} to the method (or to the "
                "backbone's config) to match the data."
            )
        if self.hparams.channels_last:
            source, target = (t.contiguous(memory_format=self._memory_format) for t in (source, target))
        return source, target, mask

    def _register(self, batch: Mapping[str, Any], frozen: bool = False) -> list[Direction]:
        """The micro-batch's directions (source → target, and target → source when bidirectional), with their maps.

        ``frozen`` runs the backbone in eval mode without gradients (a backbone that is not trained now).
        """
        source, target, mask = self._images(batch)
        bidirectional = self.hparams.bidirectional
        if frozen:
            to_target, to_source = self._frozen_backbone(source, target, bidirectional)
        else:
            to_target, to_source = self.backbone.forward_train(source, target, bidirectional)
        labels = (batch.get("source_label"), batch.get("target_label")) if self.label_loss is not None else (None,) * 2
        return self._directions(source, target, to_target, to_source, mask, labels)

    def _directions(
        self,
        source: Tensor,
        target: Tensor,
        to_target: RegistrationOutput,
        to_source: RegistrationOutput | None,
        mask: Tensor | None = None,
        labels: tuple[Tensor | None, Tensor | None] = (None, None),
    ) -> list[Direction]:
        """``to_target`` warps the source onto the target; ``to_source`` (bidirectional) the target onto the source."""
        pairs = [(source, target, to_target, *labels)]
        if to_source is not None:
            pairs.append((target, source, to_source, labels[1], labels[0]))
        return [
            Direction(moving, fixed, out, self.similarity(self.warp(moving, out.ddf), fixed, mask), ml, fl)
            for moving, fixed, out, ml, fl in pairs
        ]

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

    def _smoothness(self, output: RegistrationOutput, mask: Tensor | None) -> Tensor:
        """``mean‖∇u‖²`` of the displacement, or of the velocity on its integration grid, inside the mask."""
        if self.hparams.smoothness_on == "displacement" or output.velocity is None:
            return gradient_energy(output.ddf, mask)
        velocity = output.velocity
        if mask is not None and mask.shape[2:] != velocity.shape[2:]:
            mask = F.interpolate(mask.float(), size=tuple(velocity.shape[2:]), mode="nearest")
        return gradient_energy(velocity, mask)

    def _label_term(self, direction: Direction) -> Tensor | None:
        """Dice loss (MONAI) between the warped one-hot moving labels and the fixed labels; None without labels."""
        if self.label_loss is None or direction.moving_label is None or direction.fixed_label is None:
            return None
        classes = int(max(direction.moving_label.max(), direction.fixed_label.max())) + 1
        moving = one_hot(direction.moving_label.long(), classes).float()
        warped = self.warp(moving, direction.output.ddf.float())  # bilinear: differentiable in the displacement
        return self.label_loss(warped, one_hot(direction.fixed_label.long(), classes).float())

    def _backbone_loss(
        self,
        directions: list[Direction],
        weights: list[Tensor | None],
        mask: Tensor | None,
        weighting: str = "mean",
        data: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The backbone's loss averaged over directions: ``(loss, data term μ, terms to log)``.

        ``loss = data term + λ·smoothness [+ the network's own loss] [+ label_weight·Dice loss]``;
        the data term weights each direction's residual by its map in ``weights`` (detached; None
        for ``Ŝ ≡ 1``) as ``weighting`` says, unless a method passes its own ``data``.
        """
        if data is None:
            data = mean_of(displacement_data_term(d.residual, w, mask, weighting) for d, w in zip(directions, weights))
        smooth = mean_of(self._smoothness(d.output, mask) for d in directions)
        loss = data + self.hparams.lam * smooth
        logs = {"train/data": data, "train/smooth_ddf": smooth}
        extras = [d.output.extra_loss for d in directions if d.output.extra_loss is not None]
        if extras:
            loss = loss + mean_of(extras)
            logs["train/backbone_extra"] = mean_of(extras)
        label_terms = [t for t in (self._label_term(d) for d in directions) if t is not None]
        if label_terms:
            loss = loss + self.hparams.label_weight * mean_of(label_terms)
            logs["train/label_dice_loss"] = mean_of(label_terms)
        logs["train/loss_de"] = loss
        return loss, data, logs

    def _cycle(self, batch_idx: int) -> Cycle:
        """Where ``batch_idx`` sits in its accumulation cycle; a cycle also ends at an epoch's last batch."""
        k = self.hparams.accumulate_grad_batches
        num_batches = self.trainer.num_training_batches
        start = batch_idx - batch_idx % k
        if num_batches == float("inf"):
            return Cycle((batch_idx + 1) % k == 0, k)
        length = min(k, int(num_batches) - start)
        return Cycle(batch_idx + 1 == start + length, length)

    def _accumulate(self, loss: Tensor, cycle: Cycle, *optimisers) -> None:
        """Backpropagate ``loss`` as 1/``cycle.length`` of the cycle's gradient; step ``optimisers`` at its end."""
        self.manual_backward(loss / cycle.length)
        if cycle.end:
            for optimiser in optimisers:
                step(optimiser)

    def _check_finite(self, batch_idx: int, terms: Mapping[str, Tensor]) -> None:
        """Raise before any state changes if a term is NaN or infinite on any rank (all ranks raise)."""
        values = torch.stack([t.detach().float() for t in terms.values()])
        bad = (~torch.isfinite(values)).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bool(bad.any()):
            names = [name for name, flag in zip(terms, bad.tolist()) if flag]
            raise NonFiniteLossError(batch_idx, self.current_epoch, self.phase.value, names)

    def _log_training(self, logs: Mapping[str, Tensor], batch_size: int) -> None:
        """The one place a training step logs: scalars (step and epoch means, synced) and the phase."""
        scalars = {k: v.detach() if isinstance(v, Tensor) else v for k, v in logs.items()}
        self.log_dict(scalars, on_step=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log("train/phase", float(self.phase.index), on_step=True, on_epoch=False, batch_size=batch_size)

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
        residual = self.similarity(self.warp(source, ddf), target, mask)
        batch_size = source.shape[0]
        per_sample = [slice(i, i + 1) for i in range(batch_size)]

        def per_pair(values: Tensor, fn=masked_mean) -> Tensor:
            return torch.stack([fn(values[i], None if mask is None else mask[i]) for i in per_sample])

        self.val_residual.update(per_pair(residual))
        self.val_smoothness.update(per_pair(ddf, gradient_energy))
        self.val_displacement.update(per_pair(ddf.norm(dim=1, keepdim=True)))
        self.val_folding.update(folding_percentage(ddf, mask))
        log = {"val/residual": self.val_residual, "val/smoothness": self.val_smoothness}
        log["val/displacement"] = self.val_displacement
        log["val/folding_pct"] = self.val_folding
        if batch.get("nocorr") is not None:
            weight = self.weight_map(target, residual)
            if weight is not None:
                for name, values in localisation(weight, batch["nocorr"], mask).items():
                    self.val_localisation[name].update(values)
                    log[f"val/{name}"] = self.val_localisation[name]

        labels = None
        if "source_label" in batch and "target_label" in batch:
            labels = self._eval_labels or _nonzero_labels(batch["target_label"])
        if labels:  # no label in these maps: no Dice (an empty map is skipped at load time anyway)
            source_label, target_label = batch["source_label"], batch["target_label"]
            # float32 whatever the precision: bf16 cannot hold label values above 256 exactly
            warped_label = self.warp_labels(source_label.float(), ddf.float()).round().long()
            dice = dice_per_label(warped_label, target_label, labels)
            self.val_dice.update(dice.nanmean(dim=1))
            self.val_dice_identity.update(dice_per_label(source_label, target_label, labels).nanmean(dim=1))
            for column, label in enumerate(labels):
                self._label_metric(label).update(dice[:, column])
            log["val/dice_identity"] = self.val_dice_identity
            log.update({f"val/dice_label{k}": metric for k, metric in self.val_dice_per_label.items()})
            self.log("val/dice", self.val_dice, prog_bar=True, on_epoch=True, batch_size=batch_size, sync_dist=True)
        self.log_dict(log, on_step=False, on_epoch=True, batch_size=batch_size, sync_dist=True)

    def _label_metric(self, label: int) -> MeanMetric:
        key = str(label)
        if key not in self.val_dice_per_label:
            self.val_dice_per_label[key] = MeanMetric(nan_strategy="ignore").to(self.device)
        return self.val_dice_per_label[key]


def _check_base_settings(lam, label_weight, warmup_epochs, lr, accumulate, smoothness_on) -> None:
    """Reject values no method can use, naming the setting and a usable value."""
    for name, value, usable in (
        ("lam", lam, 0.01),
        ("label_weight", label_weight, 0.0),
        ("warmup_epochs", warmup_epochs, 20),
    ):
        if value < 0:
            raise ConfigError(name, f"must be non-negative, got {value}.", f"The paper uses {usable}.")
    if lr is not None and lr <= 0:
        raise ConfigError("lr", f"must be positive, got {lr}.", "The paper uses 0.0001.")
    if accumulate < 1:
        raise ConfigError(
            "accumulate_grad_batches", f"must be at least 1, got {accumulate}.", "Use 1 for no accumulation."
        )
    if smoothness_on not in SMOOTHNESS_TARGETS:
        raise ConfigError(
            "smoothness_on",
            f"must be one of {SMOOTHNESS_TARGETS}, got {smoothness_on!r}.",
            "The paper's is 'displacement'.",
        )


def _unpack(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(source, target, mask or None)`` from a batch dict, with a clear error for anything else."""
    if not isinstance(batch, Mapping) or "source" not in batch or "target" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"Batches must be dicts with 'source' and 'target' (and optionally 'mask', "
            f"'source_label', 'target_label'); got {keys}."
        )
    source, target = batch["source"], batch["target"]
    if source.shape != target.shape:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    return source, target, batch.get("mask")


def step(optimiser) -> None:
    """One optimiser step, then its gradients cleared."""
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)


def split_batch(stacked: Tensor | None, parts: int) -> list[Tensor | None]:
    """A map computed for ``parts`` directions at once ``(parts·B, …)``, back as one ``(B, …)`` per direction."""
    return [None] * parts if stacked is None else list(stacked.chunk(parts, dim=0))


def mean_of(values) -> Tensor:
    """The mean of scalar tensors (the tensor itself when there is one)."""
    values = list(values)
    return values[0] if len(values) == 1 else torch.stack(values).mean()


def _nonzero_labels(label_map: Tensor) -> list[int]:
    return [int(v) for v in torch.unique(label_map).tolist() if v != 0]
