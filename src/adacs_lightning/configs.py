"""The config tree and the run folders it describes: ``conf/``, shipped as the package ``adacs_lightning.conf``.

The one place that knows the config package's name, composes ``adacs-train``'s config from
overrides, reads the primary config's defaults list and the keys of each group's options, checks
what every entry point checks (the schedule's length), names the network a backbone config
builds, and finds the run folder (``.hydra/config.yaml``) a checkpoint belongs to. Only OmegaConf
is imported here, and Hydra when a config is composed, so that the command-line tools can use it
without loading PyTorch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

#: The importable package that holds the config tree (``conf/`` in the repository).
CONFIG_PACKAGE = "adacs_lightning.conf"
#: The primary config's name (``conf/config.yaml``).
PRIMARY_CONFIG = "config"
#: Hydra's ``version_base`` for every composition and for ``adacs-train``.
HYDRA_VERSION_BASE = "1.3"
#: Where a run folder keeps the config Hydra composed for it.
RUN_CONFIG = Path(".hydra") / "config.yaml"
#: The folder of a group's shared fragments, which its options include as ``- common/<name>@_here_``.
SHARED_FRAGMENTS = "common"


def config_file(*parts: str, package: str = CONFIG_PACKAGE) -> Traversable:
    """A file or folder of the config tree, e.g. ``config_file("data")`` or ``config_file("config.yaml")``."""
    return resources.files(package).joinpath(*parts)


def compose(overrides: Iterable[str] = (), hydra_node: bool = False) -> DictConfig:
    """``adacs-train``'s config composed with ``overrides`` (Hydra's errors are raised as they are).

    Inside a Hydra application the config is composed in its context; elsewhere the config package
    is initialised for the call. ``hydra_node`` keeps the ``hydra`` node (run folder, choices);
    without it ``hydra:`` interpolations stay unresolved.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    if GlobalHydra.instance().is_initialized():
        return hydra_compose(PRIMARY_CONFIG, overrides=overrides, return_hydra_config=hydra_node)
    with initialize_config_module(config_module=CONFIG_PACKAGE, version_base=HYDRA_VERSION_BASE):
        return hydra_compose(PRIMARY_CONFIG, overrides=overrides, return_hydra_config=hydra_node)


def defaults_entry(entry: Any) -> tuple[str, Any] | None:
    """``(group, option)`` of one entry of a defaults list; None for an entry that names a config.

    ``{"data": "synthetic"}`` → ``("data", "synthetic")``; ``{"override /hydra/sweeper": "optuna"}``
    → ``("hydra/sweeper", "optuna")``; ``"_self_"`` and ``"common/files@_here_"`` → None.
    """
    if not isinstance(entry, dict) or len(entry) != 1:
        return None
    ((key, option),) = entry.items()
    group = str(key).strip()
    for keyword in ("override ", "optional "):
        group = group.removeprefix(keyword).strip()
    return group.lstrip("/"), option


def default_options(config_name: str = PRIMARY_CONFIG, package: str = CONFIG_PACKAGE) -> dict[str, Any]:
    """Config group → its default option (None for ``experiment: null``…), in the primary config's order."""
    config = OmegaConf.to_container(OmegaConf.create(config_file(f"{config_name}.yaml", package=package).read_text()))
    entries = (defaults_entry(entry) for entry in config.get("defaults") or [])
    return dict(entry for entry in entries if entry is not None)


def default_groups(config_name: str = PRIMARY_CONFIG, package: str = CONFIG_PACKAGE) -> set[str]:
    """Config groups named in the primary config's defaults list."""
    return set(default_options(config_name, package))


def primary_keys() -> set[str]:
    """The primary config's top-level keys (its settings and ``defaults``)."""
    return set(OmegaConf.create(config_file(f"{PRIMARY_CONFIG}.yaml").read_text()))


def group_options(group: str) -> list[str]:
    """The options of config ``group`` (its ``*.yaml`` files), sorted; [] for a group that does not exist."""
    folder = config_file(group)
    if not folder.is_dir():
        return []
    return sorted(file.name.removesuffix(".yaml") for file in folder.iterdir() if file.name.endswith(".yaml"))


