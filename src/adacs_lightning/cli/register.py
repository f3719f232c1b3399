"""``adacs-register``: register a source image onto a target with a trained network.

Examples::

    adacs-register --model outputs/<run> --source es.nii.gz --target ed.nii.gz --out registered/
    adacs-register --model outputs/<run>/backbone.pt --source a.mha --target b.mha \\
        --source-labels a_seg.nrrd --out registered/
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

import numpy as np
from hydra.utils import get_class
from omegaconf import OmegaConf

from ..checkpoint import load_backbone
from ..data.transforms import INTENSITY_MODES
from ..errors import AdaCSError
from ..evaluation.inference import register_arrays
from ..evaluation.io import read_image, write_displacement, write_image
from ..evaluation.report import resolve_device
from ..evaluation.runs import best_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adacs-register",
        description=(
            "Register SOURCE onto TARGET with the registration network of a trained run (the backbone alone: "
            "no scorer is built or run). Reads NIfTI, MHA, NRRD and other ITK formats; writes NIfTI in the "
            "target's space: the warped source (its original intensities), the displacement as a vector image "
            "(voxels, component i along array axis i, source(x + u(x)) ≈ target(x)) and, optionally, the "
            "source labels warped with nearest-neighbour interpolation."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, type=Path, help="run folder, .ckpt checkpoint or backbone.pt")
    parser.add_argument("--source", required=True, type=Path, help="moving image")
    parser.add_argument("--target", required=True, type=Path, help="fixed image")
    parser.add_argument("--source-labels", type=Path, default=None, help="label map of the source, to warp")
    parser.add_argument("--out", type=Path, default=Path("registered"), help="output folder")
    parser.add_argument("--prefix", default="", help="prefix of the output file names")
    parser.add_argument(
        "--divisible", type=int, default=16, help="zero-pad each axis to a multiple of this for the network (1: off)"
    )
    parser.add_argument(
        "--intensity",
        choices=INTENSITY_MODES,
        default=None,
        help="scaling to [0, 1]: minmax or percentile (1st-99th, clipped); default: the run's data.intensity "
        "when --model is (or lies in) a run folder, else minmax",
    )
    parser.add_argument("--no-scale", action="store_true", help="feed intensities as they are (no scaling)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser


def run(argv: list[str] | None = None) -> dict[str, Path]:
    """Parse ``argv``, register, write the outputs; returns their paths."""
    args = build_parser().parse_args(argv)
    if args.divisible < 1:
        raise AdaCSError("--divisible must be at least 1.")
    if args.no_scale and args.intensity:
        raise AdaCSError("--no-scale and --intensity disagree: give one.")
    checkpoint = best_checkpoint(args.model) if args.model.is_dir() else args.model
    backbone = load_backbone(checkpoint, map_location="cpu")
    scale = None if args.no_scale else args.intensity or training_intensity(args.model) or "minmax"
    source = read_image(args.source, backbone.spatial_dims)
    target = read_image(args.target, backbone.spatial_dims)
    labels = read_image(args.source_labels, backbone.spatial_dims).array if args.source_labels else None
    start = time.perf_counter()
    result = register_arrays(
        backbone,
        source.array,
        target.array,
        labels if labels is None else np.rint(labels).astype(np.int32),
        scale=scale,
        divisible=args.divisible,
        device=resolve_device(args.device),
    )
    seconds = time.perf_counter() - start
    out, prefix = args.out, args.prefix
    files = {
        "warped": write_image(result.warped, target.affine, out / f"{prefix}warped.nii.gz"),
        "displacement": write_displacement(result.ddf, target.affine, out / f"{prefix}displacement.nii.gz"),
    }
    if result.warped_labels is not None:
        files["warped_labels"] = write_image(
            result.warped_labels, target.affine, out / f"{prefix}warped_labels.nii.gz", dtype=np.int32
        )
    scaling = "unscaled" if scale is None else f"{scale} intensity scaling"
    print(f"Registered {args.source} onto {args.target} in {seconds:.2f} s with {checkpoint} ({scaling}):")
    for name, path in files.items():
        print(f"  {name}: {path}")
    return files


def training_intensity(model: Path) -> str | None:
    """The intensity scaling the model was trained with: ``data.intensity`` of its run folder (``model``
    itself, or the folder a checkpoint lies in), else the data module's default; None without a run folder
    or when its data module has no such setting (e.g. synthetic data, generated in [0, 1])."""
    candidates = [model] if model.is_dir() else [model.parent, model.parent.parent]
    folder = next((p for p in candidates if (p / ".hydra" / "config.yaml").is_file()), None)
    if folder is None:
        return None
    data = OmegaConf.select(OmegaConf.load(folder / ".hydra" / "config.yaml"), "data")
    if data is None:
        return None
    if "intensity" in data:
        value = OmegaConf.select(data, "intensity", throw_on_resolution_failure=False)
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
    try:
        run(sys.argv[1:] if argv is None else argv)
    except AdaCSError as error:
        print(f"adacs-register: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
