"""Register one pair of files with a trained run and write the results on the target's grid."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.io import Volume, read_image
from ..errors import AdaCSError
from ..evaluation.cases import case_metrics
from ..evaluation.inference import (
    NetworkField,
    Registration,
    apply_displacement,
    network_displacement,
    scale_to_unit,
)
from ..evaluation.quality import quality_figures, score_on_grid, warp_image
from ..fields import world_displacement, write_displacement, write_image, write_voxel_displacement
from ..metrics import jacobian_determinant
from .grids import NetworkGrid, on_target_grid
from .model import RegistrationModel

GRID_CHOICES = ("refuse", "resample")


@dataclass
class PairSettings:
    """How every pair of a call is registered and written.

    ``grid``: ``refuse`` or ``resample`` a source on another grid than the target's; ``divisible``: zero-pad each
    axis to a multiple of it for the network; ``roi_size``: sliding-window size (voxels per axis) or None;
    ``inverse``: also write the inverse displacement; ``prefix``: of every output name; ``refine_with_labels``:
    let refinement use the label maps given.
    """

    grid: str = "refuse"
    divisible: int = 16
    roi_size: tuple[int, ...] | None = None
    inverse: bool = True
    prefix: str = ""
    refine_with_labels: bool = False


@dataclass
class PairResult:
    """The files written (name → path, ``record`` the JSON) and the record itself."""

    files: dict[str, Path]
    record: dict


@dataclass
class _Registered:
    """One registration on the target's grid, and what was computed on the network's."""

    result: Registration
    grid: NetworkGrid
    network_pair: tuple[np.ndarray, np.ndarray]  # source, target on the network's grid
    network_ddf: torch.Tensor  # the final displacement on the network's grid (voxels)


def register_pair(
    model: RegistrationModel,
    settings: PairSettings,
    source_path: Path,
    target_path: Path,
    out: Path,
    source_labels: Path | None = None,
    target_labels: Path | None = None,
    mask: Path | None = None,
) -> PairResult:
    """Register ``source_path`` onto ``target_path`` and write the outputs to ``out``.

    The pair is put on the grid the network was trained on (the run's reorientation, spacing and size:
    :class:`~adacs_lightning.registration.grids.NetworkGrid`), registered there, and the displacement composed
    back onto the target's own grid, where the warped source, the fields in ITK's convention, the maps and
    the labels are written. ``registration.json`` records the files, the model, the grids and the quality
    figures; with both label maps, also the metrics (Dice, HD95, HD, ASD per label, folding).
    """
    ndim = model.backbone.spatial_dims
    source, target = read_image(source_path, ndim), read_image(target_path, ndim)
    labels = read_image(source_labels, ndim) if source_labels is not None else None
    target_label_map = None
    if target_labels is not None and labels is not None:
        target_label_map = read_image(target_labels, ndim)
        if target_label_map.array.shape != target.array.shape:
            raise AdaCSError(
                f"{target_labels} has shape {target_label_map.array.shape}, its target image "
                f"{target_path} {target.array.shape}: give the target's label map on the target's grid."
            )
    source, labels, note = on_target_grid(source, labels, target, settings.grid, (source_path, target_path))
    start = time.perf_counter()
    fit_labels = target_label_map if settings.refine_with_labels else None
    registered = _register(model, settings, source, target, labels, fit_labels)
    seconds = time.perf_counter() - start
    result = registered.result
    out = Path(out)
    name = f"{settings.prefix}{{}}{_suffix(target_path)}"
    files = {
        "warped": write_image(result.warped, target, out / name.format("warped")),
        "displacement": write_displacement(
            world_displacement(result.ddf, target.affine), target, out / name.format("displacement")
        ),
        "displacement_voxels": write_voxel_displacement(
            result.ddf, target.affine, out / f"{settings.prefix}displacement_voxels.nii.gz"
        ),
    }
    if result.inverse_ddf is not None:
        files["inverse_displacement"] = write_displacement(
            world_displacement(result.inverse_ddf, target.affine), target, out / name.format("inverse_displacement")
        )
    if result.warped_labels is not None:
        files["warped_labels"] = write_image(result.warped_labels, target, out / name.format("warped_labels"), np.int32)
    record = {
        "source": str(source_path),
        "target": str(target_path),
        "model": str(model.checkpoint),
        "intensity_scaling": model.scale,
        "grid": note or "source and target on one grid",
        "network_grid": registered.grid.describe(),
        "seconds": seconds,
        "displacement": "LPS millimetres on the target grid; ITK DisplacementFieldTransform / ANTs warp convention",
        "displacement_voxels": "voxels along the target's array axes; source(x + u(x)) ≈ target(x)",
    }
    if result.refinement is not None:
        refiner = model.refiner
        record["refinement"] = {
            **result.refinement,
            "weights": refiner.weights,
            "lr": refiner.lr,
            "grid": refiner.grid,
            "labels_used": bool(fit_labels is not None and refiner.label_weight > 0),
        }
    record["quality"], maps = _quality(model, settings.divisible, source, target, registered)
    for key, array in maps.items():
        files[key] = write_image(array, target, out / name.format(key))
    if target_label_map is not None:
        record["metrics"] = _metrics(result.ddf, labels, target_label_map, target, mask)
        if result.network_ddf is not None:
            record["metrics_network"] = _metrics(result.network_ddf, labels, target_label_map, target, mask)
    files["record"] = out / f"{settings.prefix}registration.json"
    record["files"] = {key: path.name for key, path in files.items()}
    files["record"].write_text(json.dumps(record, indent=2))
    return PairResult(files, record)


def _register(
    model: RegistrationModel,
    settings: PairSettings,
    source: Volume,
    target: Volume,
    labels: Volume | None,
    target_labels: Volume | None,
) -> _Registered:
    """The network (and refinement) on the network's grid; the displacement and warps on the target's."""
    grid = NetworkGrid.for_target(target, model.recipe)
    moving, fixed = grid.to_network(source.array), grid.to_network(target.array)
    fit = None
    if labels is not None and target_labels is not None:
        fit = tuple(np.rint(grid.to_network(v.array, "label")) for v in (labels, target_labels))
    field = network_displacement(
        model.backbone,
        moving,
        fixed,
        scale=model.scale,
        divisible=settings.divisible,
        device=model.device,
        roi_size=None if settings.roi_size is None else _roi(settings.roi_size, moving.ndim),
        refiner=model.refiner,
        source_labels=None if fit is None else fit[0],
        target_labels=None if fit is None else fit[1],
    )
    native = NetworkField(
        grid.field_to_native(field.ddf),
        None if field.network_ddf is None else grid.field_to_native(field.network_ddf),
        field.refinement,
    )
    source_labels = None if labels is None else np.rint(labels.array).astype(np.int32)
    result = apply_displacement(source.array, native, source_labels, settings.inverse)
    return _Registered(result, grid, (moving, fixed), field.ddf)


def _quality(
    model: RegistrationModel, divisible: int, source: Volume, target: Volume, registered: _Registered
) -> tuple[dict, dict]:
    """The pair's quality figures and flag, and the maps asked for (``score``, ``residual``, ``jacobian_determinant``).

    The score map is the scorer's on the network's grid (where it was trained), sampled on the target's.
    """
    moving, fixed = (_unit(v.array, model.scale) for v in (source, target))
    ddf = torch.as_tensor(registered.result.ddf)
    warped = warp_image(moving, ddf)
    score = None
    if model.scorer is not None:
        grid, (net_moving, net_fixed) = registered.grid, registered.network_pair
        net_fixed = _unit(net_fixed, model.scale)
        net_warped = warp_image(_unit(net_moving, model.scale), registered.network_ddf)
        score = grid.to_native(score_on_grid(model.method, net_fixed, net_warped, divisible)[None])[0]
    figures = quality_figures(ddf, moving, fixed, warped, score)
    maps = {}
    if "jacobian" in model.maps:
        maps["jacobian_determinant"] = jacobian_determinant(ddf[None].float())[0].numpy()
    if "residual" in model.maps:
        maps["residual"] = (warped - fixed).pow(2).numpy()
    if "score" in model.maps and score is not None:
        maps["score"] = score.numpy()
    return figures, maps


def _unit(array: np.ndarray, scale: str | None) -> torch.Tensor:
    """``(*spatial)`` scaled to [0, 1] as the network saw it (as it is without a scaling)."""
    return scale_to_unit(array, scale)[0] if scale else torch.as_tensor(array, dtype=torch.float32)


def _metrics(ddf, labels: Volume, target_labels: Volume, target: Volume, mask_path: Path | None) -> dict[str, float]:
    source_label = torch.as_tensor(np.rint(labels.array), dtype=torch.long)[None, None]
    target_label = torch.as_tensor(np.rint(target_labels.array), dtype=torch.long)[None, None]
    values = sorted(int(v) for v in torch.unique(target_label).tolist() if v != 0)
    mask = None
    if mask_path is not None:
        mask = torch.as_tensor(read_image(mask_path, labels.array.ndim).array > 0.5, dtype=torch.float32)[None, None]
    return case_metrics(
        torch.as_tensor(ddf)[None], source_label, target_label, values, {v: f"label{v}" for v in values},
        torch.as_tensor(target.spacing, dtype=torch.float64), mask,
    )  # fmt: skip


def _roi(size: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    return tuple(size) * ndim if len(size) == 1 else tuple(size)


def _suffix(path: Path) -> str:
    """The target's file extension (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``); ``.mhd`` targets get ``.mha``."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = path.suffix.lower()
    return ".mha" if suffix == ".mhd" else suffix if suffix in (".nii", ".mha", ".nrrd") else ".nii.gz"
