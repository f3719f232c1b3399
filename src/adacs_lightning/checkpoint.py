"""Reading trained registration networks back from checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from .backbones import Backbone, as_backbone
from .checkpoint_io import read_checkpoint
from .choices import REFERENCE_RECIPE_SETTINGS
from .errors import AdaCSError

BACKBONE_CONFIG_KEY = "adacs_backbone_config"
#: Checkpoint entry naming the training method: ``adacs``, ``baseline``, ``nll``, ``beta_nll`` or ``robust``.
METHOD_KEY = "adacs_method"
#: Checkpoint entry describing the similarity the run trained with (e.g. ``LocalNCC(window=9)``).
SIMILARITY_KEY = "adacs_similarity"


def method_of(checkpoint: dict[str, Any]) -> str | None:
    """The training method a loaded checkpoint (or ``backbone.pt``) was written by; None when it cannot tell.

    Read from :data:`METHOD_KEY`; for files written before that entry, from the state dict's
    networks (a ``variance`` network: NLL or β-NLL by the ``beta_nll`` hyper-parameter; a
    ``scorer``: AdaCS) or the ``scoring`` hyper-parameter.
    """
    if checkpoint.get(METHOD_KEY):
        return str(checkpoint[METHOD_KEY])
    hparams = checkpoint.get("hyper_parameters") or {}
    keys = checkpoint.get("state_dict") or {}
    if any(k.startswith("variance.") for k in keys):
        return "nll" if float(hparams.get("beta_nll", 0.0)) == 0.0 else "beta_nll"
    if any(k.startswith("scorer.") for k in keys):
        return "adacs"
    if "scoring" in hparams:
        return "adacs" if hparams["scoring"] else "baseline"
    return None


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
    checkpoint = read_checkpoint(path, map_location)
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


def load_method(checkpoint_path: str | Path, config: Any, map_location: str | torch.device = "cpu"):
    """The whole trained method (backbone with its scorer or variance network, similarity, λ) in eval mode.

    ``config`` is the run's composed config (``.hydra/config.yaml``): its ``method`` and ``backbone``
    say what to build; the checkpoint's ``state_dict`` fills every network.
    """
    if config is None or "method" not in config or "backbone" not in config:
        raise AdaCSError(
            f"'{checkpoint_path}' lies in no run folder of adacs-train (no .hydra/config.yaml beside it): the "
            "method's similarity, λ and scorer cannot be rebuilt. Give the run folder."
        )
    try:
        method = _current_method_config(config.method)
        model = instantiate(method, backbone=instantiate(config.backbone, _convert_="all"))
    except Exception as error:  # Hydra wraps whatever the classes raise
        cause = error.__cause__ or error
        raise AdaCSError(
            f"The method of the run of '{checkpoint_path}' could not be rebuilt from its config: {cause}"
        ) from cause
    checkpoint = read_checkpoint(checkpoint_path, map_location)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise AdaCSError(f"'{checkpoint_path}' could not be read as a checkpoint (it holds no state_dict).")
    missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
    if unexpected or any(not k.startswith(("val_", "train_")) for k in missing):
        raise AdaCSError(
            f"'{checkpoint_path}' does not match its run's config (missing {list(missing)[:3]}, unexpected "
            f"{list(unexpected)[:3]}): the checkpoint comes from another run."
        )
    model.requires_grad_(False)
    return model.eval()


def _current_method_config(method: Any) -> Any:
    """A run's method config as this version builds it: runs written before the reference recipe had its
    own class name ``AdaCS`` with the recipe's settings, which now select ``ReferenceAdaCS``."""
    target = str(method.get("_target_", ""))
    if target.rsplit(".", 1)[-1] != "AdaCS":
        return method
    if any(method.get(key, own) != own for key, own in REFERENCE_RECIPE_SETTINGS.items()):
        method = method.copy()
        method["_target_"] = "adacs_lightning.ReferenceAdaCS"
    return method


def save_backbone(checkpoint_path: str | Path, output_path: str | Path) -> Path:
    """Write the backbone part of an ``adacs-train`` checkpoint to ``output_path``.

    The file keeps the backbone's weights and config and the name of the method that trained
    it (no scorer, no optimiser state) and is read back by :func:`load_backbone` like a checkpoint.
    """
    checkpoint = read_checkpoint(checkpoint_path)
    backbone_only = {
        "state_dict": {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")},
        BACKBONE_CONFIG_KEY: checkpoint.get(BACKBONE_CONFIG_KEY),
        METHOD_KEY: method_of(checkpoint),
        SIMILARITY_KEY: checkpoint.get(SIMILARITY_KEY),
    }
    output_path = Path(output_path)
    torch.save(backbone_only, output_path)
    return output_path
