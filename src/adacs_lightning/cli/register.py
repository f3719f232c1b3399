"""``adacs-register``: register new scans with a trained network, one pair or a whole folder in one process.

Examples::

    adacs-register --model outputs/<run> --source es.nii.gz --target ed.nii.gz --out registered/
    adacs-register --model outputs/<run>/backbone.pt --source a.mha --target b.mha --source-labels a_seg.nrrd
    adacs-register --model outputs/<run> --csv pairs.csv --out registered/      # every row, one process

Outputs are on the target's grid and in the target's file format; the displacement is in ITK's
displacement-field convention (docs/interop.md). PyTorch is imported only once the
arguments are valid, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..choices import INTENSITY_MODES, REFINE_WEIGHTS
from ..configs import RUN_CONFIG, run_folder, run_setting
from ..errors import AdaCSError, check_writable
from .common import HelpFormatter, console_main, finite_float

GRID_CHOICES = ("refuse", "resample")
#: Metrics of the network alone that metrics.csv keeps beside the refined ones (network_<name>).
NETWORK_COLUMNS = ("dice", "hd95", "asd", "folding_pct")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adacs-register",
        description=(
            "Register SOURCE onto TARGET (or every row of a CSV) with the registration network of a trained run "
            "(the run's scorer, when the run folder has one, adds the score map and weights --refine). Reads NIfTI, "
            "MHA/MHD and NRRD. Writes, on the target's grid and in its format: the warped source (its original "
            "intensities), the displacement in ITK's convention (physical mm, LPS components, a displacement field "
            "on the target grid; tested with SimpleITK), its inverse, the product's own voxel-unit field "
            "(displacement_voxels.nii.gz), the maps of --maps, with labels the warped source labels, and "
            "registration.json with quality figures and a flag (quality.csv for a folder)."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="run folder, .ckpt checkpoint or backbone.pt")
    inputs = parser.add_argument_group("one pair")
    inputs.add_argument("--source", type=Path, default=None, help="moving image")
    inputs.add_argument("--target", type=Path, default=None, help="fixed image")
    inputs.add_argument("--source-labels", type=Path, default=None, help="label map of the source, to warp")
    inputs.add_argument(
        "--target-labels", type=Path, default=None, help="label map of the target: Dice etc. in metrics"
    )
    folder = parser.add_argument_group("a folder of pairs")
    folder.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="a CSV as data=folder reads it (source,target[,source_label,target_label,mask,case,…]); one sub-folder "
        "of --out per row and metrics.csv when rows have labels",
    )
    parser.add_argument("--out", "-o", type=Path, default=Path("registered"), help="output folder")
    parser.add_argument("--prefix", default="", help="prefix of the output file names")
    parser.add_argument(
        "--grid",
        choices=GRID_CHOICES,
        default="refuse",
        help="when source and target lie on different grids (shape, spacing, origin or direction): refuse with a "
        "message, or resample the source onto the target grid first (MONAI ResampleToMatch; labels nearest)",
    )
    parser.add_argument(
        "--divisible", type=int, default=16, help="zero-pad each axis to a multiple of this for the network (1: off)"
    )
    parser.add_argument(
        "--roi-size",
        type=int,
        nargs="+",
        default=None,
        help="run the network on overlapping windows of this size (voxels per axis, or one for all) and blend "
        "them (MONAI sliding-window inference), for images larger than the network takes at once",
    )
    parser.add_argument(
        "--intensity",
        choices=INTENSITY_MODES,
        default=None,
        help="scaling to [0, 1]: minmax or percentile (1st-99th, clipped); default: the run's data.intensity "
        "when --model is (or lies in) a run folder, else minmax",
    )
    parser.add_argument("--no-scale", action="store_true", help="feed intensities as they are (no scaling)")
    parser.add_argument("--no-inverse", action="store_true", help="do not compute the inverse displacement")
    parser.add_argument(
        "--maps",
        default="auto",
        help="maps to write on the target's grid, comma-separated from score (Ŝ of the run's scorer), residual "
        "(after registration) and jacobian (det J of the field); 'none' for none. auto: jacobian, and score "
        "for a run with a scorer",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    refine = parser.add_argument_group("refinement (per-pair optimisation after the network; needs the run folder)")
    refine.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="N",
        help="Adam steps on each pair's displacement (0: the network alone)",
    )
    refine.add_argument("--refine-lr", type=finite_float, default=0.1, help="Adam's learning rate, voxels per step")
    refine.add_argument(
        "--refine-weights",
        choices=REFINE_WEIGHTS,
        default=None,
        help="weight the data term by the run's score map Ŝ(target) (score) or not (none); default: score for "
        "AdaCS runs, none otherwise",
    )
    refine.add_argument(
        "--refine-grid", type=int, default=4, help="control-point spacing of the correction, voxels (1: every voxel)"
    )
    refine.add_argument(
        "--refine-with-labels",
        action="store_true",
        help="let a run trained with a label term use --source-labels/--target-labels while refining (the metrics "
        "then measure labels the field was fitted to; registration.json says so)",
    )
    return parser


@dataclass
class Options:
    """What every pair of a call shares."""

    backbone: Any
    checkpoint: Path
    scale: str | None
    device: Any
    args: argparse.Namespace
    refiner: Any = None
    method: Any = None  # the run's method, for its score map (a run folder with a scorer)
    maps: tuple[str, ...] = ()


def run(argv: list[str] | None = None) -> dict[str, Path]:
    """Parse ``argv``, register, write the outputs; returns their paths (folder mode: the reports)."""
    args = build_parser().parse_args(argv)
    _check_arguments(args)
    check_writable(args.out, "The output folder (--out)", "Give --out a folder you can write to.")
    from ..checkpoint import load_backbone
    from ..evaluation.report import resolve_device
    from ..evaluation.runs import best_checkpoint

    checkpoint = best_checkpoint(args.model) if args.model.is_dir() else args.model
    backbone = load_backbone(checkpoint, map_location="cpu")
    scale = None if args.no_scale else args.intensity or training_intensity(args.model) or "minmax"
    device = resolve_device(args.device)
    method = None
    if args.refine > 0 or "score" in args.maps:
        method = load_run_method(args.model, checkpoint, device)
    elif args.maps == "auto":  # the score map where the run folder rebuilds a method with a scorer
        try:
            method = load_run_method(args.model, checkpoint, device)
        except AdaCSError as error:
            print(f"adacs-register: no score map ({error})", file=sys.stderr)
    maps = _chosen_maps(args.maps, method)
    refiner = build_refiner(args.model, method, args, device) if args.refine > 0 else None
    options = Options(backbone, checkpoint, scale, device, args, refiner, method, maps)
    if args.csv is not None:
        return register_folder(options)
    files, note = register_pair(options, args.source, args.target, args.source_labels, args.target_labels, args.out)
    scaling = "unscaled" if scale is None else f"{scale} intensity scaling"
    print(f"Registered {args.source} onto {args.target} with {checkpoint} ({scaling}{note}):")
    for name, path in files.items():
        print(f"  {name}: {path}")
    return files


def _check_arguments(args: argparse.Namespace) -> None:
    if args.divisible < 1:
        raise AdaCSError("--divisible must be at least 1.")
    if args.no_scale and args.intensity:
        raise AdaCSError("--no-scale and --intensity disagree: give one.")
    pair = args.source is not None or args.target is not None
    if args.csv is not None and pair:
        raise AdaCSError("Give either --csv (a folder of pairs) or --source and --target (one pair), not both.")
    if args.csv is None and (args.source is None or args.target is None):
        raise AdaCSError("Give --source and --target (one pair), or --csv with a list of pairs.")
    if args.roi_size is not None and min(args.roi_size) < 1:
        raise AdaCSError("--roi-size must be positive.")
    if args.refine < 0 or args.refine_lr <= 0 or args.refine_grid < 1:
        raise AdaCSError("--refine must be ≥ 0, --refine-lr > 0 and --refine-grid ≥ 1.")
    if args.target_labels is not None and args.source_labels is None:
        raise AdaCSError(
            "--target-labels needs --source-labels: the metrics compare the warped source labels with the target's."
        )


def load_run_method(model: Path, checkpoint: Path, device):
    """The run's trained method (backbone, scorer, objective) from its run folder, in eval mode; None without one."""
    from omegaconf import OmegaConf

    from ..checkpoint import load_method
    from ..evaluation.runs import best_checkpoint

    folder = run_folder(model)
    if folder is None:
        return None
    ckpt = checkpoint if str(checkpoint).endswith(".ckpt") else best_checkpoint(folder)
    return load_method(ckpt, OmegaConf.load(folder / RUN_CONFIG)).to(device).eval()


