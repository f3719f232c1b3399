"""Sweeps read back: runs labelled by what differs between them, a table per sweep axis, a parameter plot.

A sweep's runs differ in the overrides Hydra recorded (``.hydra/overrides.yaml``), e.g.
``method.alpha=0.01`` against ``method.alpha=0.04``. Those differences (the seed aside) label the
runs, so that a hyper-parameter sweep compares like for like; each varying key is an *axis*.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..configs import run_setting
from ..figures import save_figure
from .runs import differing_overrides
from .stats import mean_std
from .tables import format_mean_std, markdown_table

#: Keys that never label an arm: the seed (runs of one arm differ in it) and output folders.
NOT_AXES = ("seed", "hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "ckpt_path", "overwrite")


def arm_overrides(folders: Sequence[Path | None]) -> list[dict[str, str]]:
    """Per run, the overrides that differ between the runs (seed and folders aside), as ``key → value``."""
    return [dict(item.split("=", 1) for item in extra) for extra in differing_overrides(folders, ignore=NOT_AXES)]


def arm_label(method: str, overrides: Mapping[str, str]) -> str:
    """``method`` followed by the differing overrides other than the method choice, e.g. ``adacs method.alpha=0.04``."""
    return " ".join([method, *(f"{k}={v}" for k, v in overrides.items() if k != "method")])


def axis_tables(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """For each axis (a key varying over ``rows``), the mean ± std of ``metrics`` at each of its values.

    ``rows`` are per-run (or per-case) dicts holding ``axes`` (key → value) and the metrics; values
    are sorted numerically when they are numbers.
    """
    keys = sorted({k for row in rows for k in row.get("axes", {})})
    tables = {}
    for key in keys:
        groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for row in rows:
            if key in row.get("axes", {}):
                groups[row["axes"][key]].append(row)
        if len(groups) < 2:
            continue
        table = []
        for value in sorted(groups, key=_sort_key):
            entry: dict[str, Any] = {"axis": key, "value": value, "n": len(groups[value])}
            for metric in metrics:
                entry[f"{metric}_mean"], entry[f"{metric}_std"], _ = mean_std([r[metric] for r in groups[value]])
            table.append(entry)
        tables[key] = table
    return tables


def _sort_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def axis_markdown(
    tables: Mapping[str, Sequence[Mapping[str, Any]]], metrics: Mapping[str, tuple[str, float]], digits: int = 2
) -> str:
    """One Markdown table per axis: its values, the runs or cases at each, and each metric's mean ± std."""
    text = "# Sweep axes\n\nEach table pools every run (and its cases) at one value of the axis.\n"
    for key, table in tables.items():
        header = [key, "n", *(name for name, _ in metrics.values())]
        body = [
            [
                row["value"],
                row["n"],
                *(
                    format_mean_std(row[f"{m}_mean"], row[f"{m}_std"], scale, digits)
                    for m, (_, scale) in metrics.items()
                ),
            ]
            for row in table
        ]
        text += f"\n## {key}\n\n" + markdown_table(header, body)
    return text


def parameter_plot(
    table: Sequence[Mapping[str, Any]], metric: str, label: str, path: Path, scale: float = 1.0
) -> Path | None:
    """Mean ± std of ``metric`` against a numeric axis (one sweep axis); None when its values are not numbers."""
    try:
        xs = [float(row["value"]) for row in table]
    except ValueError:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [scale * row[f"{metric}_mean"] for row in table]
    stds = [scale * (row[f"{metric}_std"] if math.isfinite(row[f"{metric}_std"]) else 0.0) for row in table]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3)
    positive = all(x > 0 for x in xs)
    if positive and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set(xlabel=table[0]["axis"], ylabel=label, title=f"{label} against {table[0]['axis']} (mean ± std)")
    fig.tight_layout()
    return save_figure(fig, path)


def sweep_rows(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per finished run of a sweep: its label, axes and final validation metrics (``summary.json``)."""
    finished = [f for f in folders if (f / "summary.json").is_file()]
    rows = []
    for folder, overrides in zip(finished, arm_overrides(finished)):
        summary = json.loads((folder / "summary.json").read_text())
        metrics = {k.removeprefix("val/"): v for k, v in summary.get("metrics", {}).items() if k.startswith("val/")}
        label = " ".join(f"{k}={v}" for k, v in overrides.items()) or folder.name
        rows.append(
            {"run": folder.name, "label": label, "seed": _seed(folder), "axes": overrides, **metrics,
             "best": summary.get("best_score")}
        )  # fmt: skip
    return rows


def _seed(folder: Path) -> int | None:
    """The run's seed (its ``.hydra/config.yaml``): runs of one arm differ only in it."""
    seed = run_setting(folder, "seed")
    return None if seed is None else int(seed)
