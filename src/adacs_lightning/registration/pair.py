"""Register one pair of files with a trained run and write the results on the target's grid."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..choices import REFINE_BATCH
from ..data.io import Volume, read_image
from ..errors import AdaCSError
from ..evaluation.cases import case_metrics
from ..evaluation.inference import (
    NetworkField,
    PaddedField,
    Registration,
    apply_displacement,
    padded_network_field,
    refine_fields,
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
    let refinement use the label maps given; ``refine_batch``: how many pairs of a folder are refined at once.
    """

    grid: str = "refuse"
    divisible: int = 16
    roi_size: tuple[int, ...] | None = None
    inverse: bool = True
    prefix: str = ""
    refine_with_labels: bool = False
    refine_batch: int = REFINE_BATCH


@dataclass
class PairResult:
    """The files written (name → path, ``record`` the JSON) and the record itself."""

    files: dict[str, Path]
    record: dict


@dataclass
class StagedPair:
    """A pair read, put on the network's grid and run through the network; its refinement and outputs pending.

    ``volumes``: source, target, source labels and target labels (the last two None when not given), the
    source (and its labels) already on the target's grid; ``note``: what was done about the grids;
    ``network_pair``: source and target on the network's grid; ``padded``: the network's field there;
    ``seconds``: the network's time.
    """

    paths: tuple[Path, Path]
    volumes: tuple[Volume, Volume, Volume | None, Volume | None]
    note: str | None
    grid: NetworkGrid
    network_pair: tuple[np.ndarray, np.ndarray]
    padded: PaddedField
    fit_labels: bool
    seconds: float


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
    :func:`stage_pair`, the refinement (with a refiner) and :func:`finish_pair`; a folder batches the middle step.
    """
    staged = stage_pair(model, settings, source_path, target_path, source_labels, target_labels)
    return finish_pair(model, settings, staged, refine_staged(model, [staged])[0], out, mask)


def stage_pair(
    model: RegistrationModel,
    settings: PairSettings,
    source_path: Path,
    target_path: Path,
    source_labels: Path | None = None,
    target_labels: Path | None = None,
) -> StagedPair:
    """Read the pair (and labels), put it on the network's grid, and run the network there."""
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
    grid = NetworkGrid.for_target(target, model.recipe)
    moving, fixed = grid.to_network(source.array), grid.target
    fit_labels = model.refiner is not None and settings.refine_with_labels and target_label_map is not None
    fit = [np.rint(grid.to_network(v.array, "label")) for v in (labels, target_label_map)] if fit_labels else [None] * 2
    roi = None if settings.roi_size is None else _roi(settings.roi_size, moving.ndim)
    padded = padded_network_field(
        model.backbone, moving, fixed, model.scale, settings.divisible, model.device, roi, *fit
    )
    if padded.ddf.is_cuda:  # the network's time ends when its work on the GPU does
        torch.cuda.synchronize(padded.ddf.device)
    volumes = (source, target, labels, target_label_map)
    return StagedPair((source_path, target_path), volumes, note, grid, (moving, fixed), padded, fit_labels,
                      time.perf_counter() - start)  # fmt: skip


def refine_staged(model: RegistrationModel, staged: list[StagedPair]) -> list[NetworkField]:
    """The final field on the network's grid of each staged pair: refined together (pairs of one shape in one
    batch) with the run's refiner, else the network's."""
    return refine_fields(model.refiner, [pair.padded for pair in staged])


def finish_pair(
    model: RegistrationModel, settings: PairSettings, staged: StagedPair, field: NetworkField, out: Path, mask=None
) -> PairResult:
    """Compose ``field`` onto the target's grid, warp, and write the outputs, maps and ``registration.json``."""
    (source_path, target_path), (source, target, labels, target_label_map) = staged.paths, staged.volumes
    start = time.perf_counter()
    native = NetworkField(
        staged.grid.field_to_native(field.ddf),
        None if field.network_ddf is None else staged.grid.field_to_native(field.network_ddf),
        field.refinement,
    )
    source_labels = None if labels is None else np.rint(labels.array).astype(np.int32)
    result = apply_displacement(source.array, native, source_labels, settings.inverse)
    seconds = staged.seconds + (time.perf_counter() - start) + (field.refinement or {}).get("seconds", 0.0)
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
        "grid": staged.note or "source and target on one grid",
        "network_grid": staged.grid.describe(),
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
            "labels_used": bool(staged.fit_labels and refiner.label_weight > 0),
        }
    record["quality"], maps = _quality(model, settings.divisible, staged, result, field.ddf)
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


def _quality(
    model: RegistrationModel, divisible: int, staged: StagedPair, result: Registration, network_ddf: torch.Tensor
) -> tuple[dict, dict]:
    """The pair's quality figures and flag, and the maps asked for (``score``, ``residual``, ``jacobian_determinant``).

    The score map is the scorer's on the network's grid (where it was trained), sampled on the target's.
    """
    moving, fixed = (_unit(v.array, model.scale) for v in staged.volumes[:2])
    ddf = torch.as_tensor(result.ddf)
    warped = warp_image(moving, ddf)
    score = None
    if model.scorer is not None:
        grid, (net_moving, net_fixed) = staged.grid, staged.network_pair
        net_fixed = _unit(net_fixed, model.scale)
        net_warped = warp_image(_unit(net_moving, model.scale), network_ddf)
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
