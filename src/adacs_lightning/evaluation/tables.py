"""Per-case rows → CSV files, and the Markdown tables of the evaluation reports.

The report tables (:func:`summary_markdown`, :func:`comparison_markdown`) take the rows of
:mod:`.compare`: ``<metric>_mean``/``_std`` with Dice as a fraction (shown in %) and distances in mm.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The paper's table: Dice (%), HD95 and ASD (mm); folding and time for reference.
#: Metric → (heading, scale from the stored unit to the shown one).
TABLE_COLUMNS = {
    "dice": ("Dice (%) ↑", 100.0),
    "hd95": ("HD95 (mm) ↓", 1.0),
    "asd": ("ASD (mm) ↓", 1.0),
    "hd": ("HD (mm) ↓", 1.0),
    "folding_pct": ("folding (%) ↓", 1.0),
    "time_ms": ("time (ms)", 1.0),
}

#: Columns of the mechanism table: (heading, scale).
MECHANISM_COLUMNS = {
    "kept_mass": ("kept mass Σ Ŝr/Σ r", 1.0),
    "score_mean": ("mean Ŝ", 1.0),
    "auroc": ("AUROC of 1 − Ŝ ↑", 1.0),
    "score_nocorr": ("Ŝ where no correspondence", 1.0),
    "score_corr": ("Ŝ elsewhere", 1.0),
    "dice_near": ("Dice near it (%) ↑", 100.0),
    "dice_away": ("Dice away from it (%) ↑", 100.0),
}


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` (dicts) to ``path``; floats as written by ``repr``.

    ``columns`` is the header (written even without rows); by default the rows' keys in order of
    first appearance.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; ``|`` inside cells is escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_mean_std(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` (each times ``scale``); ``–`` for NaN; the std left out when undefined."""
    if not math.isfinite(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if math.isfinite(std) else text


def format_p(p: float) -> str:
    """A p-value in three significant digits, ``< 1e-4`` below that; ``–`` for NaN."""
    if not math.isfinite(p):
        return "–"
    return "< 1e-4" if p < 1e-4 else f"{p:.3g}"


def summary_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
    """``summary.md``: one row per run (rows of :func:`~adacs_lightning.evaluation.compare.summarise`)."""
    header = ["run", "cases", "Dice before (%)", *(name for name, _ in TABLE_COLUMNS.values())]
    rows = [
        [
            r["run"],
            r["n"],
            format_mean_std(r["dice_initial_mean"], r["dice_initial_std"], 100.0),
            *(format_mean_std(r[f"{m}_mean"], r[f"{m}_std"], scale) for m, (_, scale) in TABLE_COLUMNS.items()),
        ]
        for r in summary
    ]
    return "# Evaluation\n\nMean ± standard deviation over test cases.\n\n" + markdown_table(header, rows)


def mechanism_markdown(table: Sequence[Mapping[str, Any]]) -> str:
    """Where the test pairs mark voxels without correspondence: does the weight map fall there, and Dice near/away."""
    if not any(math.isfinite(r.get("dice_near_mean", math.nan)) for r in table):
        return ""
    header = ["backbone", "method", *(name for name, _ in MECHANISM_COLUMNS.values())]
    rows = [
        [r["backbone"], r["method"]]
        + [format_mean_std(r[f"{m}_mean"], r[f"{m}_std"], scale) for m, (_, scale) in MECHANISM_COLUMNS.items()]
        for r in table
    ]
    return (
        "\n\n## Where correspondence is lost\n\nThe test targets' no-correspondence masks: the AUROC of 1 − Ŝ as a "
        "detector of those voxels (0.5: chance), the mean score inside and outside them, and Dice within 3 voxels "
        "of them and away from them. Methods without a weight map show –.\n\n" + markdown_table(header, rows)
    )


def comparison_markdown(table: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]]) -> str:
    """``comparison.md``: the table and paired tests of :func:`~adacs_lightning.evaluation.compare.compare`."""
    paper = ("dice", "hd95", "asd", "folding_pct")
    header = ["backbone", "method", "runs", "cases", *(TABLE_COLUMNS[m][0] for m in paper)]
    rows = [
        [r["backbone"], r["method"], r["runs"], r["n"]]
        + [format_mean_std(r[f"{m}_mean"], r[f"{m}_std"], TABLE_COLUMNS[m][1]) for m in paper]
        for r in table
    ]
    counts = sorted({int(r["n"]) for r in table})
    n = "–" if not counts else f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    text = (
        f"# Comparison\n\nn = {n} distinct test cases per row (column cases). Mean ± standard deviation over "
        "these cases; a case evaluated by several runs (seeds) of a row counts once, its metrics first averaged "
        "over those runs (column runs).\n\n"
    )
    text += markdown_table(header, rows)
    text += mechanism_markdown(table)
    if tests:
        text += _tests_markdown(tests)
    return text


def _tests_markdown(tests: Sequence[Mapping[str, Any]]) -> str:
    header = ["backbone", "method", "vs", "metric", "pairs", "mean difference", "paired t-test p", "Wilcoxon p"]
    rows = [
        [
            t["backbone"],
            t["method"],
            t["reference"],
            TABLE_COLUMNS[t["metric"]][0],
            t["n"],
            _signed(t["mean_difference"] * TABLE_COLUMNS[t["metric"]][1]),
            format_p(t["t_pvalue"]),
            format_p(t["wilcoxon_pvalue"]),
        ]
        for t in tests
    ]
    return (
        "\n## Paired differences\n\nEach case averaged over the seeds of its backbone × method, then paired by "
        "data set and case id (pairs: n, the number of distinct cases); difference = method − reference "
        "(↑: positive is better, ↓: negative is better); two-sided p-values of the paired t-test and the "
        "Wilcoxon signed-rank test (SciPy).\n\n" + markdown_table(header, rows)
    )


def _signed(value: float) -> str:
    return "–" if value != value else f"{value:+.3f}"
