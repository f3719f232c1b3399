"""Finding what to evaluate: a run folder or checkpoint → its checkpoint, data config and names."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from ..checkpoint_io import read_checkpoint
from ..configs import RUN_CONFIG, backbone_name, compose, group_options, run_folder
from ..data.pairs import SPLITS
from ..errors import AdaCSError, ConfigError

# Settings that change how pairs are loaded or where files go, not which pairs: left out of data_key.
_LOADING_KEYS = ("batch_size", "num_workers", "cache_workers", "output_dir", "strict")


@dataclass
class Run:
    """One trained model to evaluate.

    Attributes:
        checkpoint: the ``.ckpt`` (or ``backbone.pt``) file.
        folder: the run folder (with ``.hydra/config.yaml``), or None for a bare checkpoint.
        config: the run's composed config (unresolved), or None.
        backbone: the backbone's name (the Hydra choice, else the network's class name).
        method: the method's name: the Hydra choice, else the one the checkpoint records
            (``adacs``, ``baseline``, ``nll``, ``beta_nll``; ``unknown`` when it records none).
        seed: the run's seed, or None.
        name: a label to show instead of :attr:`label`'s default.
        similarity: the similarity the backbone was trained with (e.g. ``LocalNCC(window=9)``).
    """

    checkpoint: Path
    folder: Path | None
    config: DictConfig | None
    backbone: str
    method: str
    seed: int | None
    name: str | None = None
    similarity: str = "unknown"

    @property
    def label(self) -> str:
        """A short name: ``name`` if set, else ``backbone/method/seedS``."""
        if self.name:
            return self.name
        seed = "" if self.seed is None else f"/seed{self.seed}"
        return f"{self.backbone}/{self.method}{seed}"


def best_checkpoint(folder: Path, which: str = "selected") -> Path:
    """The checkpoint of a run folder to evaluate.

    ``selected``: the one the run chose (``summary.json``'s ``selected_checkpoint``: its
    ``final_checkpoint`` setting), else ``best``; ``best``: ``checkpoints/best-*.ckpt`` (newest if
    several), else ``last.ckpt``; ``last``: ``checkpoints/last.ckpt``.
    """
    if which not in ("selected", "best", "last"):
        raise ConfigError("checkpoint", f"must be selected, best or last, got {which!r}.")
    summary = folder / "summary.json"
    if which == "selected" and summary.is_file():
        chosen = json.loads(summary.read_text()).get("selected_checkpoint")
        if chosen and Path(chosen).is_file():
            return Path(chosen)
    last = folder / "checkpoints" / "last.ckpt"
    if which == "last" and last.is_file():
        return last
    candidates = sorted((folder / "checkpoints").glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if candidates:
        return candidates[-1]
    if last.is_file():
        return last
    if (folder / "backbone.pt").is_file():
        return folder / "backbone.pt"
    raise AdaCSError(
        f"Run folder '{folder}' has no checkpoint (checkpoints/best-*.ckpt, checkpoints/last.ckpt or "
        "backbone.pt): did its training finish? Give a checkpoint file instead."
    )


def resolve_run(path: str | Path, checkpoint: str = "selected") -> Run:
    """A run folder or a checkpoint file → :class:`Run`, with a clear error for anything else.

    ``checkpoint`` chooses a run folder's checkpoint (see :func:`best_checkpoint`).
    """
    path = Path(path)
    if path.is_dir():
        folder, checkpoint_file = path, None
    elif path.is_file():
        folder, checkpoint_file = run_folder(path), path
    else:
        raise AdaCSError(f"No checkpoint or run folder at '{path}': give a run folder or a .ckpt / backbone.pt file.")
    config = choices = None
    if folder is not None and (folder / RUN_CONFIG).is_file():
        config = OmegaConf.load(folder / RUN_CONFIG)
        hydra_file = folder / ".hydra" / "hydra.yaml"
        if hydra_file.is_file():
            choices = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices")
    elif path.is_dir():
        raise AdaCSError(f"'{path}' is not a run folder of adacs-train (no .hydra/config.yaml): give a checkpoint.")
    checkpoint_path = checkpoint_file or best_checkpoint(folder, checkpoint)
    stored_method, backbone_config, similarity = _checkpoint_header(checkpoint_path)
    backbone = (choices or {}).get("backbone") or backbone_name(backbone_config)
    method = (choices or {}).get("method") or stored_method
    seed = config.get("seed") if config is not None else None
    seed = None if seed is None else int(seed)
    return Run(checkpoint_path, folder, config, str(backbone), str(method), seed, similarity=similarity)


def _checkpoint_header(path: Path) -> tuple[str, dict | None, str]:
    """``(method name, backbone config, similarity)`` of a checkpoint; a clear error for an unreadable file.

    The method is the one the checkpoint records (``unknown`` for a ``backbone.pt`` written
    before files recorded it: its weights alone cannot tell).
    """
    from ..checkpoint import BACKBONE_CONFIG_KEY, SIMILARITY_KEY, method_of

    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise AdaCSError(f"'{path}' is not an adacs-train checkpoint (no state_dict).")
    # Files written before checkpoints recorded it were trained with the squared error.
    similarity = str(checkpoint.get(SIMILARITY_KEY, "SquaredError()"))
    return method_of(checkpoint) or "unknown", checkpoint.get(BACKBONE_CONFIG_KEY), similarity


def data_config(
    run: Run,
    data: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    output_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The resolved data config to evaluate ``run`` on.

    Args:
        run: the run; its ``.hydra/config.yaml`` data config is the default.
        data: a data config to use instead: a name in ``conf/data`` (``synthetic``) or a YAML file.
        overrides: ``data.key=value`` settings applied on top (Hydra/OmegaConf dot-list syntax).
        output_dir: where a datamodule writes its files (``splits.json``…) during evaluation; it
            stands in for the training run's ``${paths.output_dir}``, which Hydra resolved at run time.
    """
    root = OmegaConf.create({"seed": 0}) if run.config is None else run.config.copy()
    root.paths = {"output_dir": str(output_dir or run.folder or run.checkpoint.parent)}
    if data is not None:
        root.data = _load_data_option(data)
    if root.get("data") is None:
        raise ConfigError(
            "data",
            f"'{run.checkpoint}' has no run folder to read its data config from.",
            "Name the data set: --data synthetic (or data=synthetic), or a YAML file of a data config.",
        )
    bad = [o for o in overrides if not o.startswith("data.") or "=" not in o]
    if bad:
        raise ConfigError("data", f"cannot apply {bad}.", "Overrides have the form data.key=value.")
    if overrides:
        root = OmegaConf.merge(root, OmegaConf.from_dotlist(list(overrides)))
    try:
        return OmegaConf.to_container(root.data, resolve=True)
    except Exception as error:  # an interpolation to a key that is not there
        raise ConfigError(
            "data", f"could not be resolved ({error}).", "Check the data config and overrides."
        ) from error


