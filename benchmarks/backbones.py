"""The backbone zoo side by side: parameters, 2D/3D support and AdaCS training-step time against VoxelMorph.

Every backbone is built from its config (conf/backbone/NAME.yaml) and trained with AdaCS
in the joint phase (backbone and scorer updated every step, the most expensive phase) on
the same synthetic batches in one process. Rounds interleave the backbones so that
machine noise hits all of them alike; each time is the median over all its timed steps,
and the ratio is against VoxelMorph's. Parameter counts are at the 2D (128×128) and 3D
(``--size-3d``, default 160³: TransMorph's and c-LapIRN's configs do not depend on it,
GlobalNet's dense layer does) configurations.

    python benchmarks/backbones.py                           # 2D 128², batch 8, CPU
    python benchmarks/backbones.py --spatial-dims 3 --size 64 --batch 1
    python benchmarks/backbones.py --tiny --json zoo.json    # seconds: narrow networks, 32² images
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate
from step_time import Batches, FixedPhase, parameter_count, run_steps  # same folder
from torch.utils.data import DataLoader

from adacs_lightning import ScoringNetwork
from adacs_lightning.configs import compose
from adacs_lightning.schedule import Phase

warnings.filterwarnings("ignore")

BACKBONES = {
    "voxelmorph": "VoxelMorph (Balakrishnan et al., TMI 2019)",
    "transmorph": "TransMorph (Chen et al., MedIA 2022)",
    "diffusemorph": "DiffuseMorph (Kim et al., ECCV 2022)",
    "lapirn": "c-LapIRN (Mok & Chung, MICCAI 2021)",
    "localnet": "LocalNet (Hu et al., MedIA 2018)",
    "regunet": "RegUNet (Hu et al., MedIA 2018)",
    "globalnet": "GlobalNet, affine (Hu et al., MedIA 2018)",
}
# --tiny: the same architectures, narrow, for a smoke test of this script.
TINY = yaml.safe_load((Path(__file__).with_name("narrow_backbones.yaml")).read_text())


def build_backbone(name: str, spatial_dims: int, size: int, tiny: bool):
    overrides = [f"backbone={name}", f"data.spatial_dims={spatial_dims}", f"data.image_size={size}"]
    cfg = compose(overrides + (TINY[name] if tiny else []))
    torch.manual_seed(0)
    return instantiate(cfg.backbone, _convert_="all")


def supported_dims(name: str, tiny: bool) -> list[int]:
    """The dimensions whose config builds and runs a forward pass (on a 32-voxel image)."""
    found = []
    for dims in (2, 3):
        try:
            backbone = build_backbone(name, dims, 32, tiny=True).eval()
            image = torch.rand((1, 1) + (32,) * dims)
            with torch.no_grad():
                backbone(image, image)
            found.append(dims)
        except Exception:  # noqa: BLE001 - a failure means "not supported"
            pass
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spatial-dims", type=int, default=2, help="dimension of the timed training")
    parser.add_argument("--size", type=int, default=128, help="image size of the timed training")
    parser.add_argument("--size-3d", type=int, default=160, help="3D image size for the parameter count")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per backbone and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per backbone and round")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all backbones")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="narrow networks, 32-voxel images, one short round")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.size, args.size_3d, args.batch, args.steps, args.warmup, args.repeats = 32, 32, 2, 1, 1, 1

    names = list(BACKBONES)
    params_2d = {n: parameter_count(build_backbone(n, 2, 128 if not args.tiny else 32, args.tiny)) for n in names}
    params_3d = {n: parameter_count(build_backbone(n, 3, args.size_3d, args.tiny)) for n in names}
    dims = {n: supported_dims(n, args.tiny) for n in names}

    loader = DataLoader(
        Batches(args.spatial_dims, args.size, args.batch, args.batch * (args.warmup + args.steps)),
        batch_size=args.batch,
    )
    models = {}
    for name in names:
        backbone = build_backbone(name, args.spatial_dims, args.size, args.tiny)
        scorer = ScoringNetwork(args.spatial_dims)
        models[name] = FixedPhase(backbone, scorer=scorer, fixed_phase=Phase.JOINT, lr=1e-4)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            times[name] += run_steps(models[name], loader, args, args.warmup + args.steps)[args.warmup :]
    medians = {n: statistics.median(t) for n, t in times.items()}

    shape = "×".join([str(args.size)] * args.spatial_dims)
    print(
        f"AdaCS joint-phase training step, {args.spatial_dims}D {shape}, batch {args.batch}, {args.device}, "
        f"{args.precision}, {torch.get_num_threads()} threads; median of {args.repeats}×{args.steps} steps"
    )
    size_3d = "×".join([str(args.size_3d)] * 3)
    header = f"{'backbone':13s} {'source':44s} {'params 2D':>10s} {f'params 3D ({size_3d})':>22s} {'dims':>6s}"
    print(f"{header} {'step (s)':>9s} {'× VoxelMorph':>12s}")
    rows = []
    for name in names:
        ratio = medians[name] / medians["voxelmorph"]
        dims_text = "/".join(f"{d}D" for d in dims[name]) or "-"
        print(
            f"{name:13s} {BACKBONES[name]:44s} {params_2d[name]:10d} {params_3d[name]:22d} {dims_text:>6s} "
            f"{medians[name]:9.3f} {ratio:12.2f}"
        )
        rows.append(
            {
                "backbone": name,
                "source": BACKBONES[name],
                "params_2d": params_2d[name],
                "params_3d": params_3d[name],
                "spatial_dims": dims[name],
                "step_s": medians[name],
                "step_vs_voxelmorph": ratio,
            }
        )
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        with open(args.json, "w") as handle:
            json.dump({"settings": settings, "backbones": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
