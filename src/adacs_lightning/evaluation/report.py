"""Evaluating runs on their test pairs and writing per-case, summary and comparison reports."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from tqdm.auto import tqdm

from ..checkpoint import load_backbone, load_method
from ..devices import resolve_device
from ..errors import AdaCSError, ConfigError
from .axes import arm_label, arm_overrides, axis_markdown, axis_tables, parameter_plot
from .cases import CaseEvaluator, iterate_pairs
from .compare import compare, summarise
from .runs import Run, data_config, data_key
from .stats import mean_std
from .tables import TABLE_COLUMNS, comparison_markdown, summary_markdown, write_csv

log = logging.getLogger("adacs_lightning")


@dataclass
class Report:
    """What :func:`evaluate` wrote and computed."""

    cases: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    table: list[dict[str, Any]] = field(default_factory=list)
    tests: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class LoadedRun:
    """A run's trained networks, read once for evaluation.

    ``backbone`` is the registration network read from the checkpoint. ``module`` is the whole
    trained method (backbone with its scorer or variance network, similarity and λ), rebuilt
    from the run folder's config when asked for and possible; None otherwise (a bare checkpoint,
    ``backbone.pt``, or a model that could not be rebuilt). With it, the pairs are registered by
    its own backbone, its weight map is measured, it refines, and figures show its score map.
    """

    run: Run
    backbone: torch.nn.Module
    module: torch.nn.Module | None = None

    @classmethod
    def load(cls, run: Run, whole: bool = False) -> LoadedRun:
        """The run's backbone (on the CPU), and with ``whole`` its method module when the run folder rebuilds it."""
        backbone = load_backbone(run.checkpoint, map_location="cpu")
        return cls(run, backbone, _rebuild(run, backbone) if whole else None)

    @property
    def network(self) -> torch.nn.Module:
        """What registers the pairs: ``(moving, fixed) → displacement`` in voxels."""
        return self.module.backbone if self.module is not None else self.backbone

    @property
    def figure_model(self) -> torch.nn.Module:
        """What figures draw: the whole method (its panels with the score map), else the backbone."""
        return self.module if self.module is not None else self.backbone


def _rebuild(run: Run, backbone: torch.nn.Module) -> torch.nn.Module | None:
    """The whole trained method on ``backbone``'s device, in eval mode; None when the run cannot be rebuilt."""
    if run.config is None or not str(run.checkpoint).endswith(".ckpt"):
        return None
    try:
        model = load_method(run.checkpoint, run.config)
        return model.to(backbone.parameters().__next__().device).eval()
    except Exception as error:  # figures and localisation only: fall back to the backbone
        log.warning(
            "%s: no score map for figures or localisation: the model could not be rebuilt (%s).", run.label, error
        )
        return None


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
    # The whole model, for its weight map against the data's no-correspondence masks, refinement and figures.
    whole = figures > 0 or first.get("nocorr") is not None or refine is not None
    loaded = LoadedRun.load(run, whole)
    evaluator = CaseEvaluator(loaded.network, labels, names, device, loaded.module)
    head = {
        "run": run.label,
        "backbone": run.backbone,
        "method": run.method,
        "seed": run.seed,
        "similarity": run.similarity,
        "data": data_key(data, split),
    }
    refiner, refined_head = None, None
    if refine is not None:
        refiner, refined_head = _refiner(loaded, refine, evaluator.device), dict(head)
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
        if index < figures and figure_dir is not None:
            _save_case_figure(loaded.figure_model, pair, figure_dir, evaluator.device, split)
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


def _refiner(loaded: LoadedRun, refine: Mapping[str, Any], device):
    """The run's objective for refinement; the run must be rebuildable (a run folder with its config)."""
    from ..refine import Refiner

    if loaded.module is None:
        raise AdaCSError(
            f"--refine needs the run folder of {loaded.run.label} to rebuild its objective (similarity, λ, scorer)."
        )
    settings = {k: refine[k] for k in ("lr", "grid") if refine.get(k) is not None}
    # Refiner.from_module decides the weights (score for a run with a scorer) and refuses score without one.
    refiner = Refiner.from_module(loaded.module, refine.get("weights"), steps=int(refine["steps"]), **settings)
    if refiner.scorer is not None:
        refiner.scorer.to(device)
    return refiner


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
