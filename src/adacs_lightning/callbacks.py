"""Callbacks and figures that show what a run does: the schedule phase, registration panels, μ_T / m_T curves."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from .losses import squared_residual
from .warping import warp_block

PANELS = ("source", "target", "warped", "error", "score", "reweighted error", "displacement")
FIGURE_TITLES = (
    "source $I_s$",
    "target $I_t$",
    "warped source",
    "displacement",
    "error $|I_t - I_s\\circ\\phi|$",
    "score $\\hat S$",
    "re-weighted error",
)


def _middle_slice(image: torch.Tensor) -> torch.Tensor:
    """``(C, *spatial)`` → ``(H, W)``: channel 0, the middle slice along the first axis in 3D."""
    image = image[0]
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def _to_unit(panel: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    scale = float(panel.max()) if scale is None else scale
    return (panel / scale).clamp(0, 1) if scale > 0 else torch.zeros_like(panel)


def score_map(module, fixed: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
    """The per-voxel weight a method gives the residual ``(B, 1, *spatial)`` in [0, 1], or None (Ŝ ≡ 1).

    The method's :meth:`~adacs_lightning.methods.RegistrationModule.weight_map`; None for a bare backbone.
    """
    weight_map = getattr(module, "weight_map", None)
    return weight_map(fixed, residual) if weight_map is not None else None


def _grid_image(shape: tuple[int, ...], spacing: int = 4, like: torch.Tensor | None = None) -> torch.Tensor:
    """``(1, 1, *shape)``: lines of 1 every ``spacing`` voxels along each in-plane axis (last two), 0 elsewhere."""
    grid = torch.zeros((1, 1, *shape), dtype=like.dtype if like is not None else torch.float32)
    grid[..., ::spacing, :] = 1.0
    grid[..., :, ::spacing] = 1.0
    return grid.to(like.device) if like is not None else grid


@torch.no_grad()
def panel_tensors(module, batch: dict, max_pairs: int = 2) -> list[dict[str, torch.Tensor]]:
    """The panels of the first ``max_pairs`` pairs, one dict per pair.

    ``module`` is a trained model (AdaCS or another method, with ``backbone``) or a bare backbone.
    Each dict holds ``(*spatial)`` tensors: ``source``, ``target``, ``warped``, ``error``
    (``|I_t − I_s∘φ|``, zero outside the field-of-view mask), ``score`` (ones without a
    scorer), ``reweighted error`` (score · error), ``displacement`` (a regular grid warped by
    the displacement, so its lines show the deformation) and ``ddf`` ``(ndim, *spatial)`` in voxels.
    """
    backbone = getattr(module, "backbone", module)
    batch = {k: v[:max_pairs] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    source, target = batch["source"], batch["target"]
    ddf = backbone(source, target)
    warp = warp_block("bilinear", "border")
    warped = warp(source, ddf)
    error = squared_residual(warped, target).sqrt()
    residual = module.similarity(warped, target, batch.get("mask")) if hasattr(module, "similarity") else error**2
    score = score_map(module, target, residual)
    score = torch.ones_like(error) if score is None else score
    if "mask" in batch:
        error = error * batch["mask"]
    grid = _grid_image(tuple(source.shape[2:]), like=source).expand(source.shape[0], -1, *source.shape[2:])
    warped_grid = warp_block("bilinear", "zeros")(grid, ddf)
    images = {
        "source": source,
        "target": target,
        "warped": warped,
        "error": error,
        "score": score,
        "reweighted error": score * error,
        "displacement": warped_grid,
    }
    return [{**{k: v[i] for k, v in images.items()}, "ddf": ddf[i]} for i in range(source.shape[0])]


@torch.no_grad()
def registration_panels(module, batch: dict, max_pairs: int = 2) -> np.ndarray:
    """A grid image, one row per pair: source, target, warped source, |error|, score map, score·|error|, warped grid.

    Error panels share one intensity scale per row so that the two compare directly;
    without a scorer the score panel is white (Ŝ ≡ 1). Returns ``(rows·H, 7·W)`` uint8.
    """
    rows = []
    for pair in panel_tensors(module, batch, max_pairs):
        err_scale = float(pair["error"].max())
        scales = {"error": err_scale, "reweighted error": err_scale}
        rows.append(torch.cat([_to_unit(_middle_slice(pair[k]), scales.get(k, 1.0)) for k in PANELS], dim=1))
    grid = torch.cat(rows, dim=0).float().cpu().numpy()
    return (grid * 255).round().astype(np.uint8)


@torch.no_grad()
def registration_figure(module, batch: dict, max_pairs: int = 2, case_ids: list[str] | None = None) -> np.ndarray:
    """The paper's Figure 4 layout as an RGB image ``(H, W, 3)`` uint8, one row per pair.

    Columns: source, target, warped source, displacement (the deformed grid ``x + u(x)``,
    every 4 voxels, over the warped source), error ``|I_t − I_s∘φ|``, score map ``Ŝ``, and
    the re-weighted error ``Ŝ·|error|`` on the error's scale. 3D images show the middle slice
    along the first axis (and the in-plane displacement components).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = panel_tensors(module, batch, max_pairs)
    fig, axes = plt.subplots(len(pairs), 7, figsize=(14, 2.2 * len(pairs)), squeeze=False)
    for row, pair in enumerate(pairs):
        err_max = max(float(pair["error"].max()), 1e-12)
        panels = [
            (_middle_slice(pair["source"]), "gray", 1.0),
            (_middle_slice(pair["target"]), "gray", 1.0),
            (_middle_slice(pair["warped"]), "gray", 1.0),
            (_middle_slice(pair["warped"]), "gray", 1.0),
            (_middle_slice(pair["error"]), "magma", err_max),
            (_middle_slice(pair["score"]), "viridis", 1.0),
            (_middle_slice(pair["reweighted error"]), "magma", err_max),
        ]
        for col, (image, cmap, vmax) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image.float().cpu().numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(FIGURE_TITLES[col], fontsize=9)
        _draw_deformed_grid(axes[row, 3], pair["ddf"])
        if case_ids is not None and row < len(case_ids):
            axes[row, 0].set_ylabel(case_ids[row], fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def _draw_deformed_grid(ax, ddf: torch.Tensor, every: int = 4) -> None:
    """Lines of ``x + u(x)`` through every ``every``-th row and column (in-plane components for 3D)."""
    if ddf.shape[0] == 3:
        ddf = ddf[1:, ddf.shape[1] // 2]
    u = ddf.float().cpu().numpy()
    h, w = u.shape[1:]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    y, x = rows + u[0], cols + u[1]
    for i in range(0, h, every):
        ax.plot(x[i, :], y[i, :], color="yellow", linewidth=0.5)
    for j in range(0, w, every):
        ax.plot(x[:, j], y[:, j], color="yellow", linewidth=0.5)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3)`` image as PNG, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def log_image(loggers, key: str, image: np.ndarray, step: int, caption: str = "") -> None:
    """Send an image to the W&B and TensorBoard loggers among ``loggers`` (others keep only the PNG)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC" if image.ndim == 3 else "HW")


class RegistrationImages(L.Callback):
    """Every ``every_n_epochs`` validations, save and log panels of the first validation pairs.

    PNGs go to ``<run folder>/figures/val_epochNNN.png``; W&B and TensorBoard loggers also
    receive the image (key ``val/registration``). With ``figure=True`` (default) the titled Figure 4
    layout (:func:`registration_figure`) also goes to ``figures/layout/val_epochNNN.png``
    (key ``val/registration_figure``). Runs on rank zero only.
    """

    def __init__(self, every_n_epochs: int = 1, max_pairs: int = 2, figure: bool = True) -> None:
        if every_n_epochs < 1 or max_pairs < 1:
            raise ValueError("every_n_epochs and max_pairs must be at least 1")
        self.every_n_epochs = every_n_epochs
        self.max_pairs = max_pairs
        self.figure = figure
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
        batch, self._batch = self._batch, None
        folder = Path(trainer.default_root_dir) / "figures"
        save_png(image, folder / f"val_epoch{trainer.current_epoch:03d}.png")
        log_image(trainer.loggers, "val/registration", image, trainer.global_step, " | ".join(PANELS))
        if self.figure:
            figure = registration_figure(pl_module, batch, self.max_pairs)
            save_png(figure, folder / "layout" / f"val_epoch{trainer.current_epoch:03d}.png")
            log_image(trainer.loggers, "val/registration_figure", figure, trainer.global_step)


class MomentumCurves(L.Callback):
    """Records ``μ_T`` and ``m_T`` at every scorer update; at fit end plots them (the paper's Figure 5).

    Saves ``<run folder>/figures/momentum.png`` and sends it to W&B / TensorBoard (key
    ``train/momentum``). Nothing is drawn for a method without the momentum weight (the baseline).
    Runs on rank zero only.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.mu: list[float] = []
        self.m: list[float] = []

    def state_dict(self) -> dict:
        """The curves so far, so that a resumed run draws them from the start."""
        return {"steps": list(self.steps), "mu": list(self.mu), "m": list(self.m)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps, self.mu, self.m = list(state_dict["steps"]), list(state_dict["mu"]), list(state_dict["m"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        momentum = getattr(pl_module, "momentum", None)
        if momentum is None or not trainer.is_global_zero:
            return
        count = int(momentum.count)
        if count == 0 or (self.steps and self.steps[-1] == count):
            return  # no scorer update yet, or none in this micro-batch
        mu = trainer.callback_metrics.get("train/mu_step", trainer.callback_metrics.get("train/mu"))
        if mu is None:
            return
        self.steps.append(count)
        self.mu.append(float(mu))
        self.m.append(float(momentum.value))

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.steps:
            return
        image = momentum_figure(self.steps, self.mu, self.m)
        save_png(image, Path(trainer.default_root_dir) / "figures" / "momentum.png")
        log_image(trainer.loggers, "train/momentum", image, trainer.global_step)


def momentum_figure(steps: list[int], mu: list[float], m: list[float]) -> np.ndarray:
    """``μ_T`` (log scale) and ``m_T`` against the scorer update ``T``, as an RGB uint8 image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mu, ax_m) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_mu.plot(steps, mu, linewidth=1.0)
    if min(mu) > 0:
        ax_mu.set_yscale("log")
    ax_mu.set(xlabel="scorer update T", ylabel=r"$\mu_T$", title="residual $\\mu_T$")
    ax_m.plot(steps, m, color="tab:orange", linewidth=1.0)
    ax_m.set(xlabel="scorer update T", ylabel="$m_T$", title="momentum weight $m_T$", ylim=(-0.02, 1.02))
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, showing the schedule phase instead of the logger's version."""

    def get_metrics(self, trainer, pl_module) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        phase = getattr(pl_module, "phase", None)
        if phase is not None and getattr(pl_module, "scorer", None) is not None:
            items["phase"] = phase.value
        return items
