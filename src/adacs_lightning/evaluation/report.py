"""Evaluating runs on their test pairs and writing per-case, summary and comparison reports."""

from __future__ import annotations

import logging
import math
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from tqdm.auto import tqdm

from ..checkpoint import load_backbone, load_method
from ..errors import AdaCSError, ConfigError
from .axes import arm_label, arm_overrides, axis_markdown, axis_tables, parameter_plot
from .cases import MECHANISM, METRICS, CaseEvaluator, iterate_pairs
from .runs import Run, data_config, data_key
from .stats import mean_std, paired_test
from .tables import format_mean_std, format_p, markdown_table, write_csv

log = logging.getLogger("adacs_lightning")

# The paper's table: Dice (%), HD95 and ASD (mm); folding and time for reference.
TABLE_COLUMNS = {
    "dice": ("Dice (%) ↑", 100.0),
    "hd95": ("HD95 (mm) ↓", 1.0),
    "asd": ("ASD (mm) ↓", 1.0),
    "hd": ("HD (mm) ↓", 1.0),
    "folding_pct": ("folding (%) ↓", 1.0),
    "time_ms": ("time (ms)", 1.0),
}
COMPARED = ("dice", "hd95", "hd", "asd", "folding_pct")


@dataclass
class Report:
    """What :func:`evaluate` wrote and computed."""

    cases: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    table: list[dict[str, Any]] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ConfigError("device", f"'{device}' is not a device ({error}).", "Use auto, cpu or cuda.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA is not available on this machine.", "Use --device cpu.")
    return resolved