@cache
def _option_file_keys(group: str) -> dict[str, frozenset[str]]:
    """option → the top-level keys its file sets, those of the shared fragments it includes (``common/<name>@_here_``) counted in."""
    folder = config_file(group)
    if not folder.is_dir():
        return {}
    options = {}
    for option in group_options(group):
        config = OmegaConf.create(folder.joinpath(f"{option}.yaml").read_text()) or {}
        keys = set(config) - {"defaults"}
        for entry in config.get("defaults", []):
            if isinstance(entry, str) and entry.startswith(f"{SHARED_FRAGMENTS}/") and entry.endswith("@_here_"):
                fragment = folder.joinpath(f"{entry.removesuffix('@_here_')}.yaml")
                keys |= set(OmegaConf.create(fragment.read_text()) or {})
        options[option] = frozenset(keys)
    return options


def options_with_key(group: str, key: str) -> list[str]:
    """The options of config ``group`` whose file sets ``key`` (e.g. ``data``, ``csv`` → ``["folder"]``)."""
    return sorted(option for option, keys in _option_file_keys(group).items() if key in keys)


def check_epochs(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for a schedule of no epochs (``trainer.max_epochs`` below 1, not -1)."""
    epochs = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
    if cfg.get("backbone_epochs") is not None or epochs is None:
        return
    try:
        count = int(epochs)
    except (TypeError, ValueError):  # not a number: Lightning names it
        return
    if count < 1 and count != -1:
        raise ConfigError(
            "trainer.max_epochs", f"must be at least 1, got {epochs}: nothing would be trained.", "E.g. 20."
        )


def backbone_network(config: Mapping[str, Any] | None) -> str | None:
    """The class a backbone config builds: a wrapped network's ``net._target_``, else its ``_target_``."""
    net = (config or {}).get("net")
    return (net.get("_target_") if isinstance(net, Mapping) else None) or (config or {}).get("_target_")


def backbone_dims(config: Mapping[str, Any] | None) -> int | None:
    """The dimensionality a backbone config sets (its ``spatial_dims`` or its network's), None if it sets none."""
    net = (config or {}).get("net")
    return (config or {}).get("spatial_dims") or (net.get("spatial_dims") if isinstance(net, Mapping) else None)


def backbone_name(config: Mapping[str, Any] | None, unknown: str = "backbone") -> str:
    """The short class name of the network a backbone config builds (``LocalNet``); ``unknown`` if it names none."""
    return str(backbone_network(config) or unknown).rsplit(".", 1)[-1]


def describe_backbone(config: Mapping[str, Any] | None) -> str:
    """A backbone config in words, e.g. ``2D LocalNet`` (``?`` for what it does not say)."""
    return f"{backbone_dims(config) or '?'}D {backbone_name(config, '?')}"


def run_folder(model: Path) -> Path | None:
    """The ``adacs-train`` run folder of ``model``: the folder itself, or the one a checkpoint lies in.

    ``checkpoints/<name>.ckpt`` and ``backbone.pt`` sit one or two levels below their run folder, which
    holds ``.hydra/config.yaml``; None when there is none.
    """
    candidates = [model] if model.is_dir() else [model.parent, model.parent.parent]
    return next((p for p in candidates if (p / RUN_CONFIG).is_file()), None)


def run_setting(model: Path, key: str, default: Any = None) -> Any:
    """A setting (``data.image_size``…) of ``model``'s run config, as plain Python; ``default`` without one."""
    folder = run_folder(model)
    if folder is None:
        return default
    value = OmegaConf.select(OmegaConf.load(folder / RUN_CONFIG), key, default=default)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def run_folders_in(folder: Path) -> list[Path]:
    """The run folders (with ``.hydra/config.yaml``) directly inside ``folder``, e.g. a sweep's jobs, sorted."""
    return sorted(p for p in folder.iterdir() if (p / RUN_CONFIG).is_file())
