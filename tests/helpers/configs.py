"""adacs-train's config composed in-process, as Hydra composes it for the command line."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from adacs_lightning.cli.overrides import normalise_overrides


def compose_config(overrides: list[str] | tuple[str, ...] = (), output_dir: Path | None = None) -> DictConfig:
    """The composed config for ``overrides`` (``+group=`` forms allowed); ``paths.output_dir`` set when given."""
    extra = [] if output_dir is None else [f"paths.output_dir={output_dir}"]
    with initialize_config_module("adacs_lightning.conf", version_base="1.3"):
        return compose("config", overrides=normalise_overrides(list(overrides)) + extra)
