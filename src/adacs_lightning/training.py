"""Training from a composed config: what ``adacs-train`` runs once Hydra has composed the settings.

:func:`train` builds the data, backbone, method, callbacks, loggers and trainer from their
``_target_`` configs, fits, and writes ``summary.json`` and ``backbone.pt``. Everything a user
can get wrong is checked before any work and raised as :class:`~adacs_lightning.errors.ConfigError`.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from .checkpoint import BACKBONE_CONFIG_KEY, save_backbone
from .checkpoint_io import UnreadableCheckpoint, read_checkpoint
from .configs import backbone_dims, backbone_network, check_epochs, describe_backbone, options_with_key
from .errors import AdaCSError, ConfigError
from .loggers import HistoryCSVLogger, define_summaries, finish_run

log = logging.getLogger("adacs_lightning")

_PATH_KEYS = ("root", "csv", "dir", "path")
#: The W&B run id of a run folder, so that a run resumed into it continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id.txt"


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


def check_settings(cfg: DictConfig) -> None:
    """Values the CLI checks before any work: the schedule's length and the final checkpoint."""
    if cfg.get("final_checkpoint", "best") not in ("best", "last"):
        raise ConfigError(
            "final_checkpoint", f"must be 'best' or 'last', got {cfg.final_checkpoint!r}.", "The default is best."
        )
    check_epochs(cfg)


