"""Experiment tracking: a W&B logger that works without an account, and what runs log to it."""

from __future__ import annotations

import csv
import netrc
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


def wandb_api_key_configured() -> bool:
    """Whether W&B credentials exist here: ``WANDB_API_KEY`` or a ``~/.netrc`` entry from ``wandb login``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_logger(
    project: str = "adacs-lightning",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    save_dir: str = ".",
    offline: bool | None = None,
    log_model: bool = False,
    id: str | None = None,
) -> WandbLogger:
    """A :class:`~lightning.pytorch.loggers.WandbLogger`, offline unless W&B credentials are configured.

    Args:
        offline: True or False to force; None (default) chooses offline when no API key is
            configured and ``WANDB_MODE`` does not say otherwise. Offline runs are written to
            ``<save_dir>/wandb/`` and can be uploaded later with ``wandb sync``.
        id: a W&B run id to continue (a resumed run sets it from its run folder); None starts a new run.
    """
    if offline is None:
        mode = os.environ.get("WANDB_MODE", "").lower()
        offline = mode in ("offline", "dryrun") or (mode != "online" and not wandb_api_key_configured())
        if offline:
            rank_zero_info("W&B: no API key configured, logging offline (upload later with `wandb sync`).")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        entity=entity,
        name=name,
        group=group,
        tags=list(tags),
        save_dir=save_dir,
        offline=offline,
        log_model=log_model,
        **({"id": id, "resume": "allow"} if id else {}),
    )


#: How each validation metric is summarised in a W&B run (what sweeps and W&B tables rank by).
SUMMARIES = {
    "val/dice": "max",
    "val/residual": "min",
    "val/smoothness": "min",
    "val/folding_pct": "min",
    "val/displacement": "last",
    "val/dice_identity": "last",
}


@rank_zero_only
def define_summaries(loggers: Sequence[Logger]) -> None:
    """W&B summaries per metric (``val/dice``: the best, not the last epoch's; distances: the lowest)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            for name, summary in SUMMARIES.items():
                logger.experiment.define_metric(name, summary=summary)


@rank_zero_only
def log_backbone_artifact(
    loggers: Sequence[Logger], checkpoint_path: str | None, name: str = "backbone", metadata: dict | None = None
) -> None:
    """Log the file holding the trained backbone as a W&B model artifact (rank zero only).

    ``metadata`` (e.g. the metric the checkpoint was chosen by and its value) goes with it.
    """
    if not checkpoint_path:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            details = {"checkpoint": Path(checkpoint_path).name, **(metadata or {})}
            artifact = wandb.Artifact(name=name, type="model", metadata=details)
            artifact.add_file(checkpoint_path)
            logger.experiment.log_artifact(artifact)


def finish_run(
    trainer: L.Trainer,
    hyperparameters: Mapping[str, Any],
    summary: Mapping[str, Any] | None = None,
    chosen_by: Mapping[str, Any] | None = None,
) -> None:
    """The loggers' end of a run, finished or failed: results and artefacts on rank zero, then W&B closed.

    With a ``summary`` (the run's ``summary.json``: ``backbone``, the file of the selected
    backbone; ``ranked_by``, ``best_score``; ``metrics``, the final metrics), the backbone is logged
    as a W&B artifact (``chosen_by``: how its checkpoint was chosen) and TensorBoard's HParams table
    gets the run's ``hyperparameters`` (its resolved config) next to its best and final validation
    metrics. None (training failed) logs neither. W&B is closed in any case, so that a multirun's
    next job starts cleanly.
    """
    try:
        if summary is not None and trainer.is_global_zero:
            log_backbone_artifact(trainer.loggers, summary["backbone"], metadata=dict(chosen_by or {}))
            _hyperparameters_with_results(trainer.loggers, hyperparameters, summary)
    finally:
        _finish_wandb(trainer)


def _hyperparameters_with_results(
    loggers: Sequence[Logger], hyperparameters: Mapping[str, Any], summary: Mapping[str, Any]
) -> None:
    """TensorBoard's HParams table: the run's settings next to its best and final validation metrics."""
    results = {f"hp/best_{summary['ranked_by'] or 'metric'}": summary["best_score"]}
    results.update({f"hp/final_{k}": v for k, v in summary["metrics"].items() if k.startswith("val/")})
    results = {k.replace("/", "_").replace("hp_", "hp/", 1): v for k, v in results.items() if v is not None}
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(dict(hyperparameters), metrics=results)


def _finish_wandb(trainer: L.Trainer) -> None:
    """Close the W&B run (exit code 1 when training did not finish)."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish(exit_code=0 if trainer.state.status.value == "finished" else 1)


class HistoryCSVLogger(CSVLogger):
    """Lightning's CSV logger that keeps a resumed run's history instead of starting the file afresh.

    Lightning's writer deletes ``metrics.csv`` when it starts. After :meth:`keep_history`, the rows
    of epochs up to ``through_epoch`` (those the resumed checkpoint holds) are written back first;
    rows of a later, interrupted epoch are dropped, since the resumed run logs that epoch again.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._history: list[dict[str, str]] | None = None
        self._header: list[str] = []

    def keep_history(self, through_epoch: int) -> None:
        """Keep the existing ``metrics.csv`` rows whose epoch is at most ``through_epoch`` (call before training)."""
        path = Path(self.log_dir) / "metrics.csv"
        if self._experiment is not None or not path.is_file():
            return
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            self._header = list(reader.fieldnames or [])
            rows = list(reader)
        self._history = [row for row in rows if _epoch_of(row) is None or _epoch_of(row) <= through_epoch]
        rank_zero_info(f"Resuming: keeping {len(self._history)} rows of {path} (epochs up to {through_epoch}).")

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is not None or self._history is None:
            return super().experiment
        writer = super().experiment  # starts the file afresh
        with open(writer.metrics_file_path, "w", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=self._header)
            out.writeheader()
            out.writerows(self._history)
        writer.metrics_keys = list(self._header)
        self._history = None
        return writer


def _epoch_of(row: dict[str, str]) -> int | None:
    value = row.get("epoch", "")
    try:
        return int(float(value))
    except ValueError:
        return None
