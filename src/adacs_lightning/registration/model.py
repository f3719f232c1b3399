"""A trained run loaded for registration: its network, scorer, intensity scaling, training grid and refinement."""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint as checkpoints
from ..choices import INTENSITY_MODES
from ..configs import RUN_CONFIG, run_folder, run_setting
from ..data.recipe import GridRecipe
from ..devices import resolve_device
from ..errors import AdaCSError
from ..evaluation.quality import MAP_NAMES
from ..evaluation.runs import best_checkpoint
from ..refine import Refiner

log = logging.getLogger(__name__)


@dataclass
class RegistrationModel:
    """What registering a pair needs from a trained run.

    ``backbone``: the network; ``method``: the whole trained method (with its scorer) when the run folder
    rebuilds it, else None; ``scale``: the intensity scaling to [0, 1] (None: images as they are);
    ``recipe``: the training data's grid steps (:class:`~adacs_lightning.data.recipe.GridRecipe`);
    ``refiner``: per-pair refinement, or None; ``maps``: the maps each pair writes.
    """

    backbone: Any
    checkpoint: Path
    device: torch.device
    scale: str | None = "minmax"
    method: Any = None
    recipe: GridRecipe = field(default_factory=GridRecipe)
    refiner: Refiner | None = None
    maps: tuple[str, ...] = ()

    @property
    def scorer(self):
        return getattr(self.method, "scorer", None)

    @classmethod
    def load(
        cls,
        model: Path,
        device: str = "auto",
        intensity: str | None = None,
        scale: bool = True,
        maps: str = "auto",
        refine: dict | None = None,
        preprocess: bool = True,
    ) -> RegistrationModel:
        """Load ``model`` (a run folder, ``.ckpt`` or ``backbone.pt``).

        ``intensity`` overrides the run's scaling; ``scale=False`` feeds images as they are. ``maps``:
        comma-separated from :data:`~adacs_lightning.evaluation.quality.MAP_NAMES`, ``auto`` or ``none``.
        ``refine``: :class:`~adacs_lightning.refine.Refiner` settings (``steps``, ``lr``, ``grid``, ``weights``).
        ``preprocess``: put pairs on the training data's grid (the run's reorientation, spacing and size).
        """
        model = Path(model)
        checkpoint = best_checkpoint(model) if model.is_dir() else model
        backbone = checkpoints.load_backbone(checkpoint, map_location="cpu")
        resolved = resolve_device(device)
        method = None
        if refine or "score" in maps:
            method = load_run_method(model, checkpoint, resolved)
        elif maps == "auto":  # the score map where the run folder rebuilds a method with a scorer
            try:
                method = load_run_method(model, checkpoint, resolved)
            except AdaCSError as error:
                log.warning("no score map (%s)", error)
        scaling = (intensity or training_intensity(model) or "minmax") if scale else None
        recipe = training_grid(model) if preprocess else GridRecipe()
        refiner = _refiner(model, method, refine, resolved) if refine else None
        return cls(backbone, checkpoint, resolved, scaling, method, recipe, refiner, chosen_maps(maps, method))


def load_run_method(model: Path, checkpoint: Path, device: torch.device):
    """The run's trained method (backbone, scorer, objective) from its run folder, in eval mode; None without one."""
    from omegaconf import OmegaConf

    folder = run_folder(model)
    if folder is None:
        return None
    ckpt = checkpoint if str(checkpoint).endswith(".ckpt") else best_checkpoint(folder)
    return checkpoints.load_method(ckpt, OmegaConf.load(folder / RUN_CONFIG)).to(device).eval()


def chosen_maps(text: str, method) -> tuple[str, ...]:
    """The maps ``text`` asks for; ``auto``: the Jacobian, and the score where ``method`` has a scorer."""
    has_scorer = getattr(method, "scorer", None) is not None
    if text == "auto":
        return ("jacobian", "score") if has_scorer else ("jacobian",)
    chosen = () if text == "none" else tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in chosen if m not in MAP_NAMES]
    if unknown:
        raise AdaCSError(f"--maps: unknown map {unknown[0]!r}; choose from {', '.join(MAP_NAMES)}, auto or none.")
    if "score" in chosen and not has_scorer:
        raise AdaCSError(
            "--maps score needs a run folder whose method has a scorer (AdaCS); this model has none: "
            "drop score from --maps, or give --model the AdaCS run's folder."
        )
    return chosen


def _refiner(model: Path, method, refine: dict, device: torch.device) -> Refiner:
    if method is None:
        raise AdaCSError(
            f"--refine needs the run folder of {model} (its .hydra/config.yaml names the similarity, λ and scorer "
            "the refinement optimises with): give --model the run folder or a checkpoint inside it."
        )
    settings = {k: v for k, v in refine.items() if k != "weights" and v is not None}
    refiner = Refiner.from_module(method, refine.get("weights"), **settings)
    if refiner.scorer is not None:
        refiner.scorer.to(device)
    return refiner


def training_intensity(model: Path) -> str | None:
    """The intensity scaling the model was trained with: ``data.intensity`` of its run folder (``model``
    itself, or the folder a checkpoint lies in), else the data module's default; None without a run folder
    or when its data module has no such setting (e.g. synthetic data, generated in [0, 1])."""
    from hydra.utils import get_class

    data = run_setting(model, "data")
    if data is None:
        return None
    if "intensity" in data:
        value = data["intensity"]
    else:
        try:  # the setting left out of the config: the data module's default
            default = inspect.signature(get_class(str(data.get("_target_")))).parameters.get("intensity")
        except Exception:  # not importable here
            return None
        value = None if default is None or default.default is inspect.Parameter.empty else default.default
    # Only the file data sets' scalings apply to a file; synthetic data is generated in [0, 1].
    return str(value) if value in INTENSITY_MODES else None


def training_grid(model: Path) -> GridRecipe:
    """The grid steps of the run's data set (its data module's ``registration_grid``); none without a run folder
    or for data generated on its grid (synthetic)."""
    from hydra.utils import get_class, instantiate
    from omegaconf import OmegaConf

    folder = run_folder(model)
    if folder is None:
        return GridRecipe()
    config = OmegaConf.load(folder / RUN_CONFIG)
    config.paths = {"output_dir": str(folder)}  # Hydra resolved it at run time; nothing is written here
    target = str(OmegaConf.select(config, "data._target_", default=""))
    try:
        if not hasattr(get_class(target), "registration_grid"):
            return GridRecipe()
        datamodule = instantiate(OmegaConf.to_container(config.data, resolve=True))
    except Exception as error:  # a data module this version cannot rebuild
        raise AdaCSError(
            f"The run's data settings ({target}) could not be rebuilt to preprocess the pair as in training "
            f"({error}). Give the images on the training grid and pass --no-preprocess."
        ) from error
    return datamodule.registration_grid()
