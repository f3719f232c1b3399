"""Where a trained model's run folder is, and what its config says: read without importing PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def run_folder(model: Path) -> Path | None:
    """The ``adacs-train`` run folder of ``model``: the folder itself, or the one a checkpoint lies in.

    ``checkpoints/<name>.ckpt`` and ``backbone.pt`` sit one or two levels below their run folder, which
    holds ``.hydra/config.yaml``; None when there is none.
    """
    candidates = [model] if model.is_dir() else [model.parent, model.parent.parent]
    return next((p for p in candidates if (p / ".hydra" / "config.yaml").is_file()), None)


def run_setting(model: Path, key: str, default: Any = None) -> Any:
    """A setting (``data.image_size``…) of ``model``'s run config, as plain Python; ``default`` without one."""
    from omegaconf import OmegaConf

    folder = run_folder(model)
    if folder is None:
        return default
    value = OmegaConf.select(OmegaConf.load(folder / ".hydra" / "config.yaml"), key, default=default)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
