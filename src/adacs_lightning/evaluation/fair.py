"""A fair comparison of training methods: each at its own validation-best λ, equal budgets, paired tests.

The runs of a sweep over method × λ × seed (``adacs-train -m experiment=fair_comparison``) are read
back; for each backbone and method (an *arm*) the λ with the highest mean validation Dice over the
seeds is chosen, on validation pairs only. The arms are then evaluated at their chosen λ on the test
pairs (:func:`~adacs_lightning.evaluation.report.evaluate_run`) and compared case by case with the
baseline (paired t-test and Wilcoxon). The accuracy/smoothness trade-off of every arm and λ (validation
Dice against the displacement's mean squared gradient and folding) is drawn next to it.
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..devices import resolve_device
from ..errors import AdaCSError
from ..figures import save_figure
from .compare import compare, summarise
from .report import Report, evaluate_run, write_reports
from .runs import Run, data_config, differing_overrides, resolve_run
from .stats import mean_std
from .tables import format_mean_std, markdown_table, write_csv

log = logging.getLogger("adacs_lightning")

#: Validation metrics read from each run's summary.json (the localisation ones where the data marks its
#: no-correspondence voxels and the method has a weight map).
VALIDATION = {
    "dice": "val/dice",
    "smoothness": "val/smoothness",
    "folding_pct": "val/folding_pct",
    "auroc": "val/auroc",
    "score_nocorr": "val/score_nocorr",
    "score_corr": "val/score_corr",
}


@dataclass
class SweepRun:
    """One finished run of the sweep: its arm, λ, seed and final validation metrics."""

    run: Run
    arm: str
    lam: float
    validation: dict[str, float]


@dataclass
class FairReport:
    """What :func:`fair_comparison` chose, measured and wrote."""

    validation: list[dict[str, Any]]
    chosen: dict[tuple[str, str], float]
    edges: list[str] = field(default_factory=list)  # arms whose chosen λ sits at their grid's edge
    table: list[dict[str, Any]] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def sweep_runs(folders: Sequence[Path]) -> list[SweepRun]:
    """The runs among ``folders`` that finished (a ``summary.json`` with a validation Dice); others are skipped."""
    runs = []
    for folder in folders:
        summary_file = folder / "summary.json"
        if not summary_file.is_file():
            log.warning("Skipping %s: no summary.json (the run did not finish).", folder)
            continue
        metrics = json.loads(summary_file.read_text()).get("metrics", {})
        if VALIDATION["dice"] not in metrics:
            raise AdaCSError(
                f"{folder} has no validation Dice: the fair comparison chooses λ on the Dice of labelled "
                "validation pairs. Give the data set label maps for its validation and test pairs."
            )
        run = resolve_run(folder, checkpoint="selected")
        config = run.config
        lam = OmegaConf.select(config, "method.lam", default=None) if config is not None else None
        if lam is None:
            raise AdaCSError(f"{folder}: its method has no λ (method.lam) to compare over.")
        validation = {name: float(metrics.get(key, float("nan"))) for name, key in VALIDATION.items()}
        runs.append(SweepRun(run, run.method, float(lam), validation))
    if not runs:
        raise AdaCSError("No finished run to compare (no run folder with a summary.json).")
    for r, extra in zip(
        runs, differing_overrides([r.run.folder for r in runs], ignore=("method", "method.lam", "seed"))
    ):
        r.arm = " ".join([r.run.method, *extra])
    return runs


def validation_table(runs: Sequence[SweepRun]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of each validation metric, per backbone × arm × λ (rows sorted)."""
    groups: dict[tuple[str, str, float], list[SweepRun]] = defaultdict(list)
    for r in runs:
        groups[(r.run.backbone, r.arm, r.lam)].append(r)
    rows = []
    for (backbone, arm, lam), members in sorted(
        groups.items(), key=lambda g: (g[0][0], g[0][1] != "baseline", g[0][1], g[0][2])
    ):
        row: dict[str, Any] = {"backbone": backbone, "method": arm, "lam": lam, "seeds": len(members)}
        for name in VALIDATION:
            row[f"{name}_mean"], row[f"{name}_std"], _ = mean_std([m.validation[name] for m in members])
        rows.append(row)
    return rows


