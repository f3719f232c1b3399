"""Checks ``adacs-train`` makes before Hydra runs anything: fast, and nothing written yet.

The command line is parsed and the config composed once here, so that a mistake (an override
Hydra cannot parse, a key that is not a setting, a data key without its data set, a run folder
that already holds a run, a schedule of no epochs) stops with one paragraph and exit status 2,
before Hydra creates or overwrites a run folder. Only Hydra and OmegaConf are imported.
"""

from __future__ import annotations

import shutil
import time
from functools import cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .. import configs
from ..choices import REFERENCE_RECIPE_SETTINGS
from ..errors import ConfigError, check_writable

#: Files that mark a folder as holding a run of adacs-train.
RUN_MARKERS = ("summary.json", "checkpoints", "csv/metrics.csv", "backbone.pt")
#: Flags after which Hydra only prints (help, config, completion): nothing to check.
_PRINT_ONLY = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--version")
_MULTIRUN = ("-m", "--multirun")


class PreflightError(ConfigError):
    """A command-line mistake found before Hydra ran."""


def preflight(argv: list[str]) -> None:
    """Check the overrides in ``argv`` (without the program name); raise :class:`ConfigError` on a mistake.

    For a run resumed into its own folder (``ckpt_path=`` given), the folder's ``.hydra`` config
    is copied aside before Hydra rewrites it.
    """
    if any(arg in _PRINT_ONLY or arg.startswith("--cfg=") for arg in argv):
        return
    overrides = [arg for arg in argv if not arg.startswith("-")]
    parsed = _parse(overrides)
    if any(arg in _MULTIRUN for arg in argv) or any(o.is_sweep_override() for o in parsed):
        return  # a sweep: each job's config is checked by its own run
    cfg = compose(overrides)
    if "MULTIRUN" in str(OmegaConf.select(cfg, "hydra.mode", default="")):
        return  # an experiment that always sweeps
    _check_top_level_keys(cfg)
    _check_group_keys(cfg, overrides)
    configs.check_epochs(cfg)
    _check_run_folder(cfg, overrides)


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as error:
        bad = next((o for o in overrides if _unparsable(o)), overrides[-1] if overrides else "")
        key, _, value = bad.partition("=")
        raise PreflightError(
            key or "command line",
            f"Hydra cannot parse '{bad}' ({str(error).splitlines()[0]}).",
            "Values with spaces, brackets, parentheses, commas, '=' or non-ASCII characters must be quoted "
            f"for Hydra and for the shell, e.g. \"{key}='{value}'\".",
        ) from None