def _chosen_maps(text: str, method) -> tuple[str, ...]:
    from ..evaluation.quality import MAP_NAMES

    has_scorer = getattr(method, "scorer", None) is not None
    if text == "auto":
        return ("jacobian", "score") if has_scorer else ("jacobian",)
    chosen = () if text == "none" else tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in chosen if m not in MAP_NAMES]
    if unknown:
        raise AdaCSError(f"--maps: unknown map {unknown[0]!r}; choose from {', '.join(MAP_NAMES)}, auto or none.")
    if "score" in chosen and not has_scorer:
        raise AdaCSError(
            "--maps score needs a run folder whose method has a scorer (AdaCS); this model has none: "
            "drop score from --maps, or give --model the AdaCS run's folder."
        )
    return chosen


def build_refiner(model: Path, method, args: argparse.Namespace, device):
    """The run's objective for refinement (:class:`~adacs_lightning.refine.Refiner`), from its run folder."""
    from ..refine import Refiner

    folder = run_folder(model)
    if folder is None or method is None:
        raise AdaCSError(
            f"--refine needs the run folder of {model} (its .hydra/config.yaml names the similarity, λ and scorer "
            "the refinement optimises with): give --model the run folder or a checkpoint inside it."
        )
    has_scorer = getattr(method, "scorer", None) is not None
    weights = args.refine_weights or ("score" if has_scorer else "none")
    if weights == "score" and not has_scorer:
        raise AdaCSError(f"--refine-weights score: {folder} trained {method.method_name}, which has no score map.")
    refiner = Refiner.from_module(method, weights, steps=args.refine, lr=args.refine_lr, grid=args.refine_grid)
    if refiner.scorer is not None:
        refiner.scorer.to(device)
    refiner.weights = weights
    return refiner