def evaluate_run(
    run: Run,
    data: Mapping[str, Any],
    labels: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    split: str = "test",
    max_cases: int | None = None,
    figures: int = 0,
    figure_dir: Path | None = None,
    refine: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Register every pair of ``split`` with the run's backbone; one row of metrics per case.

    ``refine`` (``steps``, and optionally ``weights``, ``lr``, ``grid``: see :class:`~adacs_lightning.refine.Refiner`)
    adds a second row per case, the refined displacement's, under the method ``<method>+refine<steps>``.

    Rows start with ``run``, ``backbone``, ``method``, ``seed``, ``data`` (the data key) and the
    columns of :class:`~adacs_lightning.evaluation.cases.CaseEvaluator`. With ``figures > 0``
    the first ``figures`` cases are drawn in the Figure 4 layout to ``figure_dir/<case>.png``.
    """
    datamodule = _build_datamodule(data)
    loader = _loader(datamodule, split)
    labels = list(labels or getattr(datamodule, "eval_labels", None) or [])
    pairs = iterate_pairs(loader)
    first = next(pairs, None)
    if first is None:
        raise AdaCSError(f"The '{split}' split of the data has no pairs to evaluate.")
    pairs = iter([first, *pairs])
    if not labels:
        labels = [int(v) for v in torch.unique(first["target_label"]).tolist() if v != 0]
    names = dict(getattr(datamodule, "label_names", None) or {})
    backbone = load_backbone(run.checkpoint, map_location="cpu")
    # The whole model, for its weight map against the data's no-correspondence masks and for figures.
    wanted = figures > 0 or first.get("nocorr") is not None or refine is not None
    whole = _figure_model(run, backbone) if wanted else backbone
    weighting = whole if whole is not backbone else None
    evaluator = CaseEvaluator(whole.backbone if weighting is not None else backbone, labels, names, device, weighting)
    head = {
        "run": run.label,
        "backbone": run.backbone,
        "method": run.method,
        "seed": run.seed,
        "similarity": run.similarity,
        "data": data_key(data, split),
    }
    figure_model = whole if figures > 0 else None
    refiner, refined_head = None, None
    if refine is not None:
        refiner, refined_head = _refiner(run, whole, backbone, refine, evaluator.device), dict(head)
        refined_head.update(run=f"{run.label}+refine", method=f"{run.method}+refine{refine['steps']}")
    rows = []
    total = min(len(loader.dataset), max_cases or len(loader.dataset))
    bar = tqdm(
        islice(pairs, max_cases),
        total=total,
        desc=f"Evaluating {run.label}",
        unit="case",
        disable=not sys.stderr.isatty(),
    )
    for index, pair in enumerate(bar):
        try:
            rows.append({**head, **evaluator.evaluate(pair)})
            if refiner is not None:
                rows.append({**refined_head, **evaluator.evaluate(pair, refiner)})
        except (ValueError, RuntimeError) as error:  # the network cannot take these images
            raise AdaCSError(
                f"{run.label} could not register case {pair.get('case_id', index)} of the {split} pairs: "
                f"{str(error).splitlines()[0]}"
            ) from error
        if figure_model is not None and index < figures and figure_dir is not None:
            _save_case_figure(figure_model, pair, figure_dir, evaluator.device, split)
    if not rows:
        raise AdaCSError(f"The '{split}' split of the data has no pairs to evaluate.")
    log.info("%s: %d cases, Dice %.4f", run.label, len(rows), mean_std([r["dice"] for r in rows])[0])
    return rows


def _build_datamodule(data: Mapping[str, Any]):
    try:
        return instantiate(dict(data), _convert_="all")
    except Exception as error:
        cause = error.__cause__ or error
        raise ConfigError(
            "data", f"could not be built ({type(cause).__name__}: {cause}).", "Check the data config."
        ) from cause


def _loader(datamodule, split: str):
    datamodule.setup({"test": "test", "val": "validate", "train": "fit"}.get(split, split))
    getter = getattr(datamodule, f"{split}_dataloader", None)
    if getter is None:
        raise ConfigError("split", f"the data module has no '{split}' split.", "Use --split test or val.")
    return getter()


def _refiner(run: Run, whole, backbone, refine: Mapping[str, Any], device):
    """The run's objective for refinement; the run must be rebuildable (a run folder with its config)."""
    from ..refine import Refiner

    if whole is backbone:
        raise AdaCSError(
            f"--refine needs the run folder of {run.label} to rebuild its objective (similarity, λ, scorer)."
        )
    has_scorer = getattr(whole, "scorer", None) is not None
    weights = refine.get("weights") or ("score" if has_scorer else "none")
    if weights == "score" and not has_scorer:
        weights = "none"  # a run without a score map refines with Ŝ ≡ 1
    settings = {k: refine[k] for k in ("lr", "grid") if refine.get(k) is not None}
    refiner = Refiner.from_module(whole, weights, steps=int(refine["steps"]), **settings)
    if refiner.scorer is not None:
        refiner.scorer.to(device)
    return refiner


def _figure_model(run: Run, backbone: torch.nn.Module):
    """The whole trained model (with its scorer or variance network) for figures; the backbone if not rebuildable."""
    if run.config is None or not str(run.checkpoint).endswith(".ckpt"):
        return backbone
    try:
        model = load_method(run.checkpoint, run.config)
        return model.to(backbone.parameters().__next__().device).eval()
    except Exception as error:  # figures only: fall back to the backbone's panels
        log.warning(
            "%s: no score map for figures or localisation: the model could not be rebuilt (%s).", run.label, error
        )
        return backbone


def _save_case_figure(model, pair: Mapping[str, Any], folder: Path, device: torch.device, split: str) -> None:
    from ..figures import registration_figure, save_png

    batch = {
        k: v.to(device) for k, v in pair.items() if isinstance(v, torch.Tensor) and k not in ("spacing", "direction")
    }
    meta = {"case_id": [pair["case_id"]]}
    for key in ("spacing", "direction"):
        if pair.get(key) is not None:
            meta[key] = pair[key][None]
    image = registration_figure(
        model, {**batch, "meta": meta}, max_pairs=1, split={"val": "validation"}.get(split, split)
    )
    save_png(image, folder / f"{pair['case_id']}.png")


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


def summary_markdown(summary: Sequence[Mapping[str, Any]]) -> str:
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
        text += (
            "\n## Paired differences\n\nEach case averaged over the seeds of its backbone × method, then paired by "
            "data set and case id (pairs: n, the number of distinct cases); difference = method − reference "
            "(↑: positive is better, ↓: negative is better); two-sided p-values of the paired t-test and the "
            "Wilcoxon signed-rank test (SciPy).\n\n" + markdown_table(header, rows)
        )
    return text


def _signed(value: float) -> str:
    return "–" if value != value else f"{value:+.3f}"


def evaluate(
    paths: Sequence[str | Path],
    output: str | Path | None = None,
    data: str | None = None,
    overrides: Sequence[str] = (),
    labels: Sequence[int] | None = None,
    device: str = "auto",
    split: str = "test",
    max_cases: int | None = None,
    figures: int = 2,
    skip_missing: bool = False,
    checkpoint: str = "selected",
    reference: str | None = None,
    refine: Mapping[str, Any] | None = None,
) -> Report:
    """Evaluate runs (folders or checkpoints) and write the reports to ``output``.

    Writes ``cases.csv`` (one row per run and case), ``summary.csv``/``summary.md`` (mean ± std
    per run), with two or more runs ``comparison.csv``/``comparison.md`` (backbone × method table
    and paired tests) and ``paired_tests.csv``, and Figure 4 panels of the first ``figures`` cases
    of each run under ``figures/``. ``output`` defaults to ``<run>/evaluation`` for one run and to
    ``evaluation/`` in the runs' common folder for several. ``skip_missing`` skips run folders
    without a checkpoint (a failed job of a sweep) instead of stopping. ``checkpoint`` picks a run
    folder's checkpoint: ``selected`` (the run's ``final_checkpoint``), ``best`` or ``last``.

    Runs of a sweep are labelled by the overrides that differ between them (``adacs method.alpha=0.04``);
    ``axes.md`` tabulates each varying key, and ``parameter.png`` plots Dice against it when one
    numeric key varies. ``reference`` (a label) is the arm every other is tested against. ``refine``
    (see :func:`evaluate_run`) adds each run's refined arm beside its network-only one.
    """
    from .runs import resolve_run

    if not paths:
        raise AdaCSError("Nothing to evaluate: give one or more run folders or checkpoints.")
    resolved = []
    for path in paths:
        try:
            resolved.append(resolve_run(path, checkpoint))
        except AdaCSError as error:
            if not skip_missing:
                raise
            log.warning("Skipped %s: %s", path, error)
    if not resolved:
        raise AdaCSError("None of the runs has a checkpoint to evaluate.")
    output = Path(output) if output is not None else _default_output(resolved)
    target = resolve_device(device)
    axes = arm_overrides([run.folder for run in resolved]) if len(resolved) > 1 else [{} for _ in resolved]
    for run, extra in zip(resolved, axes):
        run.method = arm_label(run.method, extra)
    cases = []
    if len({run.label for run in resolved}) < len(resolved):  # e.g. one config trained twice
        for run in resolved:
            run.name = f"{run.label}@{(run.folder or run.checkpoint.parent).name}"
    for run in resolved:
        config = data_config(run, data, list(overrides), output_dir=output / "data" / _safe(run.label))
        figure_dir = output / "figures" / _safe(run.label)
        cases += evaluate_run(run, config, labels, target, split, max_cases, figures, figure_dir, refine)
    report = Report(cases, summarise(cases))
    if len(resolved) > 1 or refine is not None:
        report.table, report.tests = compare(cases, reference)
    report.files.update(write_reports(report, output))
    report.files.update(_write_axes(cases, {run.label: extra for run, extra in zip(resolved, axes)}, output, split))
    return report


def _write_axes(
    cases: Sequence[Mapping[str, Any]], axes: Mapping[str, Mapping[str, str]], output: Path, split: str = "test"
) -> dict[str, Path]:
    """``axes.md`` (a table per varying key, over cases) and, for one numeric key, ``parameter.png`` (Dice)."""
    rows = [{**case, "axes": axes.get(case["run"], {})} for case in cases]
    metrics = {m: TABLE_COLUMNS[m] for m in ("dice", "hd95", "asd", "folding_pct")}
    tables = axis_tables(rows, list(metrics))
    if not tables:
        return {}
    files = {"axes_md": output / "axes.md"}
    files["axes_md"].write_text(axis_markdown(tables, metrics))
    if len(tables) == 1:
        (table,) = tables.values()
        plot = parameter_plot(table, "dice", f"{split} Dice (%)", output / "parameter.png", scale=100.0)
        if plot is not None:
            files["parameter_plot"] = plot
    return files


def write_reports(report: Report, output: Path) -> dict[str, Path]:
    """Write the cases, the per-run summary and, when there is one, the comparison; returns the files."""
    files = {"cases": write_csv(report.cases, output / "cases.csv")}
    files["summary"] = write_csv(report.summary, output / "summary.csv")
    files["summary_md"] = output / "summary.md"
    files["summary_md"].write_text(summary_markdown(report.summary))
    if report.table:
        files["comparison"] = write_csv(report.table, output / "comparison.csv")
        if report.tests:
            files["paired_tests"] = write_csv(report.tests, output / "paired_tests.csv")
        files["comparison_md"] = output / "comparison.md"
        files["comparison_md"].write_text(comparison_markdown(report.table, report.tests))
    return files


def _default_output(runs: Sequence[Run]) -> Path:
    folders = [(run.folder or run.checkpoint.parent).resolve() for run in runs]
    if len(folders) == 1:
        return folders[0] / "evaluation"
    common = Path(*Path(folders[0]).parts[: _common_prefix([f.parts for f in folders])])
    return common / "evaluation"


def _common_prefix(parts: list[tuple[str, ...]]) -> int:
    length = 0
    for items in zip(*parts):
        if len(set(items)) > 1:
            break
        length += 1
    return length


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
