"""Callbacks that show what a run does: a progress bar with the schedule phase, registration panels."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from .losses import squared_residual

PANELS = ("source", "target", "warped", "error", "score", "reweighted error")


def _middle_slice(image: torch.Tensor) -> torch.Tensor:
    """``(C, *spatial)`` → ``(H, W)``: channel 0, the middle slice along the first axis in 3D."""
    image = image[0]
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def _to_unit(panel: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    scale = float(panel.max()) if scale is None else scale
    return (panel / scale).clamp(0, 1) if scale > 0 else torch.zeros_like(panel)


@torch.no_grad()
def registration_panels(module, batch: dict, max_pairs: int = 2) -> np.ndarray:
    """A grid image, one row per pair: source, target, warped source, |error|, score map, score·|error|.

    Error panels share one intensity scale per row so that the last two compare directly;
    without a scorer the score panel is white (Ŝ ≡ 1). Returns ``(rows·H, 6·W)`` uint8.
    """
    source, target = batch["source"][:max_pairs], batch["target"][:max_pairs]
    ddf = module.backbone(source, target)
    warped = module.warp(source, ddf)
    error = squared_residual(warped, target).sqrt()
    score = module.scorer(target) if module.scorer is not None else torch.ones_like(error)
    if "mask" in batch:
        error = error * batch["mask"][:max_pairs]
    rows = []
    for i in range(source.shape[0]):
        err_scale = float(error[i].max())
        panels = [
            _to_unit(_middle_slice(source[i]), 1.0),
            _to_unit(_middle_slice(target[i]), 1.0),
            _to_unit(_middle_slice(warped[i]), 1.0),
            _to_unit(_middle_slice(error[i]), err_scale),
            _to_unit(_middle_slice(score[i]), 1.0),
            _to_unit(_middle_slice(score[i] * error[i]), err_scale),
        ]
        rows.append(torch.cat(panels, dim=1))
    grid = torch.cat(rows, dim=0).float().cpu().numpy()
    return (grid * 255).round().astype(np.uint8)


class RegistrationImages(L.Callback):
    """Every ``every_n_epochs`` validations, save and log panels of the first validation pairs.

    PNGs go to ``<run folder>/figures/val_epochNNN.png``; W&B and TensorBoard loggers also
    receive the image (key ``val/registration``). Runs on rank zero only.
    """

    def __init__(self, every_n_epochs: int = 1, max_pairs: int = 2) -> None:
        if every_n_epochs < 1 or max_pairs < 1:
            raise ValueError("every_n_epochs and max_pairs must be at least 1")
        self.every_n_epochs = every_n_epochs
        self.max_pairs = max_pairs
        self._batch: dict | None = None

    def _due(self, trainer: L.Trainer) -> bool:
        return (
            trainer.is_global_zero
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0 and self._due(trainer):
            self._batch = {k: v[: self.max_pairs] for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._batch is None or not self._due(trainer):
            return
        image = registration_panels(pl_module, self._batch, self.max_pairs)
        self._batch = None
        folder = Path(trainer.default_root_dir) / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"val_epoch{trainer.current_epoch:03d}.png")
        caption = " | ".join(PANELS)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="val/registration", images=[image], caption=[caption])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/registration", image, trainer.global_step, dataformats="HW")


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, showing the schedule phase instead of the logger's version."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        phase = getattr(pl_module, "phase", None)
        if phase is not None and getattr(pl_module, "scorer", None) is not None:
            items["phase"] = phase.value
        return items