def _unparsable(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_overrides([override])
        return False
    except Exception:  # noqa: BLE001 - any parse failure marks the culprit
        return True


def compose(overrides: list[str]) -> DictConfig:
    """adacs-train's config for ``overrides``, with the ``hydra`` node; composition errors explained."""
    from hydra.errors import HydraException, MissingConfigException

    try:
        return configs.compose(overrides, hydra_node=True)
    except MissingConfigException as error:
        raise PreflightError("config group", str(error).strip()) from None
    except HydraException as error:
        raise _explain_composition_error(str(error)) from None


def _explain_composition_error(message: str) -> PreflightError:
    first = message.strip().splitlines()[0]
    if first.startswith("Could not override '"):
        key = first.split("'")[1]
        group, _, sub = key.partition(".")
        owners = configs.options_with_key(group, sub) if sub else []
        if owners:
            fix = (
                f"'{sub}' is a setting of {group}={' / '.join(owners)}: select it too, "
                f"e.g. adacs-train {group}={owners[0]} {key}=…"
            )
        elif group == "method" and sub in REFERENCE_RECIPE_SETTINGS:
            fix = f"'{sub}' is a setting of the reference recipe: add experiment=reference, e.g. adacs-train experiment=reference {key}=…"
        else:
            fix = "It is not a setting of adacs-train: check the spelling (adacs-train --cfg job lists every setting)."
        return PreflightError(key, "is not in the config this command composes.", fix)
    return PreflightError("command line", " ".join(message.split()))


def _check_top_level_keys(cfg: DictConfig) -> None:
    known = configs.primary_keys() | configs.default_groups() | {"hydra"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise PreflightError(
            unknown[0],
            f"is not a setting of adacs-train (added with +{unknown[0]}=…, it would be ignored).",
            "Check the spelling; adacs-train --cfg job lists every setting.",
        )


#: Groups whose top-level keys are a fixed set of settings (a key added with ``+`` is a mistake).
_CHECKED_GROUPS = ("data", "method", "backbone", "similarity", "scorer", "trainer")


def _check_group_keys(cfg: DictConfig, overrides: list[str]) -> None:
    """A key added with ``+group.key=`` that the selected option does not have would be passed on and fail."""
    added = [o.split("=", 1)[0].lstrip("+") for o in overrides if o.startswith("+") and "." in o.split("=", 1)[0]]
    for key in added:
        group, _, sub = key.partition(".")
        if group not in _CHECKED_GROUPS or "." in sub:
            continue
        option = OmegaConf.select(cfg, f"hydra.runtime.choices.{group}", default=None)
        reference = _option_keys(group, str(option)) if option is not None else None
        if reference is None or sub in reference:
            continue
        owners = configs.options_with_key(group, sub)
        hint = f" It is a setting of {group}={' / '.join(owners)}: select that option." if owners else ""
        if group == "method" and sub in REFERENCE_RECIPE_SETTINGS:
            hint = f" It is a setting of the reference recipe: add experiment=reference and set {key}=… (no +)."
        raise PreflightError(
            key,
            f"is not a setting of {group}={option}.{hint}",
            "Check the spelling; adacs-train --cfg job lists every setting.",
        )


@cache
def _option_keys(group: str, option: str) -> frozenset[str] | None:
    """The top-level keys ``group=option`` has once composed (defaults and shared fragments included)."""
    try:
        cfg = compose([f"{group}={option}"])
    except ConfigError:
        return None
    node = OmegaConf.select(cfg, group)
    return frozenset(node) if isinstance(node, DictConfig) else None


def _check_run_folder(cfg: DictConfig, overrides: list[str]) -> None:
    """The run folder can be written; one that holds a run is reused only to resume it (``ckpt_path=``) or with ``overwrite=true``."""
    folder = Path(str(cfg.hydra.run.dir))
    check_writable(
        folder,
        "The run folder (hydra.run.dir)",
        "Choose a folder you can write to with hydra.run.dir=…, or run from a writable working directory.",
    )
    if not any(o.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for o in overrides):
        return  # a fresh, time-stamped folder
    held = [marker for marker in RUN_MARKERS if (folder / marker).exists()]
    if not held:
        return
    if cfg.get("ckpt_path") is not None:
        backup_run_config(folder)
        return
    if cfg.get("overwrite"):
        return
    raise PreflightError(
        "hydra.run.dir",
        f"'{folder}' already holds a run ({', '.join(held)}); it would be overwritten.",
        f"Resume it with ckpt_path={folder / 'checkpoints' / 'last.ckpt'}, choose another folder, or replace it "
        "with overwrite=true.",
    )


def backup_run_config(run_dir: Path) -> Path | None:
    """Copy ``run_dir/.hydra/*.yaml`` to ``.hydra/before-resume-<time>/`` before a resumed run rewrites them."""
    hydra_dir = run_dir / ".hydra"
    if not hydra_dir.is_dir():
        return None
    backup = hydra_dir / f"before-resume-{time.strftime('%Y%m%d-%H%M%S')}"
    backup.mkdir(parents=True, exist_ok=True)
    for file in hydra_dir.glob("*.yaml"):
        shutil.copy2(file, backup / file.name)
    return backup
