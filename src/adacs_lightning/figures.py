"""Figures a reader can read: registration panels with colour bars, units, a scale bar and orientation.

The panels of registered pairs (:func:`panel_tensors`), drawn as a plain strip
(:func:`registration_panels`) or as the paper's Figure 4 layout (:func:`registration_figure`),
the μ_T / m_T curves (:func:`momentum_figure`), and PNG files of them (:func:`save_png`): the
callbacks draw them during training and the evaluation draws them per case.

Views follow the image's orientation when the data records it (``meta["direction"]``: each array
axis's unit vector in RAS): the radiological convention 3D Slicer uses, the patient's right on the
left of the screen and anterior (or superior) at the top, marked on the panel edges. Without it
(the synthetic data) the arrays are drawn as stored, axis 0 down the rows and axis 1 across the
columns (for echo: the probe at the top), and the caption says so. 3D volumes show their axial
slice through the middle (the middle of axis 0 without an orientation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .losses import squared_residual
from .warping import warp_block

Tensor = torch.Tensor

FIGURE_COLUMNS = (
    ("source", "source $I_s$", "gray", "intensity"),
    ("target", "target $I_t$", "gray", "intensity"),
    ("warped", "warped source", "gray", "intensity"),
    ("displacement", "displacement $|u|$ and grid", "viridis", "|u| (mm)"),
    ("error", "error $|I_t - I_s\\circ\\phi|$", "magma", "|error|"),
    ("score", "score $\\hat S$ over the target", "viridis", "score (0 to 1)"),
    ("reweighted error", "re-weighted error $\\hat S|e|$", "magma", "|error|"),
)
#: Opacity of the score map drawn over the target.
SCORE_ALPHA = 0.6
#: The panels of :func:`registration_panels`, left to right.
PANELS = ("source", "target", "warped", "error", "score", "reweighted error", "displacement")


def _middle_slice(image: Tensor) -> Tensor:
    """``(C, *spatial)`` → ``(H, W)``: channel 0, the middle slice along the first axis in 3D."""
    image = image[0]
    return image[image.shape[0] // 2] if image.ndim == 3 else image


def _to_unit(panel: Tensor, scale: float | None = None) -> Tensor:
    scale = float(panel.max()) if scale is None else scale
    return (panel / scale).clamp(0, 1) if scale > 0 else torch.zeros_like(panel)


def score_map(module, fixed: Tensor, residual: Tensor, warped: Tensor | None = None) -> Tensor | None:
    """The per-voxel weight a method gives the residual ``(B, 1, *spatial)`` in [0, 1], or None (Ŝ ≡ 1).

    The method's :meth:`~adacs_lightning.methods.RegistrationModule.weight_map`; None for a bare backbone.
    """
    weight_map = getattr(module, "weight_map", None)
    return weight_map(fixed, residual, warped) if weight_map is not None else None


def _grid_image(shape: tuple[int, ...], spacing: int = 4, like: Tensor | None = None) -> Tensor:
    """``(1, 1, *shape)``: lines of 1 every ``spacing`` voxels along each in-plane axis (last two), 0 elsewhere."""
    grid = torch.zeros((1, 1, *shape), dtype=like.dtype if like is not None else torch.float32)
    grid[..., ::spacing, :] = 1.0
    grid[..., :, ::spacing] = 1.0
    return grid.to(like.device) if like is not None else grid


@torch.no_grad()
def panel_tensors(module, batch: dict, max_pairs: int = 2) -> list[dict[str, Tensor]]:
    """The panels of the first ``max_pairs`` pairs, one dict per pair.

    ``module`` is a trained model (AdaCS or another method, with ``backbone``) or a bare backbone.
    Each dict holds ``(*spatial)`` tensors: ``source``, ``target``, ``warped``, ``error``
    (``|I_t − I_s∘φ|``, zero outside the field-of-view mask), ``score`` (ones without a
    scorer), ``reweighted error`` (score · error), ``displacement`` (a regular grid warped by
    the displacement, so its lines show the deformation), ``ddf`` ``(ndim, *spatial)`` in voxels
    and ``scored`` (False when the method has no scorer).
    """
    backbone = getattr(module, "backbone", module)
    batch = {k: v[:max_pairs] for k, v in batch.items() if isinstance(v, Tensor)}
    source, target = batch["source"], batch["target"]
    ddf = backbone(source, target)
    warp = warp_block("bilinear", "border")
    warped = warp(source, ddf)
    error = squared_residual(warped, target).sqrt()
    residual = module.similarity(warped, target, batch.get("mask")) if hasattr(module, "similarity") else error**2
    score = score_map(module, target, residual, warped)
    scored = score is not None
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
    return [{**{k: v[i] for k, v in images.items()}, "ddf": ddf[i], "scored": scored} for i in range(source.shape[0])]


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
def registration_figure(
    module,
    batch: dict,
    max_pairs: int = 2,
    case_ids: list[str] | None = None,
    epoch: int | None = None,
    split: str = "validation",
) -> np.ndarray:
    """The paper's Figure 4 layout (:func:`draw_registration`) of the first ``max_pairs`` pairs of ``batch``
    registered by ``module``, as an RGB image ``(H, W, 3)`` uint8.

    ``batch`` may carry ``meta`` with ``case_id``, ``spacing`` (mm) and ``direction`` (orientation).
    """
    pairs = panel_tensors(module, batch, max_pairs)
    meta = batch.get("meta") or {}
    ids = case_ids or ([str(c) for c in meta["case_id"][: len(pairs)]] if "case_id" in meta else None)
    spacings = [meta["spacing"][i] for i in range(len(pairs))] if "spacing" in meta else None
    directions = [meta["direction"][i] for i in range(len(pairs))] if "direction" in meta else None
    return rasterise(draw_registration(pairs, ids, spacings, directions, epoch, split))


@dataclass
class View:
    """How an image's array is shown: which axes, which slice, flips, and the labels of the four edges."""

    slice_axis: int | None  # 3D: the axis sliced through its middle; None for 2D
    rows: int  # array axis (of the 2D plane) drawn down the rows
    columns: int  # array axis drawn across the columns
    invert_x: bool
    invert_y: bool
    edges: tuple[str, str, str, str] | None  # left, right, top, bottom
    caption: str


