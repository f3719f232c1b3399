"""adacs-train's config composed in-process, as Hydra composes it for the command line."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from adacs_lightning.cli.overrides import normalise_overrides
from adacs_lightning.configs import compose


def compose_config(overrides: list[str] | tuple[str, ...] = (), output_dir: Path | None = None) -> DictConfig:
    """The composed config for ``overrides`` (``+group=`` forms allowed); ``paths.output_dir`` set when given."""
    extra = [] if output_dir is None else [f"paths.output_dir={output_dir}"]
    return compose(normalise_overrides(list(overrides)) + extra)