def choose_lambda(validation: Sequence[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """Per ``(backbone, method)``, the λ with the highest mean validation Dice (the smaller λ on a tie)."""
    chosen: dict[tuple[str, str], tuple[float, float]] = {}
    for row in validation:
        key, score = (row["backbone"], row["method"]), row["dice_mean"]
        best = chosen.get(key)
        if best is None or score > best[1] or (score == best[1] and row["lam"] < best[0]):
            chosen[key] = (row["lam"], score)
    return {key: lam for key, (lam, _) in chosen.items()}


def grid_edges(validation: Sequence[dict[str, Any]], chosen: dict[tuple[str, str], float]) -> list[str]:
    """One sentence per arm whose chosen λ is the smallest or largest it was run with (its optimum may lie beyond)."""
    tried: dict[tuple[str, str], list[float]] = defaultdict(list)
    for row in validation:
        tried[(row["backbone"], row["method"])].append(row["lam"])
    notes = []
    for key, lam in chosen.items():
        values = sorted(tried[key])
        if len(values) < 2 or values[0] < lam < values[-1]:
            continue
        side, direction = ("smallest", "smaller") if lam == values[0] else ("largest", "larger")
        notes.append(
            f"{key[0]}/{key[1]}: the chosen λ = {lam:g} is the {side} of its grid ({', '.join(f'{v:g}' for v in values)}); "
            f"its optimum may lie beyond: add a {direction} λ (e.g. method.lam={lam / 2.5 if side == 'smallest' else lam * 2.5:.3g}) for this method."
        )
    return notes


def fair_comparison(
    folders: Sequence[str | Path],
    output: str | Path,
    device: str = "auto",
    max_cases: int | None = None,
) -> FairReport:
    """Choose each arm's λ on validation Dice, evaluate the chosen runs on test pairs, compare with paired tests.

    Writes to ``output``: ``validation.csv``/``.md`` (every arm and λ), ``chosen.md`` (the λ per
    arm), ``cases.csv`` and ``comparison.csv``/``.md``, ``paired_tests.csv`` (at the chosen λ, against
    the baseline) and ``tradeoff.png`` (validation Dice against smoothness and folding).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    runs = sweep_runs([Path(f) for f in folders])
    validation = validation_table(runs)
    chosen = choose_lambda(validation)
    report = FairReport(validation, chosen, edges=grid_edges(validation, chosen))
    for note in report.edges:
        log.warning("λ at the grid's edge: %s", note)
    report.files["validation_csv"] = write_csv(validation, output / "validation.csv")
    report.files["validation_md"] = _write_validation_markdown(
        validation, chosen, output / "validation.md", report.edges
    )
    report.files["tradeoff"] = tradeoff_figure(validation, chosen, output / "tradeoff.png")

    resolved = resolve_device(device)
    cases = []
    for r in runs:
        if chosen[(r.run.backbone, r.arm)] != r.lam:
            continue
        r.run.method = r.arm
        r.run.name = f"{r.run.backbone}/{r.arm}/lam{r.lam:g}/seed{r.run.seed}"
        data = data_config(r.run, output_dir=output / "data")
        cases += evaluate_run(r.run, data, device=resolved, max_cases=max_cases)
    test = Report(cases, summarise(cases))
    test.table, test.tests = compare(cases)
    for row in test.table:
        row["lam"] = chosen[(row["backbone"], row["method"])]
    report.table, report.tests = test.table, test.tests
    report.files.update(write_reports(test, output))
    return report


def _write_validation_markdown(
    rows: Sequence[dict[str, Any]], chosen: dict, path: Path, edges: Sequence[str] = ()
) -> Path:
    localised = any(math.isfinite(row["auroc_mean"]) for row in rows)
    header = ["backbone", "method", "λ", "seeds", "val Dice (%) ↑", "mean ‖∇u‖² ↓", "folding (%) ↓"]
    header += ["AUROC of 1 − Ŝ ↑", "Ŝ in / out of no-corr."] * localised + ["chosen"]
    body = [
        [
            row["backbone"],
            row["method"],
            f"{row['lam']:g}",
            str(row["seeds"]),
            format_mean_std(row["dice_mean"], row["dice_std"], 100.0),
            format_mean_std(row["smoothness_mean"], row["smoothness_std"], 1.0, digits=4),
            format_mean_std(row["folding_pct_mean"], row["folding_pct_std"], 1.0),
            *(
                [
                    format_mean_std(row["auroc_mean"], row["auroc_std"], 1.0, digits=3),
                    f"{format_mean_std(row['score_nocorr_mean'], math.nan)} / {format_mean_std(row['score_corr_mean'], math.nan)}",
                ]
                if localised
                else []
            ),
            "✓" if chosen[(row["backbone"], row["method"])] == row["lam"] else "",
        ]
        for row in rows
    ]
    text = markdown_table(header, body)
    if edges:
        text += (
            "\n**λ at the grid's edge** (extend the grid for these arms):\n\n"
            + "\n".join(f"- {e}" for e in edges)
            + "\n"
        )
    path.write_text(text + "\n")
    return path


def draw_tradeoff(rows: Sequence[dict[str, Any]], chosen: dict):
    """Validation Dice against mean ‖∇u‖² and against folding %, one line per backbone × method over λ.

    When no run folds (every voxel has det J > 0), the folding panel is left out and the title says so,
    instead of stacking every point on x = 0. Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    lines: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        lines[(row["backbone"], row["method"])].append(row)
    folds = any(row["folding_pct_mean"] > 0 for row in rows)
    # Without folding the second panel would stack every point on x = 0: one panel, and the title says so.
    fig, axes = plt.subplots(1, 2 if folds else 1, figsize=(11 if folds else 6.5, 4.2), squeeze=False)
    axes = axes[0]
    for index, ((backbone, method), members) in enumerate(sorted(lines.items())):
        members = sorted(members, key=lambda r: r["lam"])
        label = f"{backbone} / {method}" if len({b for b, _ in lines}) > 1 else method
        style = dict(marker="o", linewidth=1.2, color=f"C{index % 10}", label=label)
        for ax, metric in zip(axes, ("smoothness", "folding_pct")):
            xs = [m[f"{metric}_mean"] for m in members]
            ys = [100.0 * m["dice_mean"] for m in members]
            ax.plot(xs, ys, **style)
            for x, y, m in zip(xs, ys, members):
                ax.annotate(f"λ={m['lam']:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
                if chosen[(backbone, method)] == m["lam"]:
                    ax.plot([x], [y], marker="*", markersize=13, color=style["color"], markeredgecolor="black")
    axes[0].set(xlabel="mean ‖∇u‖² of the displacement (voxels², validation)", ylabel="validation Dice (%)")
    axes[0].set_xscale("log")
    # Labels at 1, 2 and 5 × 10^k in plain numbers: the default minor labels (3×10⁻², 4×10⁻², …) overlap.
    axes[0].xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes[0].xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axes[0].xaxis.set_minor_formatter(ticker.NullFormatter())
    title = "accuracy against smoothness (★: λ chosen on validation)"
    if not folds:
        title += f"\nno folding in any of the {len(rows)} method × λ settings (every det J > 0)"
    axes[0].set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    if folds:
        axes[1].set_title("accuracy against folding", fontsize=9)
        axes[1].set(xlabel="folding: voxels with det J ≤ 0 (%, validation)", ylabel="validation Dice (%)")
    fig.tight_layout()
    return fig


def tradeoff_figure(rows: Sequence[dict[str, Any]], chosen: dict, path: Path) -> Path:
    """:func:`draw_tradeoff` written to ``path`` (PNG)."""
    return save_figure(draw_tradeoff(rows, chosen), path)


def selection_summary(report: FairReport) -> str:
    """The chosen λ per arm and the test table, as Markdown for logs."""
    lines = ["Chosen λ (validation Dice): " + ", ".join(f"{b}/{m}: {lam:g}" for (b, m), lam in report.chosen.items())]
    lines += [f"λ at the grid's edge: {note}" for note in report.edges]
    if "comparison_md" in report.files:
        lines.append(report.files["comparison_md"].read_text())
    return "\n".join(lines)


__all__ = [
    "FairReport",
    "choose_lambda",
    "fair_comparison",
    "grid_edges",
    "sweep_runs",
    "tradeoff_figure",
    "validation_table",
]