def resume_checkpoint(cfg: DictConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from, read once; a clear error when it is damaged or holds another network.

    The backbone config the checkpoint stores is compared with the one this run builds: another
    network or another dimensionality is named, with the setting that selects it.
    """
    ckpt = cfg.get("ckpt_path")
    if ckpt is None:
        return None
    try:
        checkpoint = read_checkpoint(str(ckpt))
    except UnreadableCheckpoint as unreadable:
        error = unreadable.cause
        raise ConfigError(
            "ckpt_path",
            f"'{ckpt}' is not a readable checkpoint ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "it may be truncated (a run killed while writing it) or not a checkpoint at all.",
            "Resume from another checkpoint of the run (checkpoints/best-*.ckpt), or start afresh with ckpt_path=null.",
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ConfigError("ckpt_path", f"'{ckpt}' is not an adacs-train checkpoint (no state_dict).")
    stored = checkpoint.get(BACKBONE_CONFIG_KEY)
    wanted = OmegaConf.to_container(cfg.backbone, resolve=True)
    if stored is not None:
        # The network (a wrapped MONAI network's own class, not the adapter's) and its dimensionality.
        for read, setting in ((backbone_network, "backbone"), (backbone_dims, "data.spatial_dims")):
            if read(stored) is not None and read(wanted) is not None and read(stored) != read(wanted):
                raise ConfigError(
                    "ckpt_path",
                    f"'{ckpt}' holds a {describe_backbone(stored)} backbone, "
                    f"but this run builds a {describe_backbone(wanted)} one.",
                    f"Resume with the checkpoint's {setting} (the {describe_backbone(stored)} one), or start afresh.",
                )
    return checkpoint


def build(cfg: DictConfig, group: str, **kwargs: Any) -> Any:
    """Instantiate ``cfg[group]``; a failure becomes a :class:`ConfigError` naming the setting."""
    try:
        return instantiate(cfg[group], _convert_="all", **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ or error
        if isinstance(cause, ConfigError):
            setting = cause.setting if cause.setting.startswith(f"{group}.") else f"{group}.{cause.setting}"
            raise ConfigError(setting, cause.problem, cause.fix) from cause
        unknown = _unexpected_keyword(cause)
        if unknown is not None:
            owners = options_with_key(group, unknown)
            hint = f" It is a setting of {group}={' or '.join(owners)}: add {group}={owners[0]}." if owners else ""
            raise ConfigError(
                f"{group}.{unknown}",
                f"is not a setting of {cfg[group].get('_target_', group)}.{hint}",
                "Remove it, or list the settings with adacs-train --cfg job.",
            ) from cause
        raise ConfigError(
            group,
            f"could not be built ({type(cause).__name__}: {cause}).",
            f"Check the values under '{group}' (adacs-train --cfg job shows them).",
        ) from cause


def _unexpected_keyword(error: BaseException) -> str | None:
    text = str(error)
    marker = "unexpected keyword argument '"
    return text.split(marker, 1)[1].split("'", 1)[0] if isinstance(error, TypeError) and marker in text else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit the configured model; returns the final metrics (validation Dice among them)."""
    check_paths(cfg)
    check_settings(cfg)
    checkpoint = resume_checkpoint(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    _check_writable(output_dir, cfg)

    datamodule = build(cfg, "data")
    unlabelled = _rank_without_labels(cfg, datamodule)
    backbone = build(cfg, "backbone")
    model = build(cfg, "method", backbone=backbone)
    model.backbone_config = OmegaConf.to_container(cfg.backbone, resolve=True)
    resumed_here = checkpoint is not None and _inside(Path(str(cfg.ckpt_path)), output_dir)
    _continue_wandb_run(cfg, output_dir, resumed_here)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if resumed_here:  # the run's own history stays: rows up to the checkpoint's epoch
        for logger in loggers:
            if isinstance(logger, HistoryCSVLogger):
                logger.keep_history(through_epoch=int(checkpoint.get("epoch", -1)))
    trainer: L.Trainer = build(cfg, "trainer", callbacks=callbacks, logger=loggers or False, **equal_budget(cfg, model))
    if unlabelled:
        log.info("No label maps in the validation pairs: checkpoints are ranked by val/residual (lower is better).")
    _remember_wandb_run(trainer, output_dir)
    define_summaries(trainer.loggers)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    # Weights are initialised above with the shared seed (DDP also broadcasts rank 0's);
    # from here on each rank draws its own random numbers.
    L.seed_everything(cfg.seed + trainer.global_rank, workers=True, verbose=False)

    summary, chosen_by = None, None
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        summary, chosen_by = _summarise(trainer, cfg, output_dir)
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise AdaCSError(
                f"The disk holding {error.filename or output_dir} is full ({error.strerror}). Checkpoints written "
                "before are intact (each is replaced only once its successor is complete): free space, then resume "
                f"with ckpt_path={output_dir / 'checkpoints' / 'last.ckpt'}."
            ) from error
        raise
    finally:
        finish_run(trainer, OmegaConf.to_container(cfg, resolve=True), summary, chosen_by)
    return summary["metrics"]


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _check_writable(output_dir: Path, cfg: DictConfig) -> None:
    """The run folder and the checkpoint folders must be folders this process can write to."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{time.time_ns()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            "hydra.run.dir",
            f"the run folder '{output_dir}' cannot be written ({error.strerror or error}).",
            "Choose a folder you can write to: hydra.run.dir=/path/to/runs/name.",
        ) from error
    for name, callback in (cfg.get("callbacks") or {}).items():
        dirpath = (callback or {}).get("dirpath")
        if dirpath is not None and Path(str(dirpath)).exists() and not Path(str(dirpath)).is_dir():
            raise ConfigError(
                f"callbacks.{name}.dirpath",
                f"'{dirpath}' is a file, not a folder for checkpoints.",
                "Move the file away, or point dirpath at a folder.",
            )


def _rank_without_labels(cfg: DictConfig, datamodule: Any) -> bool:
    """Without label maps in the validation pairs, rank checkpoints by ``val/residual`` (lower is better).

    Returns True when it switched (``val/dice`` exists only with labels; unlabelled pairs are the
    normal case of unsupervised registration).
    """
    if cfg.get("optimized_metric") != "val/dice":
        return False
    labelled = getattr(datamodule, "validation_has_labels", None)
    if labelled is None or labelled():
        return False
    with open_dict(cfg):
        cfg.optimized_metric = "val/residual"
        checkpoint = (cfg.get("callbacks") or {}).get("checkpoint")
        if checkpoint is not None and checkpoint.get("monitor") is not None:
            checkpoint.monitor, checkpoint.mode = "val/residual", "min"
    return True


def _continue_wandb_run(cfg: DictConfig, output_dir: Path, resumed_here: bool) -> None:
    """A run resumed into its own folder continues its W&B run (the id recorded when it started)."""
    record = output_dir / WANDB_ID_FILE
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if resumed_here and wandb_cfg is not None and record.is_file():
        with open_dict(cfg):
            wandb_cfg.id = record.read_text().strip()


def _remember_wandb_run(trainer: L.Trainer, output_dir: Path) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            (output_dir / WANDB_ID_FILE).write_text(str(logger.version))


def equal_budget(cfg: DictConfig, model: Any) -> dict[str, int]:
    """``{"max_epochs": …}`` giving the backbone ``cfg.backbone_epochs`` epochs of updates; {} when unset.

    A method whose backbone sits idle for some epochs (AdaCS's warm-up B) gets those on top, so
    that every method of a comparison updates its backbone equally often.
    """
    epochs = cfg.get("backbone_epochs")
    if epochs is None:
        return {}
    if int(epochs) < 1:
        raise ConfigError("backbone_epochs", f"must be at least 1 (or null), got {epochs}.", "E.g. backbone_epochs=30.")
    idle = int(getattr(model, "backbone_idle_epochs", 0))
    log.info("Equal budget: %d backbone epochs + %d with the backbone frozen = %d epochs.", epochs, idle, epochs + idle)
    return {"max_epochs": int(epochs) + idle}


def _summarise(trainer: L.Trainer, cfg: DictConfig, output_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Write ``summary.json`` and ``backbone.pt`` (the selected checkpoint's backbone alone) on rank zero.

    Returns the summary and how the saved backbone's checkpoint was chosen (None when none was saved).
    """
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    checkpoint = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)
    checkpoint = checkpoint or trainer.checkpoint_callback
    best_score = getattr(checkpoint, "best_model_score", None)
    summary = {
        "metrics": metrics,
        "best_checkpoint": getattr(checkpoint, "best_model_path", None) or None,
        "best_score": float(best_score) if best_score is not None else None,
        "ranked_by": getattr(checkpoint, "monitor", None),
        "last_checkpoint": str(last) if (last := output_dir / "checkpoints" / "last.ckpt").is_file() else None,
        "backbone": None,
        "epochs": trainer.current_epoch,
    }
    final = cfg.get("final_checkpoint", "best")
    preferred = ("best_checkpoint", "last_checkpoint") if final == "best" else ("last_checkpoint", "best_checkpoint")
    summary["selected_checkpoint"] = summary[preferred[0]] or summary[preferred[1]]
    chosen_by = None
    if not trainer.is_global_zero:
        return summary, chosen_by
    source = summary["selected_checkpoint"]
    if source:
        summary["backbone"] = str(save_backbone(source, output_dir / "backbone.pt"))
        chosen_by = {"selected": final, "from_checkpoint": Path(source).name}
        if final == "best" and summary["best_score"] is not None:
            chosen_by.update({"metric": summary["ranked_by"], "value": summary["best_score"]})
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("Run folder: %s", output_dir)
    if summary["best_checkpoint"]:
        log.info(
            "Best checkpoint (%s = %.4f): %s",
            summary["ranked_by"],
            summary["best_score"] or float("nan"),
            summary["best_checkpoint"],
        )
    return summary, chosen_by
