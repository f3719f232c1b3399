"""Does refinement help, and does AdaCS's score map help refinement? Network vs plain vs score-weighted refinement.

On the synthetic pairs of the dose-response study (``benchmarks/dose_response.py``; a data setting
from it, e.g. ``moderate``: echo-like pairs with target-only corruptions), one AdaCS run per seed is
trained (or read back from ``<out>/models``), then every test pair is registered three ways at equal
steps: the network alone, refinement with ``Ŝ ≡ 1`` (plain) and refinement weighted by the run's score
map (score). Dice, HD95 and folding per case; each refined arm against the network and score against
plain, paired over (seed, case) with t and Wilcoxon tests, Holm-corrected over the three comparisons.

    python benchmarks/refine_study.py --out refine_study                  # minutes on 2 CPU cores
    python benchmarks/refine_study.py --out /tmp/rs --tiny                # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dose_response as study  # noqa: E402

from adacs_lightning.data.phantom import MYOCARDIUM  # noqa: E402
from adacs_lightning.evaluation.cases import case_metrics  # noqa: E402
from adacs_lightning.evaluation.stats import paired_test  # noqa: E402
from adacs_lightning.refine import Refiner  # noqa: E402

ARMS = ("network", "plain", "score")
COMPARISONS = (("network", "plain"), ("network", "score"), ("plain", "score"))


def trained(out: Path, dose: str, arm: str, lam: float, seed: int, b: dict):
    """The study's AdaCS model for ``seed``, trained once and kept under ``<out>/models``."""
    path = out / "models" / f"{dose}__{arm}__lam{lam:g}__s{seed}.pt"
    L.seed_everything(seed, verbose=False)
    model = study.build(arm, lam, b, dose)
    data = study.datamodule(dose, seed, b)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
    else:
        trainer = L.Trainer(
            max_epochs=b["epochs"] + model.backbone_idle_epochs, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0,
        )  # fmt: skip
        trainer.fit(model, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    data.setup("test")
    return model.eval(), data


def evaluate(model, data, steps: int, lr: float, grid: int, seed: int) -> list[dict]:
    refiners = {
        "plain": Refiner.from_module(model, "none", steps=steps, lr=lr, grid=grid),
        "score": Refiner.from_module(model, "score", steps=steps, lr=lr, grid=grid),
    }
    rows = []
    for batch in data.test_dataloader():
        with torch.no_grad():
            network = model.backbone(batch["source"], batch["target"])
        fields = {"network": network}
        for arm, refiner in refiners.items():
            fields[arm] = refiner.refine(batch["source"], batch["target"], network, batch.get("mask")).ddf
        for i, case in enumerate(batch["meta"]["case_id"]):
            mask = None if batch.get("mask") is None else batch["mask"][i : i + 1]
            for arm, ddf in fields.items():
                metrics = case_metrics(
                    ddf[i : i + 1], batch["source_label"][i : i + 1], batch["target_label"][i : i + 1],
                    [MYOCARDIUM], {MYOCARDIUM: "myocardium"}, None, mask,
                )  # fmt: skip
                rows.append({"seed": seed, "case": case, "arm": arm, **metrics})
    return rows


def report(rows: list[dict], out: Path, header: str) -> str:
    by_arm = {arm: {(r["seed"], r["case"]): r for r in rows if r["arm"] == arm} for arm in ARMS}
    keys = sorted(by_arm["network"])
    lines = [header, "", "| arm | Dice (%) | HD95 (mm) | folding (%) |", "|---|---|---|---|"]
    for arm in ARMS:
        values = {m: [by_arm[arm][k][m] for k in keys] for m in ("dice", "hd95", "folding_pct")}
        lines.append(
            f"| {arm} | {100 * np.nanmean(values['dice']):.2f} | {np.nanmean(values['hd95']):.2f} | "
            f"{np.nanmean(values['folding_pct']):.3f} |"
        )
    tests = []
    for a, b in COMPARISONS:
        for metric, scale in (("dice", 100.0), ("hd95", 1.0)):
            test = paired_test(
                [by_arm[a][k][metric] * scale for k in keys], [by_arm[b][k][metric] * scale for k in keys]
            )
            tests.append({"a": a, "b": b, "metric": metric, **vars(test)})
    for metric in ("dice", "hd95"):
        group = [t for t in tests if t["metric"] == metric]
        for key in ("t_pvalue", "wilcoxon_pvalue"):
            for t, p in zip(group, study.holm([t[key] for t in group])):
                t[f"{key}_holm"] = p
    lines += [
        "",
        "| comparison | metric | pairs | mean difference (b − a) | t p (Holm) | Wilcoxon p (Holm) |",
        "|---|---|---|---|---|---|",
    ]
    for t in tests:
        lines.append(
            f"| {t['b']} vs {t['a']} | {t['metric']} | {t['n']} | {t['mean_difference']:+.3f} | "
            f"{study.fmt(t['t_pvalue_holm'], 3)} | {study.fmt(t['wilcoxon_pvalue_holm'], 3)} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "tests": tests}, default=_plain))
    return text


def _plain(value):
    return None if isinstance(value, float) and math.isnan(value) else float(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dose", default="moderate", choices=list(study.DOSES))
    parser.add_argument("--arm", default="shift_min", choices=[a for a in study.ARMS if a != "baseline"])
    parser.add_argument("--lam", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    b = study.budget(args.tiny)
    rows = []
    for seed in args.seeds:
        model, data = trained(args.out, args.dose, args.arm, args.lam, seed, b)
        rows += evaluate(model, data, args.steps, args.lr, args.grid, seed)
    header = (
        f"# Refinement: network vs plain vs score-weighted ({args.dose} pairs, {b['size']}², {args.arm} λ = {args.lam:g}, "
        f"{args.steps} steps, lr {args.lr:g}, grid {args.grid}, seeds {args.seeds}, {b['test']} test pairs each)"
    )
    print(report(rows, args.out, header))


if __name__ == "__main__":
    main()