def view_of(ndim: int, direction: np.ndarray | None) -> View:
    """The display of an ``ndim``-D image with array axes pointing along ``direction`` ``(3, ndim)`` (RAS)."""
    if direction is None:
        caption = "Arrays as stored (no orientation recorded): axis 0 down the rows, axis 1 across the columns" + (
            "; the middle slice of axis 0." if ndim == 3 else "; for echo data the probe is at the top."
        )
        if ndim == 3:  # the middle slice of axis 0: axes 1 and 2 drawn
            return View(0, 1, 2, False, False, None, caption)
        return View(None, 0, 1, False, False, None, caption)
    direction = np.asarray(direction, dtype=np.float64)
    slice_axis = None
    plane = list(range(ndim))
    if ndim == 3:  # the axial slice: the axis closest to superior-inferior is sliced
        slice_axis = int(np.argmax(np.abs(direction[2])))
        plane = [a for a in range(3) if a != slice_axis]
    pair = direction[:, plane]
    horizontal = int(np.argmax(np.abs(pair[0])))  # closest to right-left
    vertical = 1 - horizontal
    up_world = 1 if abs(pair[1, vertical]) >= abs(pair[2, vertical]) else 2  # anterior, else superior
    # Radiological: the patient's right (+x) on the screen's left; anterior / superior (+y / +z) at the top.
    invert_x = pair[0, horizontal] > 0
    invert_y = pair[up_world, vertical] > 0
    top, bottom = ("A", "P") if up_world == 1 else ("S", "I")
    caption = (
        "Radiological view, as 3D Slicer shows the file: the patient's right on the left (R/L/A/P/S/I at the edges)."
    )
    return View(slice_axis, plane[vertical], plane[horizontal], invert_x, invert_y, ("R", "L", top, bottom), caption)


