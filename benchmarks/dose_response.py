"""Where does AdaCS help? Its gain over the λ-tuned baseline as target-only corruptions grow.

On the synthetic pairs, five data settings: four doses of target-only corruption on echo-like
pairs (speckle and gain drift at every dose; from none to frequent, deep drop-outs, extra
structures and shadows in the target only) and a clean MRI-like setting (Rician noise, a smooth
bias field, no corruption): a second zero dose. For each setting, each arm (the baseline and
the AdaCS variants) is trained over a λ grid and several seeds with equal backbone budgets
(AdaCS's frozen warm-up B comes on top). λ is chosen per arm on the *validation* pairs; the
grid is extended while an arm's best λ sits at its edge. The chosen runs are reported on the
*test* pairs: Dice, its paired difference from the baseline (case level, pooled over seeds, and
seed level), Holm-corrected across arms; and the mechanism: the AUROC of ``1 − Ŝ`` against the
no-correspondence mask, the mean score inside and outside it, Dice near the mask and away from it.

    python benchmarks/dose_response.py --out dose_response            # the study (hours on 2 CPU cores)
    python benchmarks/dose_response.py --out /tmp/dr --tiny           # seconds: every step, tiny sizes

Runs are one JSON file each under ``<out>/runs/``; a rerun reads them instead of training again,
so the study can be stopped, resumed and extended (more seeds, doses or arms). Writes
``<out>/results.md``, ``<out>/results.json`` and ``<out>/dose_response.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from scipy import stats as scipy_stats

from adacs_lightning import AdaCS, ClosedFormRobust, SyntheticDataModule, voxelmorph
from adacs_lightning.correspondence import kept_mass
from adacs_lightning.data.phantom import MYOCARDIUM, Nuisances
from adacs_lightning.evaluation.stats import paired_test
from adacs_lightning.losses import gradient_energy, masked_mean
from adacs_lightning.metrics import dice_near_and_away, dice_per_label, folding_percentage, localisation
from adacs_lightning.warping import warp_block

#: Clean magnitude MRI-like pairs: Rician noise, a smooth bias field, no field of view, no corruption.
MRI_LIKE = dict(
    noise="rician", noise_level=0.05, drift=0.1, fov=False, shadow_prob=0.0, dropout_prob=0.0, extra_structure_prob=0.0
)
#: Target-only corruption per dose: probability of each corruption and its depth (echo-like pairs).
DOSES: dict[str, dict] = {
    "none": dict(shadow_prob=0.0, dropout_prob=0.0, extra_structure_prob=0.0),
    "mild": dict(
        shadow_prob=0.3, dropout_prob=0.3, extra_structure_prob=0.3, shadow_attenuation=0.6, dropout_attenuation=0.6
    ),
    "moderate": dict(
        shadow_prob=0.6, dropout_prob=0.6, extra_structure_prob=0.6, shadow_attenuation=0.8, dropout_attenuation=0.8
    ),
    "strong": dict(
        shadow_prob=0.9, dropout_prob=0.9, extra_structure_prob=0.9, shadow_attenuation=0.95, dropout_attenuation=0.95
    ),
    # A second zero dose: clean magnitude MRI (Rician noise, a smooth bias field), no field of view, no corruption.
    "mri_clean": MRI_LIKE,
    # The MRI-like pairs with target-only changes: bright blobs (a new lesion) and signal drop-outs.
    "mri_lesion": dict(MRI_LIKE, dropout_prob=0.6, dropout_attenuation=0.8, extra_structure_prob=0.6),
    # Two subjects: the target's heart is an independent one (shape, size, wall, texture), then moved.
    "mri_subject": dict(MRI_LIKE, other_subject=1.0),
}
# The clean MRI-like pairs registered with local NCC, the similarity inter-subject MRI users pick.
DOSES["mri_clean_lncc"] = dict(DOSES["mri_clean"], similarity="lncc")
#: Keys of a dose that set the method (every arm alike), not the data.
METHOD_KEYS = ("similarity",)
ECHO = dict(shadow_frames="target")

#: Arms: the method's keywords (``scoring=False`` is the baseline; ``method="robust"`` the closed-form control).
SHIFT_MIN = dict(data_weighting="normalised", scorer_target="shift_min")
ARMS: dict[str, dict] = {
    "baseline": dict(scoring=False),
    "adacs": dict(data_weighting="normalised", calibration="fixed", scorer_target="residual"),
    "calibrated": dict(data_weighting="normalised", calibration="data", scorer_target="residual"),
    "shift_min": dict(SHIFT_MIN, calibration="data"),
    "tukey": dict(SHIFT_MIN, calibration="tukey"),
    "dead_zone": dict(SHIFT_MIN, calibration="dead_zone"),
    "dead_zone_pair": dict(SHIFT_MIN, calibration="dead_zone", scorer_input="pair"),
    "dead_zone_keep": dict(SHIFT_MIN, calibration="dead_zone", keep_inliers=True),
    "dead_zone_pair_keep": dict(SHIFT_MIN, calibration="dead_zone", scorer_input="pair", keep_inliers=True),
    "robust_dead_zone": dict(
        method="robust", data_weighting="normalised", calibration="dead_zone", scorer_target="shift_min"
    ),  # fmt: skip
}
LABELS = {
    "adacs": "AdaCS (normalised; fixed constants)",
    "calibrated": "AdaCS, calibrated",
    "shift_min": "AdaCS, calibrated + shift-min target",
    "tukey": "AdaCS, Tukey point",
    "dead_zone": "AdaCS, dead zone",
    "dead_zone_pair": "AdaCS, dead zone + pair-aware scorer",
    "dead_zone_keep": "AdaCS, dead zone + inliers kept",
    "dead_zone_pair_keep": "AdaCS, dead zone + pair + inliers kept",
    "robust_dead_zone": "closed-form robust, dead zone (no scorer)",
}
#: The arms a study runs unless told otherwise: the baseline, the previous default and the robust variants.
DEFAULT_ARMS = ("baseline", "shift_min", "tukey", "dead_zone", "dead_zone_pair", "dead_zone_keep",
                "dead_zone_pair_keep", "robust_dead_zone")  # fmt: skip

#: The λ values an arm may be tried at; each starts at START and extends while its best sits at an edge.
LAMBDAS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
START = (0.02, 0.05, 0.1)


def budget(tiny: bool, epochs: int = 30) -> dict:
    if tiny:
        return dict(size=32, train=8, val=4, test=4, batch=4, epochs=2, warmup=1, channels=(4, 8, 8, 8))
    return dict(size=64, train=64, val=24, test=48, batch=8, epochs=epochs, warmup=3, channels=None)


def datamodule(dose: str, seed: int, b: dict) -> SyntheticDataModule:
    physics = {k: v for k, v in DOSES[dose].items() if k not in METHOD_KEYS}
    echo = physics.get("noise", "speckle") == "speckle"  # target-only shadows on the echo-like pairs
    nuisance = Nuisances(**({**ECHO, **physics} if echo else physics))
    return SyntheticDataModule(
        image_size=b["size"], train_pairs=b["train"], val_pairs=b["val"], test_pairs=b["test"],
        batch_size=b["batch"], seed=seed, nuisance=nuisance,
    )  # fmt: skip


def build(arm: str, lam: float, b: dict, dose: str = "none") -> AdaCS | ClosedFormRobust:
    narrow = (
        {} if b["channels"] is None else dict(channels=b["channels"], unet_out_channels=8, final_conv_channels=(8,))
    )
    settings = {**ARMS[arm], **{k: v for k, v in DOSES[dose].items() if k in METHOD_KEYS}}
    method = ClosedFormRobust if settings.pop("method", "adacs") == "robust" else AdaCS
    return method(voxelmorph(**narrow), lam=lam, lr=1e-3, warmup_epochs=b["warmup"], **settings)


@torch.no_grad()
def evaluate(model: AdaCS, loader) -> list[dict]:
    """Per-case Dice (myocardium), folding, smoothness and, with a score map, localisation of the no-correspondence mask."""
    model.eval()
    warp_labels = warp_block("nearest", "border")
    rows = []
    device = next(model.parameters()).device
    for batch in loader:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        source, target, mask = batch["source"], batch["target"], batch.get("mask")
        ddf = model.backbone(source, target)
        warped_source = model.warp(source, ddf)
        residual = model.similarity(warped_source, target, mask)
        warped = warp_labels(batch["source_label"].float(), ddf).round().long()
        dice = dice_per_label(warped, batch["target_label"], [MYOCARDIUM])[:, 0]
        near, away = dice_near_and_away(warped, batch["target_label"], batch["nocorr"], [MYOCARDIUM])
        weight = model.weight_map(target, residual, warped_source)
        local = localisation(weight, batch["nocorr"], mask) if weight is not None else None
        for i, case in enumerate(batch["meta"]["case_id"]):
            m = None if mask is None else mask[i : i + 1]
            row = {
                "case": case,
                "dice": float(dice[i]),
                "dice_near": float(near[i]),
                "dice_away": float(away[i]),
                "folding_pct": float(folding_percentage(ddf[i : i + 1], m)[0]),
                "smoothness": float(gradient_energy(ddf[i : i + 1], m)),
                "nocorr_fraction": float(batch["nocorr"][i].mean()),
            }
            if local is not None:
                row.update({k: float(v[i]) for k, v in local.items()})
                row["kept_mass"] = float(kept_mass(weight[i : i + 1], residual[i : i + 1], m))
                row["score_mean"] = float(masked_mean(weight[i : i + 1], m))
            rows.append(row)
    return rows


def run_path(out: Path, dose: str, arm: str, lam: float, seed: int) -> Path:
    return out / "runs" / f"{dose}__{arm}__lam{lam:g}__s{seed}.json"


def run_one(out: Path, dose: str, arm: str, lam: float, seed: int, b: dict) -> dict:
    """Train one (dose, arm, λ, seed) unless its file exists; returns its record."""
    path = run_path(out, dose, arm, lam, seed)
    if path.exists():
        return json.loads(path.read_text())
    torch.set_num_threads(1)
    torch.set_float32_matmul_precision("high")
    L.seed_everything(seed, verbose=False)
    data = datamodule(dose, seed, b)
    model = build(arm, lam, b, dose)
    idle = model.backbone_idle_epochs
    trainer = L.Trainer(
        max_epochs=b["epochs"] + idle, accelerator=b.get("accelerator", "cpu"), devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    data.setup("test")
    record = {
        "dose": dose, "arm": arm, "lam": lam, "seed": seed, "seconds": seconds,
        "kappa": float(model.momentum.kappa) if getattr(model, "scorer", None) is not None else None,
        "train_kept_mass": float(trainer.callback_metrics.get("train/kept_mass_epoch", math.nan)),
        "scale": repr(getattr(model, "robust", None)),
        "val": evaluate(model, data.val_dataloader()), "test": evaluate(model, data.test_dataloader()),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    print(
        f"{dose:>9} {arm:>10} λ={lam:<6g} seed {seed}: val Dice {mean(record['val'], 'dice'):.4f} ({seconds:.0f} s)",
        flush=True,
    )
    return record


def mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
    return float(np.mean(values)) if values else math.nan


def _run_job(job: tuple) -> None:
    run_one(*job)


def run_all(jobs: list[tuple], workers: int) -> None:
    """Train the jobs ``(out, dose, arm, λ, seed, budget)`` whose files are missing, ``workers`` at a time."""
    # Seed by seed: a study stopped early has every dose and arm at its first seeds.
    jobs = sorted((j for j in jobs if not run_path(*j[:5]).exists()), key=lambda j: (j[4], j[1], j[2], j[3]))
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            run_one(*job)
        return
    import multiprocessing

    # On the CPU each training gets a fresh process (one thread each); on a GPU a worker keeps its CUDA context.
    fresh = 1 if jobs[0][5].get("accelerator", "cpu") == "cpu" else None
    with multiprocessing.get_context("spawn").Pool(workers, maxtasksperchild=fresh) as pool:
        pool.map(_run_job, jobs, chunksize=1)


def next_lambda(out: Path, dose: str, arm: str, seeds: list[int], tried: list[float], grid=LAMBDAS) -> float | None:
    """The λ to try next: a neighbour beyond the edge where the best validation Dice (mean over seeds) sits; else None."""
    scores = {
        lam: np.mean([mean(json.loads(run_path(out, dose, arm, lam, s).read_text())["val"], "dice") for s in seeds])
        for lam in tried
    }
    best = max(scores, key=scores.get)
    index = grid.index(best)
    if best == min(tried) and index > 0:
        return grid[index - 1]
    if best == max(tried) and index < len(grid) - 1:
        return grid[index + 1]
    return None


def choose_lambdas(
    out: Path, doses, arms, seeds, b: dict, workers: int, grid=LAMBDAS, start=START, rounds: int | None = None
) -> dict:
    """``{(dose, arm): [λ tried]}``, the grid of each extended until its validation-best λ is inside it
    (at most ``rounds`` extensions; the report marks an arm whose best λ is still at its grid's edge)."""
    tried = {(d, a): sorted(start) for d in doses for a in arms}
    pending = list(tried)
    extensions = 0
    while pending:
        run_all([(out, d, a, lam, s, b) for d, a in pending for lam in tried[(d, a)] for s in seeds], workers)
        if rounds is not None and extensions >= rounds:
            break
        extensions += 1
        extended = []
        for key in pending:
            lam = next_lambda(out, *key, seeds, tried[key], grid)
            if lam is not None:
                tried[key] = sorted([*tried[key], lam])
                extended.append(key)
        pending = extended
    return tried


def chosen_lambda(out: Path, dose: str, arm: str, seeds: list[int], tried: list[float]) -> float:
    scores = {
        lam: np.mean([mean(json.loads(run_path(out, dose, arm, lam, s).read_text())["val"], "dice") for s in seeds])
        for lam in tried
    }
    return max(scores, key=scores.get)


def holm(pvalues: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the given order (NaN stays NaN)."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def compare(out: Path, dose: str, chosen: dict[str, float], seeds: list[int], b: dict) -> list[dict]:
    """Each arm at its chosen λ on the test pairs, against the baseline at its own."""
    records = {arm: [run_one(out, dose, arm, lam, s, b) for s in seeds] for arm, lam in chosen.items()}
    base = records["baseline"]
    rows = []
    for arm, recs in records.items():
        cases = [r for rec in recs for r in rec["test"]]
        row = {"dose": dose, "arm": arm, "lam": chosen[arm], "dice": 100 * mean(cases, "dice")}
        for key in ("auroc", "score_nocorr", "score_corr", "smoothness", "kept_mass", "score_mean"):
            row[key] = mean(cases, key)
        row["train_kept_mass"] = mean(recs, "train_kept_mass")
        row["dice_near"], row["dice_away"] = 100 * mean(cases, "dice_near"), 100 * mean(cases, "dice_away")
        if arm != "baseline":
            a = [100 * r["dice"] for rec in base for r in rec["test"]]
            test = paired_test(a, [100 * r["dice"] for r in cases])
            seed_a = [100 * mean(rec["test"], "dice") for rec in base]
            seed_b = [100 * mean(rec["test"], "dice") for rec in recs]
            seed_p = float(scipy_stats.ttest_rel(seed_b, seed_a).pvalue) if len(seeds) > 1 else math.nan
            near = paired_test(
                [100 * r["dice_near"] for rec in base for r in rec["test"]], [100 * r["dice_near"] for r in cases]
            )
            row.update(
                delta=test.mean_difference, t_p=test.t_pvalue, wilcoxon_p=test.wilcoxon_pvalue, n=test.n,
                seed_deltas=[y - x for x, y in zip(seed_a, seed_b)], seed_t_p=seed_p, delta_near=near.mean_difference,
            )  # fmt: skip
        rows.append(row)
    arms = [r for r in rows if r["arm"] != "baseline"]
    for key in ("t_p", "wilcoxon_p", "seed_t_p"):
        for r, p in zip(arms, holm([r[key] for r in arms])):
            r[f"{key}_holm"] = p
    return rows


def verdict(row: dict) -> str:
    if row["arm"] == "baseline":
        return "–"
    significant = row["t_p_holm"] < 0.05 and row["wilcoxon_p_holm"] < 0.05
    return ("wins" if row["delta"] > 0 else "loses") if significant else "ties"


def fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if abs(value) >= 10 ** (-digits) or value == 0 else f"{value:.0e}"


def write_report(
    out: Path, rows: list[dict], grids: dict, seeds: list[int], b: dict, lambda_seeds: list[int] | None = None
) -> None:
    chooser = (
        f"λ chosen on the validation pairs of seed(s) {lambda_seeds}; every seed trained at it is reported. "
        if lambda_seeds
        else ""
    )
    lines = [
        "# Dose-response: AdaCS against the λ-tuned baseline", "",
        f"Synthetic pairs {b['size']}², {b['train']} train / {b['val']} validation (chooses λ) / {b['test']} test pairs "
        f"per seed, seeds {seeds}; {b['epochs']} backbone epochs each (AdaCS adds {b['warmup']} of warm-up B). "
        f"{chooser}Δ: test Dice (%) minus the baseline's, case level pooled over seeds (paired t, Wilcoxon), seed level "
        "(paired t over seed means); p Holm-corrected across the AdaCS arms within a dose. AUROC: 1 − Ŝ as a "
        "detector of the target voxels without correspondence; Ŝ in / out: mean score inside / outside them.", "",
        "| dose | arm | λ (grid) | Dice | Δ | t p (Holm) | Wilcoxon p (Holm) | Δ per seed | seed p (Holm) | AUROC | Ŝ in / out | kept mass (train / test) | Δ Dice near | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        values = grids[(r["dose"], r["arm"])]
        edge = (
            " **edge**"
            if r["lam"] in (min(values), max(values)) and 0 < LAMBDAS.index(r["lam"]) < len(LAMBDAS) - 1
            else ""
        )
        grid = ", ".join(f"{v:g}" for v in values) + edge
        seed_deltas = " / ".join(f"{d:+.2f}" for d in r.get("seed_deltas", [])) or "–"
        lines.append(
            f"| {r['dose']} | {LABELS.get(r['arm'], r['arm'])} | {r['lam']:g} ({grid}) | {r['dice']:.2f} | "
            f"{'–' if r['arm'] == 'baseline' else format(r['delta'], '+.2f')} | {fmt(r.get('t_p_holm'), 3)} | "
            f"{fmt(r.get('wilcoxon_p_holm'), 3)} | {seed_deltas} | {fmt(r.get('seed_t_p_holm'), 3)} | {fmt(r['auroc'], 3)} | "
            f"{fmt(r['score_nocorr'])} / {fmt(r['score_corr'])} | {fmt(r.get('train_kept_mass'))} / {fmt(r.get('kept_mass'))} | {fmt(r.get('delta_near'), 2) if 'delta_near' in r else '–'} | {verdict(r)} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"rows": rows, "seeds": seeds, "budget": b}, indent=1))
    figure(out, rows)
    print("\n".join(lines))


def figure(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doses = list(dict.fromkeys(r["dose"] for r in rows))
    arms = [a for a in dict.fromkeys(r["arm"] for r in rows) if a != "baseline"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    x = np.arange(len(doses))
    for k, arm in enumerate(arms):
        by_dose = {r["dose"]: r for r in rows if r["arm"] == arm}
        offset = (k - (len(arms) - 1) / 2) * 0.08
        present = [i for i, d in enumerate(doses) if d in by_dose]
        deltas = [by_dose[doses[i]]["delta"] for i in present]
        # The spread over seeds: the lowest and highest seed-level Δ around the pooled one.
        spread = [by_dose[doses[i]].get("seed_deltas") or [by_dose[doses[i]]["delta"]] for i in present]
        low = [d - min(s) for d, s in zip(deltas, spread)]
        high = [max(s) - d for d, s in zip(deltas, spread)]
        left.errorbar(x[present] + offset, deltas, yerr=[np.clip(low, 0, None), np.clip(high, 0, None)], fmt="o-",
                      capsize=2, label=LABELS.get(arm, arm))  # fmt: skip
        right.plot(x[present] + offset, [by_dose[doses[i]]["auroc"] for i in present], "o-", label=LABELS.get(arm, arm))
    left.axhline(0, color="grey", lw=0.8)
    left.set(
        xticks=x, xticklabels=doses, ylabel="test Dice − baseline (points)", title="Gain over the λ-tuned baseline"
    )
    right.axhline(0.5, color="grey", lw=0.8, ls="--")
    right.set(
        xticks=x, xticklabels=doses, ylabel="AUROC of 1 − Ŝ", title="Does the score fall where correspondence is lost?"
    )
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=25)
    left.legend(fontsize=7)
    fig.savefig(out / "dose_response.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and the report")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--doses", nargs="+", default=list(DOSES), choices=list(DOSES))
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    parser.add_argument("--epochs", type=int, default=30, help="backbone epochs of every training")
    parser.add_argument("--accelerator", default="cpu", help="cpu, gpu or auto (Lightning's)")
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from the runs on disk; train nothing"
    )
    parser.add_argument(
        "--lambda-seeds",
        type=int,
        nargs="+",
        default=None,
        help="search λ on these seeds only (their validation pairs choose it), train the other seeds at the chosen λ, "
        "and report every seed trained at it",
    )
    parser.add_argument("--workers", type=int, default=1, help="trainings at once, one thread each")
    parser.add_argument(
        "--extend-rounds", type=int, default=None, help="extend the λ grids at most this often (default: until inside)"
    )
    parser.add_argument("--tiny", action="store_true", help="tiny sizes and one λ step: checks the pipeline in seconds")
    args = parser.parse_args(argv)
    b = {**budget(args.tiny, args.epochs), "accelerator": args.accelerator}
    arms = ["baseline", *[a for a in args.arms if a != "baseline"]]
    grid, start = ((START[0],), (START[0],)) if args.tiny else (LAMBDAS, START)
    if not args.report_only:
        searched = args.lambda_seeds or args.seeds
        grids = choose_lambdas(args.out, args.doses, arms, searched, b, args.workers, grid, start, args.extend_rounds)
        if args.lambda_seeds:  # the other seeds train at the λ the search chose, only
            chosen = {key: chosen_lambda(args.out, *key, searched, lams) for key, lams in grids.items()}
            others = [s for s in args.seeds if s not in searched]
            run_all([(args.out, *key, lam, s, b) for key, lam in chosen.items() for s in others], args.workers)
    grids, seeds = runs_on_disk(args.out, args.doses, arms, args.seeds)
    rows = []
    for dose in args.doses:
        usable = [a for a in arms if (dose, a) in grids]
        if "baseline" not in usable:
            continue
        common = sorted(set.intersection(*(set(seeds[(dose, a)]) for a in usable)))
        chooser = args.lambda_seeds or common
        if not common or not set(chooser) <= set(common):
            continue
        chosen = {arm: chosen_lambda(args.out, dose, arm, chooser, grids[(dose, arm)]) for arm in usable}
        # Reported on every seed that has each arm's chosen λ (λ chosen on the chooser seeds' validation pairs).
        tested = [s for s in args.seeds if all(run_path(args.out, dose, a, chosen[a], s).exists() for a in usable)]
        rows += compare(args.out, dose, chosen, tested, b)
    write_report(args.out, rows, grids, args.seeds, b, args.lambda_seeds)


def runs_on_disk(out: Path, doses, arms, seeds) -> tuple[dict, dict]:
    """The λ grid of each (dose, arm) from the runs on disk, and the seeds every λ of it has."""
    grids, complete = {}, {}
    for dose in doses:
        for arm in arms:
            tried = sorted({lam for lam in LAMBDAS for s in seeds if run_path(out, dose, arm, lam, s).exists()})
            have = [s for s in seeds if tried and all(run_path(out, dose, arm, lam, s).exists() for lam in tried)]
            if have:
                grids[(dose, arm)], complete[(dose, arm)] = tried, have
    return grids, complete


if __name__ == "__main__":
    main()
