"""``adacs-export``: the trained registration network alone, as a file that runs without this package.

Examples::

    adacs-export outputs/<run> -o vxm.pt2                       # torch.export (load with torch.export.load)
    adacs-export outputs/<run>/backbone.pt -o vxm.ts --format torchscript --size 128 128
    adacs-export outputs/<run> -o vxm.onnx --format onnx        # needs the onnx package

The exported program maps ``(moving, fixed)`` ``(1, C, *size)`` in [0, 1] to the displacement
``(1, ndim, *size)`` in voxels (channel ``i`` along axis ``i``; ``moving(x + u(x)) ≈ fixed(x)``) at the
size it was exported for: pad or crop images to that size as ``adacs-register`` does.
A JSON file next to it records the size, channels and conventions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..choices import EXPORT_FORMATS
from ..configs import run_setting
from ..errors import AdaCSError, check_writable
from .common import HelpFormatter, console_main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adacs-export",
        description="Write the trained registration network alone (no scorer) for deployment.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", type=Path, help="run folder, .ckpt checkpoint or backbone.pt")
    parser.add_argument("-o", "--output", type=Path, required=True, help="file to write")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="export", help="torch.export, TorchScript or ONNX")
    parser.add_argument(
        "--size",
        type=int,
        nargs="+",
        default=None,
        help="image size the program takes (voxels per axis, or one for all); default: the run's data.image_size",
    )
    return parser


def run(argv: list[str] | None = None) -> Path:
    """Parse ``argv`` and export; returns the written file."""
    args = build_parser().parse_args(argv)
    if args.format == "onnx":
        try:
            import onnx  # noqa: F401
        except ImportError:
            raise AdaCSError(
                "ONNX export needs the onnx package (pip install onnx onnxscript); --format export or torchscript "
                "need nothing more."
            ) from None
    if args.output.is_dir():
        raise AdaCSError(
            f"-o/--output '{args.output}' is a folder: give the file to write, e.g. {args.output / 'net.pt2'}."
        )
    check_writable(args.output.parent, "The folder of -o/--output", "Give -o a file in a folder you can write to.")
    import torch

    from ..checkpoint import load_backbone
    from ..evaluation.runs import best_checkpoint

    checkpoint = best_checkpoint(args.model) if args.model.is_dir() else args.model
    backbone = load_backbone(checkpoint, map_location="cpu").eval()
    size = _size(args, backbone.spatial_dims)
    example = tuple(torch.rand((1, backbone.in_channels, *size)) for _ in range(2))
    output = args.output
    output.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if args.format == "torchscript":
            torch.jit.trace(backbone, example, check_trace=False).save(str(output))
        elif args.format == "export":
            torch.export.save(torch.export.export(backbone, example), str(output))
        else:
            torch.onnx.export(backbone, example, str(output), input_names=["moving", "fixed"], output_names=["ddf"])
    metadata = {
        "source": str(checkpoint),
        "format": args.format,
        "input_size": list(size),
        "in_channels": backbone.in_channels,
        "spatial_dims": backbone.spatial_dims,
        "inputs": "(moving, fixed), each (1, in_channels, *input_size), intensities in [0, 1]",
        "output": "displacement (1, spatial_dims, *input_size) in voxels; moving(x + u(x)) ≈ fixed(x)",
    }
    Path(f"{output}.json").write_text(json.dumps(metadata, indent=2))
    print(f"Exported {checkpoint} ({args.format}, input size {'×'.join(map(str, size))}) to {output}")
    return output


def _size(args: argparse.Namespace, ndim: int) -> tuple[int, ...]:
    size = args.size
    if size is None:
        size = run_setting(args.model, "data.image_size")
    if size is None:
        raise AdaCSError(
            "Give the input size with --size (e.g. --size 128 128): the model's run folder records no "
            "data.image_size (there is no run folder, or its data set keeps each file's own size)."
        )
    size = [int(s) for s in ([size] if isinstance(size, int) else size)]
    size = size * ndim if len(size) == 1 else size
    if len(size) != ndim or min(size) < 1:
        raise AdaCSError(f"--size needs {ndim} positive sizes (or one for all), got {args.size}.")
    return tuple(size)


def main(argv: list[str] | None = None) -> None:
    """Console script ``adacs-export``."""
    console_main("adacs-export", run, argv)


if __name__ == "__main__":
    main()
