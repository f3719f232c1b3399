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
import sys
from pathlib import Path

from ..choices import INTENSITY_MODES, REFINE_BATCH, REFINE_WEIGHTS
from ..errors import AdaCSError, check_writable
from .common import HelpFormatter, console_main, finite_float

GRID_CHOICES = ("refuse", "resample")  # registration.GRID_CHOICES, kept here so --help imports no PyTorch


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
        "--no-preprocess",
        action="store_true",
        help="register on the target's own grid; by default the pair is first put on the grid the run was trained "
        "on (its data set's reorientation, spacing and resize, from the run folder) and the results composed back",
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
    refine.add_argument(
        "--refine-batch",
        type=int,
        default=REFINE_BATCH,
        metavar="B",
        help="with --csv, pairs refined at once (pairs of one size share each step; each moves as if alone)",
    )
    return parser


def run(argv: list[str] | None = None) -> dict[str, Path]:
    """Parse ``argv``, register, write the outputs; returns their paths (folder mode: the reports)."""
    args = build_parser().parse_args(argv)
    _check_arguments(args)
    check_writable(args.out, "The output folder (--out)", "Give --out a folder you can write to.")
    from ..registration import PairSettings, RegistrationModel, register_folder, register_pair

    refine = None
    if args.refine > 0:
        refine = {"steps": args.refine, "lr": args.refine_lr, "grid": args.refine_grid, "weights": args.refine_weights}
    model = RegistrationModel.load(
        args.model, args.device, args.intensity, not args.no_scale, args.maps, refine, not args.no_preprocess
    )
    settings = PairSettings(
        args.grid, args.divisible, _roi(args.roi_size), not args.no_inverse, args.prefix, args.refine_with_labels,
        args.refine_batch,
    )  # fmt: skip
    if args.csv is not None:
        result = register_folder(model, settings, args.csv, args.out)
        for row in result.failed:
            print(f"adacs-register: skipped {row['case']}: {row['problem']}", file=sys.stderr)
        print(
            f"Registered {result.registered} of {result.listed} pairs in {result.seconds:.1f} s into {args.out}", end=""
        )
        print(f" ({len(result.failed)} skipped: see {result.reports['failed']})." if result.failed else ".")
        return result.reports
    pair = register_pair(model, settings, args.source, args.target, args.out, args.source_labels, args.target_labels)
    scaling = "unscaled" if model.scale is None else f"{model.scale} intensity scaling"
    notes = [pair.record["grid"], f"network grid: {pair.record['network_grid']}"]
    print(f"Registered {args.source} onto {args.target} with {model.checkpoint} ({scaling}; {'; '.join(notes)}):")
    for name, path in pair.files.items():
        print(f"  {name}: {path}")
    return pair.files


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
    if args.refine < 0 or args.refine_lr <= 0 or args.refine_grid < 1 or args.refine_batch < 1:
        raise AdaCSError("--refine must be ≥ 0, --refine-lr > 0, --refine-grid ≥ 1 and --refine-batch ≥ 1.")
    if args.target_labels is not None and args.source_labels is None:
        raise AdaCSError(
            "--target-labels needs --source-labels: the metrics compare the warped source labels with the target's."
        )


def _roi(size: list[int] | None) -> tuple[int, ...] | None:
    return None if size is None else tuple(size)


def main(argv: list[str] | None = None) -> None:
    """Console script ``adacs-register``."""
    console_main("adacs-register", run, argv)


if __name__ == "__main__":
    main()
