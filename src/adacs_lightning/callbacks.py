"""Callbacks that show what a run does: the schedule phase, registration panels, μ_T / m_T curves, its health."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from .figures import PANELS, momentum_figure, registration_figure, registration_panels, save_png


def log_image(loggers, key: str, image: np.ndarray, step: int, caption: str = "") -> None:
    """Send an image to the W&B and TensorBoard loggers among ``loggers`` (others keep only the PNG)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC" if image.ndim == 3 else "HW")


def labelled_strip(strip: np.ndarray, labels: tuple[str, ...], height: int = 14) -> np.ndarray:
    """``strip`` ``(H, n·W)`` uint8 with a header naming each of its ``n`` columns of panels."""
    from PIL import Image, ImageDraw

    width = strip.shape[1] // len(labels)
    header = Image.new("L", (strip.shape[1], height), color=0)
    draw = ImageDraw.Draw(header)
    for index, label in enumerate(labels):
        draw.text((index * width + 2, 1), label[: max(width // 6, 3)], fill=255)
    return np.concatenate([np.asarray(header, dtype=np.uint8), strip], axis=0)


class RegistrationImages(L.Callback):
    """Every ``every_n_epochs`` validations, and after the last epoch, save and log panels of validation pairs.

    ``<run folder>/figures/val_epochNNN.png``: the panels as a labelled strip (key ``val/registration``
    for W&B and TensorBoard); ``figures/layout/val_epochNNN.png``: the titled Figure 4 layout with
    colour bars, a scale bar and the orientation (:func:`registration_figure`, key
    ``val/registration_figure``; ``figure=False`` leaves it out). Runs on rank zero only.
    """

    def __init__(self, every_n_epochs: int = 1, max_pairs: int = 2, figure: bool = True) -> None:
        if every_n_epochs < 1 or max_pairs < 1:
            raise ValueError("every_n_epochs and max_pairs must be at least 1")
        self.every_n_epochs = every_n_epochs
        self.max_pairs = max_pairs
        self.figure = figure
        self._batch: dict | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        epoch = trainer.current_epoch
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch == trainer.max_epochs - 1
        return (
            trainer.is_global_zero and not trainer.sanity_checking and ((epoch + 1) % self.every_n_epochs == 0 or last)
        )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self._due(trainer):
            self._batch = {k: v[: self.max_pairs] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            meta = batch.get("meta") or {}
            self._batch["meta"] = {k: v[: self.max_pairs] for k, v in meta.items()}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._batch is None or not self._due(trainer):
            return
        image = labelled_strip(registration_panels(pl_module, self._batch, self.max_pairs), PANELS)
        batch, self._batch = self._batch, None
        folder = Path(trainer.default_root_dir) / "figures"
        epoch = trainer.current_epoch
        save_png(image, folder / f"val_epoch{epoch:03d}.png")
        log_image(trainer.loggers, "val/registration", image, trainer.global_step, " | ".join(PANELS))
        if self.figure:
            figure = registration_figure(pl_module, batch, self.max_pairs, epoch=epoch)
            save_png(figure, folder / "layout" / f"val_epoch{epoch:03d}.png")
            log_image(trainer.loggers, "val/registration_figure", figure, trainer.global_step)


class MomentumCurves(L.Callback):
    """Records ``μ_T`` and ``m_T`` at every update of ``m_T``; at fit end plots them (the paper's Figure 5).

    Saves ``<run folder>/figures/momentum.png`` (the schedule's phases shaded) and sends it to W&B /
    TensorBoard (key ``train/momentum``). Nothing is drawn for a method without the momentum weight
    (the baseline). Runs on rank zero only.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.mu: list[float] = []
        self.m: list[float] = []
        self.phases: list[str] = []

    def state_dict(self) -> dict:
        """The curves so far, so that a resumed run draws them from the start."""
        return {"steps": list(self.steps), "mu": list(self.mu), "m": list(self.m), "phases": list(self.phases)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps, self.mu, self.m = list(state_dict["steps"]), list(state_dict["mu"]), list(state_dict["m"])
        self.phases = list(state_dict.get("phases", []))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        momentum = getattr(pl_module, "momentum", None)
        if momentum is None or not trainer.is_global_zero:
            return
        count = int(momentum.count)
        if count == 0 or (self.steps and self.steps[-1] == count):
            return  # no update yet, or none in this micro-batch
        mu = trainer.callback_metrics.get("train/mu_step", trainer.callback_metrics.get("train/mu"))
        if mu is None:
            return
        self.steps.append(count)
        self.mu.append(float(mu))
        self.m.append(float(momentum.value))
        self.phases.append(PHASE_NAMES.get(getattr(pl_module.phase, "value", ""), ""))

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.steps:
            return
        image = momentum_figure(self.steps, self.mu, self.m, phase_spans(self.steps, self.phases))
        save_png(image, Path(trainer.default_root_dir) / "figures" / "momentum.png")
        log_image(trainer.loggers, "train/momentum", image, trainer.global_step)


PHASE_NAMES = {"warmup_backbone": "warm-up A", "warmup_scorer": "warm-up B", "joint": "joint"}


def phase_spans(steps: list[int], phases: list[str]) -> list[tuple[str, int, int]]:
    """``(phase, first step, last step)`` of each run of equal phases (steps recorded without one are left out)."""
    spans: list[tuple[str, int, int]] = []
    for step, phase in zip(steps, phases):
        if not phase:
            continue
        if spans and spans[-1][0] == phase:
            spans[-1] = (phase, spans[-1][1], step)
        else:
            spans.append((phase, step, step))
    return spans


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with the schedule phase and the whole run's remaining time.

    The postfix shows ``phase`` (AdaCS) and ``run ETA``: the epochs left times the mean duration
    of the epochs so far (validation included), next to Lightning's own ETA of the epoch.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._fit_start: float | None = None
        self._epochs_done = 0

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_start, self._epochs_done = time.monotonic(), 0

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._epochs_done += 1
        super().on_train_epoch_end(trainer, pl_module)

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        phase = getattr(pl_module, "phase", None)
        if phase is not None and getattr(pl_module, "scorer", None) is not None:
            items["phase"] = phase.value
        eta = self.run_eta(trainer)
        if eta is not None:
            items["run ETA"] = eta
        return items

    def run_eta(self, trainer) -> str | None:
        """``h:mm:ss`` left in the whole run, from the mean epoch so far; None before the first epoch ends."""
        if self._fit_start is None or self._epochs_done == 0 or not trainer.max_epochs or trainer.max_epochs < 0:
            return None
        per_epoch = (time.monotonic() - self._fit_start) / self._epochs_done
        left = max(trainer.max_epochs - trainer.current_epoch - 1, 0) * per_epoch
        return time.strftime("%H:%M:%S", time.gmtime(left))


class RunHealth(L.Callback):
    """At the end of a run, warn when the registration did nothing useful.

    * the best validation Dice is within ``dice_margin`` of the Dice before registration, or
    * the displacement stayed near zero (mean ``|u|`` below ``min_displacement`` voxels).

    Both usually mean a learning rate too low for the schedule, too few epochs, or images the
    network cannot read (intensities not in [0, 1]).
    """

    def __init__(self, dice_margin: float = 0.01, min_displacement: float = 0.05) -> None:
        self.dice_margin, self.min_displacement = dice_margin, min_displacement
        self.best_dice: float | None = None
        self.identity: float | None = None
        self.displacement: float | None = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        if "val/dice" in metrics:
            value = float(metrics["val/dice"])
            self.best_dice = value if self.best_dice is None else max(self.best_dice, value)
            self.identity = float(metrics.get("val/dice_identity", float("nan")))
        if "val/displacement" in metrics:
            self.displacement = float(metrics["val/displacement"])

    def on_fit_end(self, trainer, pl_module) -> None:
        for message in self.problems():
            rank_zero_warn(message)

    def problems(self) -> list[str]:
        found = []
        if (
            self.best_dice is not None
            and self.identity is not None
            and self.best_dice - self.identity < self.dice_margin
        ):
            found.append(
                f"The best validation Dice ({self.best_dice:.4f}) is within {self.dice_margin} of the Dice before "
                f"registration ({self.identity:.4f}): the network has not learnt to register. Train longer, raise "
                "method.lr, or check that the images are scaled to [0, 1]."
            )
        if self.displacement is not None and self.displacement < self.min_displacement:
            found.append(
                f"The displacement stayed near zero (mean |u| = {self.displacement:.3f} voxels at the last validation): "
                "the network has not moved from the identity. Train longer or raise method.lr."
            )
        return found
