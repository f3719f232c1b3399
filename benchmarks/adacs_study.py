"""Validation study of AdaCS against the plain backbone on the synthetic data, one training at a time.

Each named setting is one ``adacs-train`` run (Hydra overrides on top of a shared budget);
the script reads the last epoch's ``val/dice`` from the run's ``summary.json`` and, from
``csv/metrics.csv``, the last epoch's mean score ``Ŝ``, momentum weight ``m_T`` and ``μ_T``.
Runs whose folder already holds a ``summary.json`` are read, not re-run, so the study can be
extended or resumed. Everything is measured on the validation split: nothing here touches
the test split.

    python benchmarks/adacs_study.py --out /tmp/study --group ordering
    python benchmarks/adacs_study.py --out /tmp/study --list

Prints a Markdown table (setting, seed, val Dice, identity Dice, mean Ŝ, m_T, minutes) and
writes it with the raw numbers to ``<out>/results.md`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

# The shared budget: 64×64 2D pairs, the default 256 training pairs, 20 epochs, warm-up 3.
BUDGET = ["data.image_size=64", "callbacks.images.every_n_epochs=1000", "callbacks.progress_bar.refresh_rate=0"]
BASE = ["method=baseline"]
ADA: list[str] = []
# Occlusion in the target only, frequent and deep: a physically plausible harder setting.
STRONG_OCCLUSION = [
    "data.nuisance.shadow_frames=target",
    "data.nuisance.shadow_prob=0.8",
    "data.nuisance.dropout_prob=0.8",
    "data.nuisance.extra_structure_prob=0.8",
    "data.nuisance.shadow_attenuation=0.95",
    "data.nuisance.dropout_attenuation=0.95",
]

# group -> {name: overrides}
GROUPS: dict[str, dict[str, list[str]]] = {
    "ordering": {
        "base_lam0.01": BASE,
        "base_lam0.05": [*BASE, "method.lam=0.05"],
        "adacs_default": ADA,
    },
    "lambda": {
        "base_lam0.02": [*BASE, "method.lam=0.02"],
        "base_lam0.1": [*BASE, "method.lam=0.1"],
        "base_lam0.2": [*BASE, "method.lam=0.2"],
        "adacs_lam0.02": [*ADA, "method.lam=0.02"],
        "adacs_lam0.05": [*ADA, "method.lam=0.05"],
    },
    "scoring": {
        "adacs_kappa_auto": [*ADA, "method.kappa=auto"],
        "adacs_kappa10": [*ADA, "method.kappa=10"],
        "adacs_alpha0.04": [*ADA, "method.alpha=0.04"],
        "adacs_alpha0.1": [*ADA, "method.alpha=0.1"],
        "adacs_beta0": [*ADA, "method.beta=0"],
        "adacs_beta15": [*ADA, "method.beta=15"],
    },
    "schedule": {
        "adacs_warmup1": [*ADA, "method.warmup_epochs=1"],
        "adacs_warmup6": [*ADA, "method.warmup_epochs=6"],
        "adacs_ep40": [*ADA, "trainer.max_epochs=40"],
        "base_ep40": [*BASE, "trainer.max_epochs=40"],
    },
    "nuisance": {
        "base_clean_speckle0": [*BASE, "data.nuisance.noise_level=0"],
        "adacs_clean_speckle0": [*ADA, "data.nuisance.noise_level=0"],
        "base_clean_speckle0_lam0.05": [*BASE, "method.lam=0.05", "data.nuisance.noise_level=0"],
        "base_speckle0.8": [*BASE, "data.nuisance.noise_level=0.8"],
        "adacs_speckle0.8": [*ADA, "data.nuisance.noise_level=0.8"],
        "base_occl_strong": [*BASE, *STRONG_OCCLUSION],
        "base_occl_strong_lam0.05": [*BASE, "method.lam=0.05", *STRONG_OCCLUSION],
        "adacs_occl_strong": [*ADA, *STRONG_OCCLUSION],
    },
}


def _last_epoch_means(metrics_csv: Path) -> dict[str, float]:
    """Means of the ``*_epoch`` columns of the last row that has them (the last training epoch)."""
    wanted = ("train/score_mean_epoch", "train/m_epoch", "train/mu_epoch", "train/smooth_ddf_epoch")
    found: dict[str, float] = {}
    if not metrics_csv.exists():
        return found
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            for key in wanted:
                if row.get(key):
                    found[key] = float(row[key])
    return found


def run_one(out: Path, name: str, overrides: list[str], seed: int, extra: list[str] = ()) -> dict:
    """Train one setting (unless its summary exists) and return its numbers."""
    folder = out / f"{name}_s{seed}"
    summary = folder / "summary.json"
    timing = folder / "wall_seconds.txt"
    if not summary.exists():
        if folder.exists():
            shutil.rmtree(folder)
        command = [
            str(Path(sys.executable).with_name("adacs-train")),
            *BUDGET,
            *overrides,
            *extra,
            f"seed={seed}",
            "logger=csv",
            f"hydra.run.dir={folder}",
        ]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return {"name": name, "seed": seed, "error": done.returncode}
        timing.write_text(f"{seconds:.1f}\n")
    metrics = json.loads(summary.read_text())["metrics"]
    extra = _last_epoch_means(folder / "csv" / "metrics.csv")
    return {
        "name": name,
        "seed": seed,
        "overrides": overrides,
        "val_dice": metrics.get("val/dice"),
        "identity": metrics.get("val/dice_identity"),
        "score_mean": extra.get("train/score_mean_epoch"),
        "m": extra.get("train/m_epoch"),
        "mu": extra.get("train/mu_epoch"),
        "minutes": float(timing.read_text()) / 60 if timing.exists() else math.nan,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| setting | seed | val Dice | identity | mean Ŝ | m_T | min |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['seed']} | failed ({r['error']}) | | | | |")
            continue
        lines.append(
            f"| {r['name']} | {r['seed']} | {_fmt(r['val_dice'])} | {_fmt(r['identity'])} | "
            f"{_fmt(r['score_mean'], 2)} | {_fmt(r['m'], 2)} | {_fmt(r['minutes'], 1)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/adacs_study"))
    parser.add_argument("--group", action="append", choices=sorted(GROUPS), help="groups to run (default: all)")
    parser.add_argument("--only", action="extend", nargs="+", help="run only these setting names")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--list", action="store_true", help="print the settings and exit")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides added to every run (e.g. debug=tiny)")
    args = parser.parse_args(argv)

    settings = {name: o for g in (args.group or sorted(GROUPS)) for name, o in GROUPS[g].items()}
    if args.only:
        settings = {name: o for name, o in settings.items() if name in args.only}
    if args.list:
        for name, overrides in settings.items():
            print(f"{name}: {' '.join(BUDGET + overrides)}")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in settings.items():
        for seed in args.seeds:
            rows.append(run_one(args.out, name, overrides, seed, args.extra))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    # Merge with what earlier invocations stored.
    store = args.out / "results.json"
    previous = json.loads(store.read_text()) if store.exists() else []
    merged = {(r["name"], r["seed"]): r for r in previous}
    merged.update({(r["name"], r["seed"]): r for r in rows})
    everything = sorted(merged.values(), key=lambda r: (r["name"], r["seed"]))
    store.write_text(json.dumps(everything, indent=2))
    (args.out / "results.md").write_text(table(everything) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
