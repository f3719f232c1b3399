"""Training-step time and memory of AdaCS against the plain backbone, measured side by side.

Every variant trains the same backbone on the same synthetic batches inside one
process; rounds interleave the variants so that machine noise hits all of them alike,
and each variant's time is the median over all its timed steps. Printed ratios are
against the baseline (the backbone trained alone). Peak memory is measured in a fresh
subprocess per variant on the CPU (growth of the peak resident set over the steps) and
with ``torch.cuda.max_memory_allocated`` on a GPU. Inference compares the exported
backbone with a bare copy of the network.

    python benchmarks/step_time.py                          # VoxelMorph (1/16), 2D 128², batch 8
    python benchmarks/step_time.py --spatial-dims 3 --size 64 --batch 1 --only "joint, unet scorer (reuse)" \
        "joint, unet, shift-min (default)" "joint, unet, shift-min radius 1"    # and --size 96
    python benchmarks/step_time.py --device cuda --precision bf16-mixed
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from adacs_lightning import PAPER, AdaCS, ReferenceAdaCS, ScoringNetwork, VoxelMorphScorer, voxelmorph
from adacs_lightning.data import Nuisances, make_pair
from adacs_lightning.schedule import Phase

warnings.filterwarnings("ignore")
for _name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning.pytorch.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class HeldPhase:
    """A method held in one schedule phase, so that each phase can be timed on its own."""

    def __init__(self, *args, fixed_phase: Phase, **kwargs):
        super().__init__(*args, **kwargs)
        self._fixed_phase = fixed_phase

    @property
    def phase(self) -> Phase:
        return self._fixed_phase if self.scorer is not None else Phase.WARMUP_BACKBONE


class FixedPhase(HeldPhase, AdaCS):
    pass


class FixedPhaseReference(HeldPhase, ReferenceAdaCS):
    pass


class Batches(Dataset):
    """``count`` synthetic pairs of one shape, generated once and served ``length`` times in a row."""

    def __init__(self, spatial_dims: int, size: int, count: int, length: int):
        shape = (size,) * spatial_dims
        pairs = [make_pair(shape, Nuisances(), torch.Generator().manual_seed(i)) for i in range(count)]
        self.items = [{"source": p.source, "target": p.target, "mask": p.mask} for p in pairs]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.items[index % len(self.items)]


class StepTimer(L.Callback):
    def __init__(self, device: str):
        self.device, self.times, self._start = device, [], 0.0

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


@dataclass
class Variant:
    name: str
    phase: Phase | None  # None: the baseline (no scorer)
    scorer: str = "unet"  # unet: the light MONAI U-Net; voxelmorph: the reference's
    score_residual: str = "reuse"
    bidirectional: bool = False
    leak: bool = False
    default: bool = False  # adacs-train's scorer (calibrated, shift-min); otherwise the paper's (the residual itself)
    settings: dict | None = None  # AdaCS keywords on top of the default's (the robust calibrations)


def build(variant: Variant, args) -> AdaCS:
    torch.manual_seed(0)
    backbone = voxelmorph(spatial_dims=args.spatial_dims)
    if variant.phase is None:
        return FixedPhase(backbone, scoring=False, fixed_phase=Phase.WARMUP_BACKBONE, lr=1e-4)
    extra = variant.settings or {}
    sees = extra.get("scorer_input", "target")
    if variant.scorer == "voxelmorph":
        scorer = VoxelMorphScorer(args.spatial_dims, scorer_input=sees)
    else:
        scorer = ScoringNetwork(args.spatial_dims, channels=args.scorer_channels, scorer_input=sees)
    settings = dict(scorer=scorer, fixed_phase=variant.phase, bidirectional=variant.bidirectional, lr=1e-4)
    if variant.score_residual == "recompute" or variant.leak:
        momentum = "reference" if variant.leak else "paper"
        return FixedPhaseReference(
            backbone, score_residual="recompute", reference_leak=variant.leak, momentum_mode=momentum, **settings
        )
    return FixedPhase(backbone, **{**({} if variant.default else PAPER), **extra, **settings})


def run_steps(model: AdaCS, loader: DataLoader, args, steps: int) -> list[float]:
    timer = StepTimer(args.device)
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(model, loader)
    return timer.times


def variants(args) -> list[Variant]:
    found = [
        Variant("baseline", None),
        Variant("adacs warm-up A", Phase.WARMUP_BACKBONE),
        Variant("adacs warm-up B", Phase.WARMUP_SCORER),
        Variant("joint, unet scorer (reuse)", Phase.JOINT),
        Variant("joint, unet, shift-min (default)", Phase.JOINT, default=True),
        Variant("joint, unet, shift-min radius 1", Phase.JOINT, default=True, settings=dict(shift_radius=1)),
        Variant("joint, unet, shift-min, mean level", Phase.JOINT, default=True, settings=dict(calibration="data")),
        Variant(
            "joint, unet, dead zone + inliers kept",
            Phase.JOINT,
            default=True,
            settings=dict(calibration="dead_zone", keep_inliers=True),
        ),
        Variant(
            "joint, unet, dead zone + pair",
            Phase.JOINT,
            default=True,
            settings=dict(calibration="dead_zone", scorer_input="pair"),
        ),
        Variant("joint, voxelmorph scorer (reuse)", Phase.JOINT, "voxelmorph"),
        Variant("joint, voxelmorph scorer (recompute)", Phase.JOINT, "voxelmorph", "recompute"),
        Variant("joint, reference recipe (bidir, leak)", Phase.JOINT, "voxelmorph", "recompute", True, True),
    ]
    if args.only:
        found = [v for v in found if v.name in args.only or v.phase is None]
    return found


def make_loader(args) -> DataLoader:
    """Enough batches of ``args.batch`` pairs for one round of one variant."""
    length = args.batch * (args.warmup + args.steps)
    return DataLoader(Batches(args.spatial_dims, args.size, args.batch, length), batch_size=args.batch)


def parameter_count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def measure_memory(variant_index: int, args) -> float:
    """Peak memory (MiB) that training one variant adds, measured in a fresh process."""
    command = [sys.executable, __file__, "--memory-of", str(variant_index), *sys.argv[1:]]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def _memory_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (Linux) in MiB: VmRSS now, VmHWM the peak.

    VmHWM belongs to this process image alone, unlike ``getrusage``'s ``ru_maxrss``,
    which also keeps the resident size of the parent that forked it.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def memory_child(args) -> None:
    """Print the peak memory (MiB) that training steps of one variant add to the process."""
    variant = variants(args)[args.memory_of]
    loader = make_loader(args)
    model = build(variant, args)
    if args.device == "cuda":
        model = model.cuda()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        start = _memory_status_mib("VmRSS")
    run_steps(model, loader, args, args.steps)
    if args.device == "cuda":
        print((torch.cuda.max_memory_allocated() - start) / 2**20)
    else:
        print(_memory_status_mib("VmHWM") - start)


def time_inference(args, loader: DataLoader) -> tuple[float, float]:
    torch.manual_seed(0)
    bare = voxelmorph(spatial_dims=args.spatial_dims).to(args.device).eval()
    exported = AdaCS(copy.deepcopy(bare)).export_backbone().to(args.device)
    batch = next(iter(loader))
    moving, fixed = batch["source"].to(args.device), batch["target"].to(args.device)
    times = {"bare": [], "exported": []}
    with torch.no_grad():
        for _ in range(args.warmup):
            bare(moving, fixed), exported(moving, fixed)
        for _ in range(args.repeats * args.steps):
            for name, net in (("bare", bare), ("exported", exported)):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                net(moving, fixed)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["bare"]), statistics.median(times["exported"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spatial-dims", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--scorer-channels", type=int, nargs="+", default=[16, 32, 32, 32], help="unet scorer widths")
    parser.add_argument("--only", nargs="+", default=None, help="variants to time (the baseline always)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of is not None:
        memory_child(args)
        return

    loader = make_loader(args)
    all_variants = variants(args)
    models = [build(v, args) for v in all_variants]
    times: dict[str, list[float]] = {v.name: [] for v in all_variants}
    for _ in range(args.repeats):
        for variant, model in zip(all_variants, models):
            times[variant.name] += run_steps(model, loader, args, args.warmup + args.steps)[args.warmup :]
    medians = {name: statistics.median(values) for name, values in times.items()}
    memory = {} if args.no_memory else {v.name: measure_memory(i, args) for i, v in enumerate(all_variants)}
    bare, exported = time_inference(args, loader)

    base = medians["baseline"]
    shape = "×".join([str(args.size)] * args.spatial_dims)
    print(
        f"VoxelMorph {args.spatial_dims}D {shape}, batch {args.batch}, {args.device}, {args.precision}, "
        f"{torch.get_num_threads()} threads; median of {args.repeats}×{args.steps} steps per variant"
    )
    print(
        f"{'variant':38s} {'scorer params':>13s} {'step (s)':>9s} {'× baseline':>10s} {'peak MiB':>9s} {'× baseline':>10s}"
    )
    for variant, model in zip(all_variants, models):
        mem = memory.get(variant.name)
        mem_ratio = f"{mem / memory['baseline']:10.2f}" if mem is not None and memory.get("baseline") else f"{'-':>10s}"
        mem_text = f"{mem:9.1f}" if mem is not None else f"{'-':>9s}"
        print(
            f"{variant.name:38s} {parameter_count(model.scorer):13d} {medians[variant.name]:9.4f} "
            f"{medians[variant.name] / base:10.2f} {mem_text} {mem_ratio}"
        )
    print(f"backbone parameters: {parameter_count(models[0].backbone)}")
    print(
        f"inference: exported backbone {exported * 1e3:.2f} ms, bare network {bare * 1e3:.2f} ms, "
        f"ratio {exported / bare:.2f}"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {"step_s": medians, "peak_mib": memory, "inference_s": {"bare": bare, "exported": exported}},
                handle,
                indent=2,
            )


if __name__ == "__main__":
    main()
