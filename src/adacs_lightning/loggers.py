"""Experiment tracking: a W&B logger that works without an account, and what runs log to it."""

from __future__ import annotations

import netrc
import os
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger
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
) -> WandbLogger:
    """A :class:`~lightning.pytorch.loggers.WandbLogger`, offline unless W&B credentials are configured.

    Args:
        offline: True or False to force; None (default) chooses offline when no API key is
            configured and ``WANDB_MODE`` does not say otherwise. Offline runs are written to
            ``<save_dir>/wandb/`` and can be uploaded later with ``wandb sync``.
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
    )


@rank_zero_only
def log_backbone_artifact(loggers: Sequence[Logger], checkpoint_path: str | None, name: str = "backbone") -> None:
    """Log the checkpoint that holds the trained backbone as a W&B model artifact (rank zero only)."""
    if not checkpoint_path:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            artifact = wandb.Artifact(name=name, type="model", metadata={"checkpoint": Path(checkpoint_path).name})
            artifact.add_file(checkpoint_path)
            logger.experiment.log_artifact(artifact)
