"""What refinement costs per pair, and which parameterisation lowers the objective more per second.

For a synthetic phantom pair (2D 128² and 3D 64³ by default), the network's displacement (VoxelMorph
at its initial weights: a field near 0, the hardest start) is refined for N steps with the run's
objective shape (squared error, λ = 0.05, a score map from an untrained scorer) on every voxel
(grid 1) and on a coarser control grid (grid 4). Rounds interleave the settings; each time is the
median over rounds, printed with its ratio to the network's forward pass alone (N = 0), side by side.

    python benchmarks/refine.py                       # CPU, 2D 128² and 3D 64³, N = 0 … 200
    python benchmarks/refine.py --device cuda --batch 8
    python benchmarks/refine.py --steps 0 25 --sizes 2:64 --repeats 1   # seconds
    python benchmarks/refine.py --steps 0 50 --grids 4 --sizes 2:128 3:64 3:128 --batch 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adacs_lightning import ScoringNetwork, voxelmorph
from adacs_lightning.data import Nuisances, make_pair
from adacs_lightning.objective import BackboneObjective
from adacs_lightning.refine import Refiner
from adacs_lightning.similarity import SquaredError


def pair_batch(ndim: int, size: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [make_pair((size,) * ndim, Nuisances(), torch.Generator().manual_seed(i)) for i in range(batch)]
    source = torch.stack([p.source for p in pairs]).to(device)
    target = torch.stack([p.target for p in pairs]).to(device)
    return source, target


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(ndim: int, size: int, steps: list[int], grids: list[int], batch: int, repeats: int, device) -> list[dict]:
    torch.manual_seed(0)
    network = voxelmorph(spatial_dims=ndim).to(device).eval()
    scorer = ScoringNetwork(ndim).to(device).eval()
    source, target = pair_batch(ndim, size, batch, device)
    with torch.no_grad():
        network(source, target)  # warm-up: first-call allocations are not the network's cost
    settings = [(0, 1)] + [(n, g) for n in steps if n > 0 for g in grids]
    times: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    objective: dict[tuple[int, int], tuple[float, float]] = {}
    for _ in range(repeats):
        for n, grid in settings:  # interleaved: machine noise hits every setting alike
            refiner = Refiner(
                BackboneObjective(SquaredError(), 0.05), scorer=scorer, steps=n, lr=0.1, grid=grid, tolerance=0.0
            )
            sync(device)
            start = time.perf_counter()
            with torch.no_grad():
                ddf = network(source, target)
            result = refiner.refine(source, target, ddf) if n > 0 else None
            sync(device)
            times[(n, grid)].append((time.perf_counter() - start) / batch)
            if result is not None:
                objective[(n, grid)] = (float(result.objective_before.mean()), float(result.objective_after.mean()))
    base = statistics.median(times[(0, 1)])
    rows = []
    for n, grid in settings:
        seconds = statistics.median(times[(n, grid)])
        before, after = objective.get((n, grid), (float("nan"), float("nan")))
        rows.append(
            {"ndim": ndim, "size": size, "steps": n, "grid": grid, "s_per_pair": seconds, "ratio": seconds / base,
             "objective_before": before, "objective_after": after}
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 25, 50, 100, 200])
    parser.add_argument("--grids", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--sizes", nargs="+", default=["2:128", "3:64"], help="NDIM:SIZE, e.g. 2:128 3:64")
    parser.add_argument("--batch", type=int, default=1, help="pairs refined at once")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's, every core)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for spec in args.sizes:
        ndim, size = (int(v) for v in spec.split(":"))
        rows += measure(ndim, size, args.steps, args.grids, args.batch, args.repeats, device)
    print(
        f"device {device}, {torch.get_num_threads()} thread(s), {args.batch} pair(s) at once, median of "
        f"{args.repeats} interleaved rounds"
    )
    print("| image | N steps | grid | s / pair | × network alone | objective: network → refined |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        change = "–" if r["steps"] == 0 else f"{r['objective_before']:.5f} → {r['objective_after']:.5f}"
        image = f"{r['ndim']}D {r['size']}^{r['ndim']}"
        print(f"| {image} | {r['steps']} | {r['grid']} | {r['s_per_pair']:.3f} | {r['ratio']:.1f} | {change} |")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
