"""``adacs-train``: train a registration backbone with AdaCS (or the baseline) from Hydra configs.

Examples::

    adacs-train                                   # AdaCS + VoxelMorph on the synthetic data
    adacs-train method=baseline                   # the same run without scoring
    adacs-train +backbone=localnet trainer.max_epochs=30
    adacs-train ckpt_path=outputs/<run>/checkpoints/last.ckpt   # resume
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from ..checkpoint import save_backbone
from ..errors import AdaCSError, ConfigError
from ..loggers import log_backbone_artifact
from .overrides import normalise_overrides

log = logging.getLogger("adacs_lightning")

_PATH_KEYS = ("root", "csv", "dir", "path")


def check_paths(cfg: DictConfig) -> None:
    """Fail early, naming the setting, when a data path or the resume checkpoint does not exist."""
    data = cfg.get("data") or {}
    for key, value in data.items():
        if value is None or not isinstance(value, str):
            continue
        if any(str(key) == k or str(key).endswith(f"_{k}") for k in _PATH_KEYS) and not Path(value).exists():
            raise ConfigError(
                f"data.{key}",
                f"'{value}' does not exist.",
                f"Point data.{key} at the data on this machine, e.g. data.{key}=/path/to/data.",
            )
    ckpt = cfg.get("ckpt_path")
    if ckpt is not None and not Path(str(ckpt)).is_file():
        raise ConfigError(
            "ckpt_path",
            f"no checkpoint file at '{ckpt}'.",
            "Give the path of a .ckpt file (a run's checkpoints/last.ckpt), or ckpt_path=null to start afresh.",
        )


def build(cfg: DictConfig, group: str, **kwargs: Any) -> Any:
    """Instantiate ``cfg[group]``; a failure becomes a :class:`ConfigError` naming the setting."""
    try:
        return instantiate(cfg[group], _convert_="all", **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{group}.{cause.setting}", cause.problem, cause.fix) from cause
        raise ConfigError(
            group,
            f"could not be built ({type(cause).__name__}: {cause}).",
            f"Check the values under '{group}' (adacs-train --cfg job shows them).",
        ) from cause


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model; returns the final metrics (validation Dice among them)."""
    check_paths(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = build(cfg, "data")
    backbone = build(cfg, "backbone")
    model = build(cfg, "method", backbone=backbone)
    model.backbone_config = OmegaConf.to_container(cfg.backbone, resolve=True)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    trainer: L.Trainer = build(cfg, "trainer", callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    # Weights are initialised above with the shared seed (DDP also broadcasts rank 0's);
    # from here on each rank draws its own random numbers.
    L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)

    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        summary = _summarise(trainer, cfg, output_dir)
    finally:
        _finish_wandb(trainer)
    return summary["metrics"]


def _summarise(trainer: L.Trainer, cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``backbone.pt`` (the best backbone alone) on rank zero."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    checkpoint = trainer.checkpoint_callback
    best_score = getattr(checkpoint, "best_model_score", None)
    summary = {
        "metrics": metrics,
        "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        "best_score": float(best_score) if best_score is not None else None,
        "last_checkpoint": str(last) if (last := output_dir / "checkpoints" / "last.ckpt").is_file() else None,
        "backbone": None,
        "epochs": trainer.current_epoch,
    }
    if not trainer.is_global_zero:
        return summary
    source = summary["best_checkpoint"] or summary["last_checkpoint"]
    if source:
        summary["backbone"] = str(save_backbone(source, output_dir / "backbone.pt"))
        log_backbone_artifact(trainer.loggers, summary["backbone"])
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("Run folder: %s", output_dir)
    if summary["best_checkpoint"]:
        log.info(
            "Best checkpoint (%s = %.4f): %s",
            cfg.optimized_metric,
            summary["best_score"] or float("nan"),
            summary["best_checkpoint"],
        )
    return summary


def _finish_wandb(trainer: L.Trainer) -> None:
    """Close the W&B run even when training failed, so that a multirun's next job starts cleanly."""
    if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        wandb.finish(exit_code=0 if trainer.state.status.value == "finished" else 1)


def _hydra_main(cfg: DictConfig) -> float | None:
    """Train; returns the optimised metric for sweepers.

    A user error ends a single run with status 2 and no traceback; in a multirun it fails
    that job alone (logged, NaN returned to the sweeper) so that the other jobs still run.
    """
    try:
        metrics = train(cfg)
    except AdaCSError as error:
        print(f"\nadacs-train: {error}", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("Job failed: %s", error)
            return float("nan")
        raise SystemExit(2) from None
    return metrics.get(cfg.get("optimized_metric"))


_entry = hydra.main(config_path="pkg://adacs_lightning.conf", config_name="config", version_base="1.3")(_hydra_main)


def main() -> None:
    """Console script ``adacs-train``."""
    sys.argv = [sys.argv[0], *normalise_overrides(sys.argv[1:])]
    _entry()


if __name__ == "__main__":
    main()