def plane(image: Tensor, view: View) -> np.ndarray:
    """``(*spatial)`` → the 2D array drawn (rows, columns) for ``view``."""
    array = image.float().cpu().numpy()
    axes = list(range(array.ndim))
    if view.slice_axis is not None:
        array = np.take(array, array.shape[view.slice_axis] // 2, axis=view.slice_axis)
        axes.remove(view.slice_axis)
    rows, columns = axes.index(view.rows), axes.index(view.columns)
    return np.transpose(array, (rows, columns))


def _scale_bar_length(width_mm: float) -> float:
    for length in (1, 2, 5, 10, 20, 50, 100, 200):
        if length >= width_mm / 5:
            return float(length)
    return 500.0


def rasterise(fig) -> np.ndarray:
    """A matplotlib figure as an RGB image ``(H, W, 3)`` uint8; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image


def draw_registration(
    pairs: list[dict[str, Tensor]],
    case_ids: list[str] | None = None,
    spacings: list[Tensor | None] | None = None,
    directions: list[Tensor | None] | None = None,
    epoch: int | None = None,
    split: str = "validation",
):
    """The paper's Figure 4 layout as a matplotlib figure, one row per pair, with colour bars.

    ``pairs`` are :func:`panel_tensors` dicts. Columns: source, target
    and warped source (intensity), the displacement's magnitude in mm under the deformed grid
    ``x + u(x)`` (every 4 voxels), the error ``|I_t − I_s∘φ|``, the score map ``Ŝ`` (0 to 1) over the target and the
    re-weighted error on the error's scale. A scale bar in mm sits on the source; each row is titled
    with its case, the figure with the ``split`` and the epoch; the caption states the orientation.
    A pair with ``scored`` False (a method without a scorer) says so on its score panel.
    """
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    plt = _pyplot()

    count = len(pairs)
    fig, axes = plt.subplots(count, len(FIGURE_COLUMNS), figsize=(18, 2.7 * count + 0.5), squeeze=False)
    caption = ""
    for row, pair in enumerate(pairs):
        ndim = pair["ddf"].shape[0]
        spacing = _spacing(spacings, row, ndim)
        direction = None if directions is None or directions[row] is None else np.asarray(directions[row])
        view = view_of(ndim, direction)
        caption = view.caption
        magnitude = (pair["ddf"].float().cpu() * torch.as_tensor(spacing).view(-1, *[1] * ndim)).norm(dim=0)
        panels = {
            k: plane(pair[k][0], view) for k in ("source", "target", "warped", "error", "score", "reweighted error")
        }
        panels["displacement"] = plane(magnitude, view)
        err_max = max(float(panels["error"].max()), 1e-6)
        limits = {"error": (0, err_max), "reweighted error": (0, err_max), "score": (0, 1), "displacement": None}
        for col, (key, title, cmap, unit) in enumerate(FIGURE_COLUMNS):
            ax = axes[row, col]
            if key == "displacement":
                vmin, vmax = 0.0, max(float(panels[key].max()), 1e-6)
            else:
                vmin, vmax = limits.get(key) or (0.0, 1.0)
            if key == "score":  # over the target, so where Ŝ falls reads against the anatomy
                ax.imshow(panels["target"], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            alpha = SCORE_ALPHA if key == "score" else None
            image = ax.imshow(panels[key], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", alpha=alpha)
            bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
            bar.set_label(unit, fontsize=7)
            bar.ax.tick_params(labelsize=6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if key == "displacement":
                _draw_deformed_grid(ax, pair["ddf"], view)
            if key == "score" and not pair.get("scored", True):
                ax.text(0.5, 0.5, "no scorer\n(Ŝ ≡ 1)", transform=ax.transAxes, ha="center", va="center", fontsize=9)
            if view.invert_x:
                ax.invert_xaxis()
            if view.invert_y:
                ax.invert_yaxis()
            if view.edges is not None and col == 0:
                _mark_edges(ax, view.edges)
        column_mm = float(spacing[view.columns])
        length = _scale_bar_length(panels["source"].shape[1] * column_mm)
        axes[row, 0].add_artist(
            AnchoredSizeBar(axes[row, 0].transData, length / column_mm, f"{length:g} mm", "lower left", pad=0.3,
                            color="white", frameon=False, size_vertical=0.6, fontproperties={"size": 7})
        )  # fmt: skip
        name = case_ids[row] if case_ids is not None and row < len(case_ids) else f"pair {row + 1}"
        axes[row, 0].set_ylabel(name, fontsize=8)
    title = f"Registration of {split} pairs" + (f", epoch {epoch}" if epoch is not None else "")
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.005, caption, fontsize=7, ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    return fig


def _spacing(spacings, row: int, ndim: int) -> np.ndarray:
    if spacings is None or row >= len(spacings) or spacings[row] is None:
        return np.ones(ndim)
    return np.asarray(torch.as_tensor(spacings[row]).float().cpu(), dtype=np.float64)[:ndim]


def _mark_edges(ax, edges: tuple[str, str, str, str]) -> None:
    style = dict(transform=ax.transAxes, color="yellow", fontsize=7, fontweight="bold")
    left, right, top, bottom = edges
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def _draw_deformed_grid(ax, ddf: Tensor, view: View, every: int = 4) -> None:
    """Lines of ``x + u(x)`` through every ``every``-th row and column of the displayed plane."""
    u = ddf.float().cpu()
    ndim = u.shape[0]
    axes_kept = list(range(ndim))
    if view.slice_axis is not None:
        u = u.select(1 + view.slice_axis, u.shape[1 + view.slice_axis] // 2)
        axes_kept.remove(view.slice_axis)
    rows_axis, cols_axis = axes_kept.index(view.rows), axes_kept.index(view.columns)
    u_rows = np.transpose(u[view.rows].numpy(), (rows_axis, cols_axis))
    u_cols = np.transpose(u[view.columns].numpy(), (rows_axis, cols_axis))
    h, w = u_rows.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    y, x = rows + u_rows, cols + u_cols
    for i in range(0, h, every):
        ax.plot(x[i, :], y[i, :], color="white", linewidth=0.4, alpha=0.8)
    for j in range(0, w, every):
        ax.plot(x[:, j], y[:, j], color="white", linewidth=0.4, alpha=0.8)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


def momentum_figure(
    steps: list[int], mu: list[float], m: list[float], phases: list[tuple[str, int, int]] | None = None
) -> np.ndarray:
    """:func:`draw_momentum` as an RGB image ``(H, W, 3)`` uint8."""
    return rasterise(draw_momentum(steps, mu, m, phases))


def draw_momentum(steps: list[int], mu: list[float], m: list[float], phases: list[tuple[str, int, int]] | None = None):
    """``μ_T`` (log scale) and ``m_T`` against the update ``T``, phases shaded: a matplotlib figure.

    ``phases``: ``(name, first update, last update)`` of each schedule phase, shaded and named.
    """
    plt = _pyplot()
    fig, (ax_mu, ax_m) = plt.subplots(1, 2, figsize=(9.5, 3.4))
    colours = {"warm-up A": "tab:gray", "warm-up B": "tab:blue", "joint": "tab:green"}
    for ax in (ax_mu, ax_m):
        for name, first, last in phases or []:
            ax.axvspan(first - 0.5, last + 0.5, color=colours.get(name, "tab:gray"), alpha=0.12, label=name)
    ax_mu.plot(steps, mu, linewidth=1.0, color="tab:purple")
    if mu and min(mu) > 0:
        ax_mu.set_yscale("log")
    ax_mu.set(xlabel="update T", ylabel=r"$\mu_T$ (data term)", title="residual $\\mu_T$")
    ax_m.plot(steps, m, color="tab:orange", linewidth=1.0)
    limits = (-1.02, 1.02) if m and min(m) < 0 else (-0.02, 1.02)
    ax_m.set(xlabel="update T", ylabel="$m_T$", title="momentum weight $m_T$", ylim=limits)
    if phases:
        ax_m.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _pyplot():
    """matplotlib's pyplot on the file-only backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Write a matplotlib figure to ``path`` (PNG), creating the folder; the figure is closed."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 ``(H, W)`` or ``(H, W, 3)`` image as PNG, creating the folder."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