def _load_data_option(name: str) -> DictConfig:
    """A data config: a YAML file of one (self-contained), or a name in ``conf/data`` composed by Hydra."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError("data", f"no data config file at '{path}'.", "Give a YAML file or a name in conf/data.")
        config = OmegaConf.load(path)
        if "defaults" in config:
            raise ConfigError("data", f"'{name}' has a defaults list.", "Give the composed data config (--cfg job).")
        return config
    options = group_options("data")
    if name not in options:
        raise ConfigError("data", f"no data config named '{name}'.", f"Choose one of {options} or a YAML file.")
    return compose([f"data={name}"]).data


def data_key(config: dict[str, Any], split: str = "test") -> str:
    """A short fingerprint of the ``split`` pairs a data config yields.

    Cases of two runs are paired (and a case evaluated by several runs averaged) only when
    their data keys agree, so that seeds that change the synthetic data set never pair
    different images under the same case id. Left out: loading settings, the pair limits of
    the other splits, and, for data read from files (whose case ids name the files), the
    seed, which only decides which split a case falls in.
    """
    ignored = set(_LOADING_KEYS) | {f"{other}_pairs" for other in SPLITS if other != split}
    if _reads_files(config):
        ignored.add("seed")
    content = {k: v for k, v in config.items() if k not in ignored}
    return hashlib.sha1(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _reads_files(config: dict[str, Any]) -> bool:
    """Whether the config's ``_target_`` is a :class:`~adacs_lightning.data.FileDataModule` (False if unknown)."""
    from ..data.base import FileDataModule

    try:
        target = get_class(str(config.get("_target_")))
    except Exception:  # not importable here: keep every setting in the key
        return False
    return isinstance(target, type) and issubclass(target, FileDataModule)


def run_overrides(folder: Path | None) -> dict[str, str]:
    """The command-line overrides Hydra recorded for a run (``.hydra/overrides.yaml``), as ``key → value``."""
    path = None if folder is None else folder / ".hydra" / "overrides.yaml"
    if path is None or not path.is_file():
        return {}
    pairs = (str(item).lstrip("+~").partition("=") for item in OmegaConf.load(path))
    return {key: value for key, _, value in pairs}


def differing_overrides(folders: Sequence[Path | None], ignore: Sequence[str] = ()) -> list[list[str]]:
    """Per run, the ``key=value`` overrides that are not the same for every run (``ignore``d keys left out)."""
    recorded = [run_overrides(f) for f in folders]
    keys = sorted(k for k in {k for r in recorded for k in r} - set(ignore) if not k.startswith("hydra."))
    varying = [k for k in keys if len({r.get(k) for r in recorded}) > 1]
    return [[f"{k}={r[k]}" for k in varying if k in r] for r in recorded]
