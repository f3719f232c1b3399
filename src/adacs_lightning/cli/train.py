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

import errno
import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ..configs import CONFIG_PACKAGE, HYDRA_VERSION_BASE, PRIMARY_CONFIG
from ..errors import AdaCSError, CheckpointWriteError
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
        try:
            metrics = train(cfg)
        except OSError as error:
            if not isinstance(error, AdaCSError) and error.errno not in DISK_FULL:
                raise
            raise AdaCSError(disk_full_message(error, _run_dir())) from error
    except AdaCSError as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":  # for bug reports
            traceback.print_exception(error)
        if isinstance(error, CheckpointWriteError):
            error = AdaCSError(disk_full_message(error, _run_dir()))
        print(f"\nadacs-train: {error}", file=sys.stderr)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            log.error("Job failed: %s", error)
            return float("nan")
        raise SystemExit(2) from None
    return metrics.get(cfg.get("optimized_metric"))


#: Write errors that mean the disk (or the user's quota) is full.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _run_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def last_complete_checkpoint(run_dir: Path | None) -> Path | None:
    """The newest checkpoint of the run (every ``.ckpt`` there is complete: they are written atomically)."""
    if run_dir is None or not (run_dir / "checkpoints").is_dir():
        return None
    found = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def disk_full_message(error: BaseException, run_dir: Path | None) -> str:
    """One paragraph: what could not be written, the last complete checkpoint, and how to resume."""
    if isinstance(error, CheckpointWriteError):
        what = str(error).split(" Free disk space")[0]
    else:
        name = getattr(error, "filename", None)
        what = f"Could not write {name or 'a file of the run'} ({getattr(error, 'strerror', None) or error})."
    cause = getattr(error, "__cause__", None) or error
    full = getattr(cause, "errno", None) in DISK_FULL or isinstance(cause, RuntimeError)  # torch's full-disk error
    remedy = "Free disk space" if full else "Fix what the error names (permissions, a read-only disk)"
    checkpoint = last_complete_checkpoint(run_dir)
    if checkpoint is None:
        return f"{what} No checkpoint was complete yet: {remedy.lower()} and start the run again."
    return (
        f"{what} The last complete checkpoint is intact: {checkpoint}. {remedy}, then resume with "
        f"adacs-train ckpt_path={checkpoint} hydra.run.dir={run_dir} (and the same settings as this run)."
    )


_entry = hydra.main(config_path=f"pkg://{CONFIG_PACKAGE}", config_name=PRIMARY_CONFIG, version_base=HYDRA_VERSION_BASE)(
    _hydra_main
)


def render_help() -> str:
    """``adacs-train --help``: what it does, the config groups with their options (default first), where the rest is."""
    from .groups import GROUPS

    width = max(len(group) for group, *_ in GROUPS)
    lines = [
        "usage: adacs-train [group=option ...] [key=value ...] [--cfg job] [-m]",
        "",
        "Train a registration backbone with AdaCS (or another method) on Hydra configs. With no argument: AdaCS",
        "and VoxelMorph on the embedded synthetic pairs (no download). A run writes to outputs/<date>/<time>/.",
        "",
        "Config groups (group=option or +group=option; the default first, marked *):",
    ]
    for group, description, default, options in GROUPS:
        listed = ", ".join(f"{name}*" if name == default else name for name in options)
        lines += [f"  {group:<{width}}  {description}", f"  {'':<{width}}  {listed}"]
    lines += [
        "",
        "Any key: key=value (docs/configuration.md lists every key and its meaning).",
        "  --cfg job        print the composed config and exit",
        "  -m, --multirun   a sweep over comma-separated values (method=baseline,adacs)",
        "  --hydra-help     Hydra's own options",
        "",
        "Examples:",
        "  adacs-train method=baseline                  the same run without scoring",
        "  adacs-train +backbone=transmorph +data=camus data.root=/data/camus",
        "  adacs-train -m experiment=fair_comparison    AdaCS against a λ-tuned baseline on your data",
        "  adacs-train ckpt_path=outputs/<run>/checkpoints/last.ckpt hydra.run.dir=outputs/<run>   resume",
    ]
    return "\n".join(lines)


def main() -> None:
    """Console script ``adacs-train``."""
    if any(argument in ("--help", "-h") for argument in sys.argv[1:]):
        print(render_help())
        return
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