def register_pair(
    options: Options,
    source_path: Path,
    target_path: Path,
    source_labels: Path | None = None,
    target_labels: Path | None = None,
    out: Path | None = None,
    mask: Path | None = None,
) -> tuple[dict[str, Path], str]:
    """Register one pair and write its outputs to ``out``; returns the files and a note on resampling.

    ``registration.json`` records the files, the model and the grids; with both label maps, also the
    metrics (Dice, HD95, HD, ASD per label, folding).
    """
    import numpy as np

    from ..data.io import read_image
    from ..evaluation.inference import register_arrays
    from ..fields import world_displacement, write_displacement, write_image, write_voxel_displacement

    args, ndim = options.args, options.backbone.spatial_dims
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
    source, labels, note = _on_target_grid(source, labels, target, args.grid, source_path, target_path)
    start = time.perf_counter()
    result = register_arrays(
        options.backbone,
        source.array,
        target.array,
        None if labels is None else np.rint(labels.array).astype(np.int32),
        scale=options.scale,
        divisible=args.divisible,
        device=options.device,
        roi_size=None if args.roi_size is None else _roi(args.roi_size, ndim),
        inverse=not args.no_inverse,
        refiner=options.refiner,
        target_labels=None if target_label_map is None or not args.refine_with_labels else target_label_map.array,
    )
    seconds = time.perf_counter() - start
    out = Path(out if out is not None else args.out)
    suffix = _suffix(target_path)
    name = f"{args.prefix}{{}}{suffix}"
    files = {
        "warped": write_image(result.warped, target, out / name.format("warped")),
        "displacement": write_displacement(
            world_displacement(result.ddf, target.affine), target, out / name.format("displacement")
        ),
        "displacement_voxels": write_voxel_displacement(
            result.ddf, target.affine, out / f"{args.prefix}displacement_voxels.nii.gz"
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
        "model": str(options.checkpoint),
        "intensity_scaling": options.scale,
        "grid": note.strip(", ") or "source and target on one grid",
        "seconds": seconds,
        "displacement": "LPS millimetres on the target grid; ITK DisplacementFieldTransform / ANTs warp convention",
        "displacement_voxels": "voxels along the target's array axes; source(x + u(x)) ≈ target(x)",
    }
    if result.refinement is not None:
        refiner = options.refiner
        record["refinement"] = {
            **result.refinement,
            "weights": refiner.weights,
            "lr": refiner.lr,
            "grid": refiner.grid,
            "labels_used": bool(args.refine_with_labels and target_label_map is not None and refiner.label_weight > 0),
        }
    record["quality"], maps = _quality(options, source, target, result)
    for key, array in maps.items():
        files[key] = write_image(array, target, out / name.format(key))
    if target_label_map is not None:
        record["metrics"] = _metrics(result.ddf, labels, target_label_map, target, mask)
        if result.network_ddf is not None:
            record["metrics_network"] = _metrics(result.network_ddf, labels, target_label_map, target, mask)
    files["record"] = out / f"{args.prefix}registration.json"
    record["files"] = {key: path.name for key, path in files.items()}
    files["record"].write_text(json.dumps(record, indent=2))
    return files, note


def _quality(options: Options, source, target, result) -> tuple[dict, dict]:
    """The pair's quality figures and flag, and the maps asked for (``score``, ``residual``, ``jacobian_determinant``)."""
    import torch

    from ..evaluation.inference import scale_to_unit
    from ..evaluation.quality import quality_figures, score_on_grid, warp_image
    from ..metrics import jacobian_determinant

    moving, fixed = (
        scale_to_unit(v.array, options.scale)[0] if options.scale else torch.as_tensor(v.array, dtype=torch.float32)
        for v in (source, target)
    )
    ddf = torch.as_tensor(result.ddf)
    warped = warp_image(moving, ddf)
    score = None
    if getattr(options.method, "scorer", None) is not None:
        score = score_on_grid(options.method, fixed, warped, options.args.divisible)
    figures = quality_figures(ddf, moving, fixed, warped, score)
    maps = {}
    if "jacobian" in options.maps:
        maps["jacobian_determinant"] = jacobian_determinant(ddf[None].float())[0].numpy()
    if "residual" in options.maps:
        maps["residual"] = (warped - fixed).pow(2).numpy()
    if "score" in options.maps and score is not None:
        maps["score"] = score.numpy()
    return figures, maps


def _on_target_grid(source, labels, target, grid: str, source_path: Path, target_path: Path):
    """The source (and its labels) on the target's grid: as they are, resampled, or refused."""
    from ..fields import describe_grid, same_grid

    if same_grid(source, target):
        return source, labels, ""
    if grid == "refuse":
        raise AdaCSError(
            f"{source_path} and {target_path} lie on different grids: the source has {describe_grid(source)}, "
            f"the target {describe_grid(target)}. Resample the source onto the target grid with --grid resample "
            "(MONAI ResampleToMatch), or give images on one grid."
        )
    resampled = _resample(source, target, "bilinear")
    resampled_labels = None if labels is None else _resample(labels, target, "nearest")
    return resampled, resampled_labels, ", the source resampled onto the target grid (MONAI ResampleToMatch)"


def _resample(moving, target, mode: str):
    """``moving`` resampled onto ``target``'s grid by world coordinates (MONAI ``ResampleToMatch``)."""
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    from ..data.io import Volume

    ndim = target.array.ndim
    as_meta = [
        MetaTensor(
            torch.as_tensor(v.array, dtype=torch.float32)[None], affine=torch.as_tensor(_affine_nd(v.affine, ndim))
        )
        for v in (moving, target)
    ]
    resampled = ResampleToMatch(mode=mode, padding_mode="zeros")(as_meta[0], as_meta[1])
    return Volume(np.asarray(resampled[0], dtype=np.float32), target.affine)


def _affine_nd(affine, ndim: int):
    """The ``(ndim+1)²`` affine of an ``ndim``-D image from a 4×4 one (2D: the in-plane part)."""
    import numpy as np

    if ndim == 3:
        return affine
    out = np.eye(ndim + 1)
    out[:ndim, :ndim], out[:ndim, ndim] = affine[:ndim, :ndim], affine[:ndim, 3]
    return out


def _metrics(ddf, labels, target_labels, target, mask_path: Path | None) -> dict[str, float]:
    import numpy as np
    import torch

    from ..data.io import read_image
    from ..evaluation.cases import case_metrics

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


def register_folder(options: Options) -> dict[str, Path]:
    """Every row of ``--csv`` in this process, with a progress bar; a bad row is reported and skipped.

    Writes ``<out>/<case>/…`` per row, ``metrics.csv`` (one row per labelled pair) and
    ``failed.csv`` (the rows that could not be registered, and why).
    """
    from tqdm.auto import tqdm

    from ..data.folder import FolderDataModule
    from ..evaluation.tables import write_csv

    args = options.args
    catalog = FolderDataModule(str(args.csv), spatial_dims=options.backbone.spatial_dims).discover()
    failed = [{"case": b.case, "file": b.file, "problem": f"{b.problem} {b.fix}".strip()} for b in catalog.bad]
    metrics, quality, start = [], [], time.perf_counter()
    units = list(catalog.units.values())
    for unit in tqdm(units, desc="Registering", unit="pair", disable=not sys.stderr.isatty()):
        files = unit.files
        try:
            written, _ = register_pair(
                options,
                Path(files["source"]),
                Path(files["target"]),
                _path(files.get("label_source")),
                _path(files.get("label_target")),
                args.out / unit.id,
                _path(files.get("mask")),
            )
        except (AdaCSError, ValueError, RuntimeError, OSError) as error:
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # a full disk fails every later row too: stop, with the console's paragraph
            # Anything one pair's files cause (a label map on another grid, a torn file): skip the row.
            failed.append({"case": unit.id, "file": files.get("source", ""), "problem": f"{error}"})
            print(f"adacs-register: skipped {unit.id}: {error}", file=sys.stderr)
            continue
        record = json.loads(written["record"].read_text())
        quality.append({"case": unit.id, **record["quality"]})
        if "metrics" in record:
            network = {f"network_{k}": v for k, v in record.get("metrics_network", {}).items() if k in NETWORK_COLUMNS}
            metrics.append({"case": unit.id, **record["metrics"], **network, "seconds": record["seconds"]})
    seconds = time.perf_counter() - start
    reports = {}
    args.out.mkdir(parents=True, exist_ok=True)
    if quality:  # every registered pair, labelled or not: sort by flag to see which to check first
        reports["quality"] = write_csv(quality, args.out / "quality.csv")
    if metrics:
        reports["metrics"] = write_csv(metrics, args.out / "metrics.csv")
    reports["failed"] = write_csv(failed, args.out / "failed.csv", ["case", "file", "problem"])
    done = len(units) - sum(1 for f in failed if f["case"] in catalog.units)
    print(f"Registered {done} of {len(units) + len(catalog.bad)} pairs in {seconds:.1f} s into {args.out}", end="")
    print(f" ({len(failed)} skipped: see {reports['failed']})." if failed else ".")
    return reports


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def _roi(size: list[int], ndim: int) -> tuple[int, ...]:
    return tuple(size) * ndim if len(size) == 1 else tuple(size)


def _suffix(path: Path) -> str:
    """The target's file extension (``.nii.gz``, ``.nii``, ``.mha``, ``.nrrd``); ``.mhd`` targets get ``.mha``."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    suffix = path.suffix.lower()
    return ".mha" if suffix == ".mhd" else suffix if suffix in (".nii", ".mha", ".nrrd") else ".nii.gz"


def training_intensity(model: Path) -> str | None:
    """The intensity scaling the model was trained with: ``data.intensity`` of its run folder (``model``
    itself, or the folder a checkpoint lies in), else the data module's default; None without a run folder
    or when its data module has no such setting (e.g. synthetic data, generated in [0, 1])."""
    from hydra.utils import get_class

    data = run_setting(model, "data")
    if data is None:
        return None
    if "intensity" in data:
        value = data["intensity"]
    else:
        try:  # the setting left out of the config: the data module's default
            default = inspect.signature(get_class(str(data.get("_target_")))).parameters.get("intensity")
        except Exception:  # not importable here
            return None
        value = None if default is None or default.default is inspect.Parameter.empty else default.default
    # Only the file data sets' scalings apply to a file; synthetic data is generated in [0, 1].
    return str(value) if value in INTENSITY_MODES else None


def main(argv: list[str] | None = None) -> None:
    """Console script ``adacs-register``."""
    console_main("adacs-register", run, argv)


if __name__ == "__main__":
    main()
