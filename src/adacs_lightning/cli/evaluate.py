"""``adacs-eval``: evaluate trained runs on their test pairs and compare them with paired tests.

Examples::

    adacs-eval outputs/2026-01-01/12-00-00                      # one run: the checkpoint it selected, its data
    adacs-eval runs/baseline runs/adacs --output comparison     # paired comparison of two runs
    adacs-eval multirun/2026-01-01/12-00-00/*                    # every run of a sweep
    adacs-eval checkpoints/best.ckpt --data synthetic data.test_pairs=64
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..choices import REFINE_WEIGHTS
from ..configs import run_folders_in
from ..errors import AdaCSError, check_writable
from .common import HelpFormatter, console_main, finite_float

log = logging.getLogger("adacs_lightning")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adacs-eval",
        description=(
            "Register every test pair with trained backbones and report Dice, HD95, HD and average surface "
            "distance (mm, from the data's voxel spacing), folding and inference time per case; with two or "
            "more runs, compare them case by case with a paired t-test and a Wilcoxon signed-rank test."
        ),
        epilog=(
            "Each RUN is a run folder of adacs-train (the checkpoint it selected, final_checkpoint, and its data config are used) or a "
            "checkpoint file (.ckpt or backbone.pt). Data overrides use Hydra's syntax: data=NAME picks "
            "conf/data/NAME.yaml, data.KEY=VALUE changes one setting (e.g. data.test_pairs=64). Writes cases.csv, "
            "summary.csv/.md and, for several runs, comparison.csv/.md and paired_tests.csv."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders or checkpoints, then data overrides")
    parser.add_argument("-o", "--output", type=Path, default=None, help="output folder (default: <run>/evaluation)")
    parser.add_argument("--data", default=None, help="data config: a name in conf/data or a YAML file")
    parser.add_argument("--labels", type=int, nargs="+", default=None, help="label values (default: data.eval_labels)")
    parser.add_argument("--split", default="test", choices=("test", "val"), help="which pairs to register")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--max-cases", type=int, default=None, help="evaluate the first N cases only")
    parser.add_argument("--figures", type=int, default=2, help="Figure 4 panels of the first N cases of each run")
    parser.add_argument("--skip-missing", action="store_true", help="skip runs without a checkpoint")
    parser.add_argument(
        "--checkpoint",
        default="selected",
        choices=("selected", "best", "last"),
        help="which checkpoint of a run folder: the one the run selected (final_checkpoint), the best or the last",
    )
    parser.add_argument(
        "--refine", type=int, default=0, metavar="N", help="also evaluate each run with N steps of per-pair refinement"
    )
    parser.add_argument(
        "--refine-weights",
        choices=REFINE_WEIGHTS,
        default=None,
        help="score (every run must have a scorer) or none; default: score for runs with a scorer (AdaCS), none otherwise",
    )
    parser.add_argument(
        "--refine-lr", type=finite_float, default=None, help="refinement's learning rate, voxels per step"
    )
    parser.add_argument("--refine-grid", type=int, default=None, help="refinement's control-point spacing, voxels")
    parser.add_argument(
        "--reference",
        default=None,
        metavar="LABEL",
        help="the run label every other is tested against (e.g. 'adacs method.alpha=0.02'); default: baseline",
    )
    parser.add_argument(
        "--choose-lambda",
        action="store_true",
        help=(
            "the runs are a sweep over method × λ × seed: choose each method's λ on validation Dice, then compare "
            "the methods at their chosen λ on the test pairs (validation.md, tradeoff.png, comparison.md)"
        ),
    )
    return parser


def split_overrides(arguments: list[str]) -> tuple[list[str], str | None, list[str]]:
    """``(paths, data option or None, data.key=value overrides)`` from the positional arguments."""
    paths, data, overrides = [], None, []
    for argument in arguments:
        key, sep, value = argument.partition("=")
        if sep and key.lstrip("+") == "data":
            data = value
        elif sep and key.lstrip("+").startswith("data."):
            overrides.append(argument.lstrip("+"))
        elif sep and not Path(argument).exists():
            raise AdaCSError(f"Unknown override '{argument}': adacs-eval takes data=NAME and data.KEY=VALUE only.")
        else:
            paths.append(argument)
    return paths, data, overrides


def run(argv: list[str] | None = None) -> dict[str, Path]:
    """Parse ``argv``, evaluate, print the tables; returns the files written."""
    args = build_parser().parse_args(argv)
    paths, data, overrides = split_overrides(args.runs)
    if args.data is not None and data is not None and args.data != data:
        raise AdaCSError(f"--data {args.data} and data={data} disagree: give one.")
    if args.max_cases is not None and args.max_cases < 1:
        raise AdaCSError("--max-cases must be at least 1.")
    if args.refine < 0 or (args.refine_lr is not None and args.refine_lr <= 0) or (args.refine_grid or 1) < 1:
        raise AdaCSError("--refine must be ≥ 0, --refine-lr > 0 and --refine-grid ≥ 1.")
    if args.refine and args.choose_lambda:
        raise AdaCSError(
            "--choose-lambda compares the networks alone: run adacs-eval --refine on the chosen runs after it."
        )
    if args.output is not None:
        check_writable(args.output, "The report folder (-o/--output)", "Give -o a folder you can write to.")
    from ..evaluation.fair import fair_comparison, selection_summary
    from ..evaluation.report import evaluate

    if args.choose_lambda:
        if data is not None or overrides or args.data is not None:
            raise AdaCSError("--choose-lambda evaluates each run on its own data: leave out data overrides.")
        output = args.output or Path(_common_folder(paths)) / "fair_comparison"
        fair = fair_comparison(paths, output, device=args.device, max_cases=args.max_cases)
        print(fair.files["validation_md"].read_text())
        print(selection_summary(fair))
        print(f"Written to {output}")
        return fair.files
    report = evaluate(
        paths,
        output=args.output,
        data=args.data or data,
        overrides=overrides,
        labels=args.labels,
        device=args.device,
        split=args.split,
        max_cases=args.max_cases,
        figures=max(args.figures, 0),
        skip_missing=args.skip_missing,
        checkpoint=args.checkpoint,
        reference=args.reference,
        refine=None
        if args.refine <= 0
        else {"steps": args.refine, "weights": args.refine_weights, "lr": args.refine_lr, "grid": args.refine_grid},
    )
    print(report.files["summary_md"].read_text())
    for key in ("comparison_md", "axes_md"):
        if key in report.files:
            print(report.files[key].read_text())
    print(f"Written to {report.files['cases'].parent}")
    return report.files


def main(argv: list[str] | None = None) -> None:
    """Console script ``adacs-eval``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console_main("adacs-eval", run, argv)


