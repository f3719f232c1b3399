"""Reading trained registration networks back from checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate

from .backbones import Backbone, as_backbone
from .errors import AdaCSError

BACKBONE_CONFIG_KEY = "adacs_backbone_config"


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> Backbone:
    """The trained backbone alone from an ``adacs-train`` checkpoint, in eval mode.

    The checkpoint stores the backbone's config, so no code or config is needed to
    rebuild it; the scorer's weights are neither loaded nor built.
    """
    path = Path(path)
    if not path.is_file():
        raise AdaCSError(
            f"No checkpoint at '{path}': give the path of a .ckpt file (e.g. a run's checkpoints/last.ckpt)."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for a damaged file
        raise AdaCSError(f"'{path}' could not be read as a checkpoint ({type(error).__name__}: {error}).") from error
    config = checkpoint.get(BACKBONE_CONFIG_KEY)
    if config is None:
        raise AdaCSError(
            f"'{path}' does not record its backbone's config (it was not written by adacs-train). Build the "
            "network yourself and use AdaCS.load_from_checkpoint(path, backbone=net).backbone instead."
        )
    backbone = as_backbone(instantiate(config, _convert_="all"))
    prefix = "backbone."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    backbone.load_state_dict(state)
    backbone.requires_grad_(False)
    return backbone.eval()


def save_backbone(checkpoint_path: str | Path, output_path: str | Path) -> Path:
    """Write the backbone part of an ``adacs-train`` checkpoint to ``output_path``.

    The file keeps the backbone's weights and config only (no scorer, no optimiser
    state) and is read back by :func:`load_backbone` like a checkpoint.
    """
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    backbone_only = {
        "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")},
        BACKBONE_CONFIG_KEY: checkpoint.get(BACKBONE_CONFIG_KEY),
    }
    output_path = Path(output_path)
    torch.save(backbone_only, output_path)
    return output_path
