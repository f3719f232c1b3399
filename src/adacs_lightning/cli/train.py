"""``adacs-train``: train a registration backbone with AdaCS (or another method) from Hydra configs.

Examples::

    adacs-train                                   # AdaCS + VoxelMorph on the synthetic data
    adacs-train method=baseline                   # the same run without scoring
    adacs-train +backbone=localnet trainer.max_epochs=30
    adacs-train ckpt_path=outputs/<run>/checkpoints/last.ckpt   # resume

``--help``, tab completion and command-line mistakes are answered without importing PyTorch:
the training stack is imported only once a run starts (:mod:`adacs_lightning.training`).
"""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from ..errors import AdaCSError
from .overrides import normalise_overrides
from .preflight import preflight

log = logging.getLogger("adacs_lightning")


def _hydra_main(cfg: DictConfig) -> float | None:
    """Train; returns the optimised metric for sweepers.

    A user error ends a single run with status 2 and no traceback; in a multirun it fails
    that job alone (logged, NaN returned to the sweeper) so that the other jobs still run.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from ..training import train

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
    arguments = normalise_overrides(sys.argv[1:])
    try:
        preflight(arguments)
    except AdaCSError as error:
        print(f"adacs-train: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    sys.argv = [sys.argv[0], *arguments]
    _entry()


if __name__ == "__main__":
    main()