class CompareOnMultirunEnd(Callback):
    """Hydra callback: when a multirun ends, evaluate its runs and write the comparison into the sweep folder.

    Writes ``comparison.md``/``.csv``, ``paired_tests.csv``, ``cases.csv`` and ``summary.*`` to
    ``hydra.sweep.dir``; jobs that left no checkpoint (failed runs) are skipped with a warning.

    Args:
        figures: Figure 4 panels of the first N test cases of each run.
        device: where the backbones run.
    """

    def __init__(self, figures: int = 2, device: str = "auto") -> None:
        self.figures = figures
        self.device = device

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = run_folders_in(sweep_dir)
        if not runs:
            log.warning("No run folders in %s: nothing to compare.", sweep_dir)
            return
        from ..evaluation.report import evaluate

        try:
            report = evaluate(runs, output=sweep_dir, figures=self.figures, device=self.device, skip_missing=True)
        except AdaCSError as error:
            log.error("The comparison of %s failed: %s", sweep_dir, error)
            return
        written = report.files.get("comparison_md", report.files["summary_md"])
        log.info("Comparison of %d runs: %s\n%s", len(runs), written, written.read_text())


class SweepSummary(Callback):
    """Hydra callback for every multirun: when the sweep ends, a table of its runs labelled by what differs.

    Writes ``sweep_summary.md``/``.csv`` to the sweep folder: each run's differing overrides and final
    validation metrics (no test-set evaluation), a table per sweep axis, and for a one-axis numeric
    sweep ``sweep_parameter.png`` (validation Dice against the value).
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ..evaluation.axes import axis_markdown, axis_tables, parameter_plot, sweep_rows
        from ..evaluation.tables import markdown_table, write_csv

        sweep_dir = Path(config.hydra.sweep.dir)
        folders = sorted(p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()) if sweep_dir.is_dir() else []
        rows = sweep_rows(folders)
        if not rows:
            log.warning("Sweep summary: no finished run in %s.", sweep_dir)
            return
        metrics = [m for m in ("dice", "residual", "smoothness", "folding_pct") if any(m in r for r in rows)]
        write_csv([{k: v for k, v in r.items() if k != "axes"} for r in rows], sweep_dir / "sweep_summary.csv")
        header = ["run", "label", "seed", *(f"val {m}" for m in metrics)]
        body = [
            [
                r["run"],
                r["label"],
                "–" if r["seed"] is None else r["seed"],
                *(f"{r[m]:.4f}" if m in r else "–" for m in metrics),
            ]
            for r in rows
        ]
        text = "# Sweep\n\nFinal validation metrics of each run (summary.json).\n\n" + markdown_table(header, body)
        tables = axis_tables(rows, metrics)
        if tables:
            text += "\n" + axis_markdown(tables, {m: (f"val {m}", 1.0) for m in metrics}, digits=4)
            if len(tables) == 1 and "dice" in metrics:
                parameter_plot(
                    next(iter(tables.values())), "dice", "validation Dice", sweep_dir / "sweep_parameter.png"
                )
        (sweep_dir / "sweep_summary.md").write_text(text)
        log.info("Sweep summary of %d runs: %s", len(rows), sweep_dir / "sweep_summary.md")


class FairComparisonOnMultirunEnd(Callback):
    """Hydra callback: when a method × λ × seed sweep ends, choose each method's λ on validation Dice and
    compare the methods at their chosen λ on the test pairs (see :func:`~adacs_lightning.evaluation.fair.fair_comparison`).

    Writes ``validation.md``, ``tradeoff.png``, ``comparison.md``/``.csv`` and ``paired_tests.csv`` to the sweep folder.

    Args:
        device: where the backbones run for the test evaluation.
    """

    def __init__(self, device: str = "auto") -> None:
        self.device = device

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        from ..evaluation.fair import fair_comparison, selection_summary

        runs = run_folders_in(sweep_dir)
        try:
            report = fair_comparison(runs, sweep_dir, device=self.device)
        except AdaCSError as error:
            log.error("The fair comparison of %s failed: %s", sweep_dir, error)
            return
        log.info("Fair comparison of %d runs in %s:\n%s", len(runs), sweep_dir, selection_summary(report))


def _common_folder(paths: list[str]) -> str:
    import os

    folders = [str(Path(p).resolve()) for p in paths]
    return os.path.commonpath(folders) if len(folders) > 1 else str(Path(folders[0]).parent)


if __name__ == "__main__":
    main()
