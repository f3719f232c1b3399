"""Comparison across runs: per-run summaries, the paper's backbone × method table and paired tests.

Rows are the per-case rows of :func:`~adacs_lightning.evaluation.report.evaluate_run` (one per run
and case); metrics are fractions (Dice) or mm (distances), as :mod:`.cases` measures them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import AdaCSError
from .cases import MECHANISM, METRICS
from .stats import mean_std, paired_test
from .tables import TABLE_COLUMNS

#: Metrics tested between methods (paired by case).
COMPARED = ("dice", "hd95", "hd", "asd", "folding_pct")


def summarise(cases: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sample std of each metric per run: one row per run (columns ``<metric>_mean``/``_std``, ``n``)."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in cases:
        groups[row["run"]].append(row)
    rows = []
    for members in groups.values():
        first = members[0]
        row = {k: first.get(k) for k in ("run", "backbone", "method", "seed", "similarity", "data")}
        row["n"] = len(members)
        for metric in ("dice_initial", *METRICS, *MECHANISM):
            row[f"{metric}_mean"], row[f"{metric}_std"], _ = mean_std([m.get(metric, math.nan) for m in members])
        rows.append(row)
    return rows


def compare(
    cases: Sequence[Mapping[str, Any]], reference: str | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The paper's table (one row per backbone × method) and paired tests, over distinct cases.

    A case is a ``(data key, case id)``. Within each backbone × method, the rows of one case
    (one per run, i.e. per seed) are first averaged, so that a case counts once however many
    seeds evaluated it: the table's ``n`` and the tests' ``n`` are numbers of distinct cases.
    The table gives mean ± std over these case averages (``runs``: the runs pooled). Within each
    backbone every method is compared with ``baseline`` (or, without one, the backbone's first
    method), paired by case; when no backbone has two methods, every group is compared with the
    first. Differences are ``method − reference``.
    """
    groups, runs = _by_group(cases)
    # Rows grouped by backbone (in the order they first appear), the baseline first within each.
    backbone_order = {backbone: i for i, backbone in reversed(list(enumerate(g[0] for g in groups)))}
    ordered = sorted(groups, key=lambda g: (backbone_order[g[0]], g[1] != "baseline", g[1]))
    averaged = {
        group: {case: _seed_average(list(seeds.values())) for case, seeds in groups[group].items()} for group in ordered
    }
    table = []
    for (backbone, method), members in averaged.items():
        row = {"backbone": backbone, "method": method, "runs": len(runs[(backbone, method)]), "n": len(members)}
        for metric in (*TABLE_COLUMNS, *MECHANISM):
            row[f"{metric}_mean"], row[f"{metric}_std"], _ = mean_std([m[metric] for m in members.values()])
        table.append(row)
    tests = []
    for reference_group, other in _comparisons(list(averaged), reference):
        keys = [k for k in averaged[reference_group] if k in averaged[other]]
        for metric in COMPARED:
            a = [averaged[reference_group][k][metric] for k in keys]
            b = [averaged[other][k][metric] for k in keys]
            result = paired_test(a, b)
            tests.append(
                {
                    "backbone": other[0],
                    "method": other[1],
                    "reference": f"{reference_group[0]}/{reference_group[1]}"
                    if reference_group[0] != other[0]
                    else reference_group[1],
                    "metric": metric,
                    "better": METRICS[metric],
                    **vars(result),
                }
            )
    return table, tests


def _by_group(cases: Sequence[Mapping[str, Any]]):
    """``(groups, runs)``: per (backbone, method), each case's rows keyed by seed, and the runs pooled.

    ``groups[(backbone, method)][(data key, case id)][seed]`` is a row; a seed that evaluated
    one case twice (the same backbone/method/seed given twice) is an error.
    """
    groups: dict[tuple[str, str], dict[tuple[str, str], dict[Any, Mapping[str, Any]]]] = {}
    runs: dict[tuple[str, str], set] = defaultdict(set)
    for row in cases:
        group = (row["backbone"], row["method"])
        seeds = groups.setdefault(group, {}).setdefault((row["data"], row["case_id"]), {})
        seed = row["run"] if row.get("seed") is None else row["seed"]  # a bare checkpoint has no seed
        if seed in seeds:
            raise AdaCSError(
                f"Two runs of {row['backbone']}/{row['method']} with seed {seed} ({row['run']} and "
                f"{seeds[seed]['run']}) were evaluated on case {row['case_id']} of the same data: give each "
                "backbone/method/seed once."
            )
        seeds[seed] = row
        runs[group].add(row["run"])
    return groups, runs


def _seed_average(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The mean of each table metric over the rows (runs) of one case, NaN values left out."""
    return {metric: mean_std([r.get(metric, math.nan) for r in rows])[0] for metric in (*TABLE_COLUMNS, *MECHANISM)}


def _comparisons(
    groups: list[tuple[str, str]], reference: str | None = None
) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """Which groups (backbone, method label) are tested against which.

    With ``reference`` (a method label, or ``backbone/label``), every group against that one;
    otherwise, within each backbone, every method against the baseline's run (its label's first word is
    ``baseline``, whatever overrides follow) or, without one, the first run; each test names its reference.
    """
    if reference is not None:
        matches = [g for g in groups if reference in (g[1], f"{g[0]}/{g[1]}")]
        if not matches:
            labels = ", ".join(sorted({g[1] for g in groups}))
            raise AdaCSError(f"--reference '{reference}' names none of the runs' labels: {labels}.")
        return [
            (next(m for m in matches if m[0] == g[0]) if any(m[0] == g[0] for m in matches) else matches[0], g)
            for g in groups
            if g not in matches
        ]
    by_backbone: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for group in groups:
        by_backbone[group[0]].append(group)
    pairs = []
    for members in by_backbone.values():
        # The baseline's run, whatever overrides its label carries after the method ("baseline method.lam=0.01").
        baselines = [g for g in members if g[1].split()[0] == "baseline"]
        anchor = baselines[0] if baselines else members[0]
        pairs += [(anchor, g) for g in members if g != anchor]
    if not pairs and len(groups) > 1:
        pairs = [(groups[0], g) for g in groups[1:]]
    return pairs
