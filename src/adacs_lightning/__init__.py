"""adacs-lightning: Adaptive Correspondence Scoring for unsupervised registration, as a Lightning plug-in.

Wrap any registration network in one line::

    from adacs_lightning import AdaCS
    model = AdaCS(my_net)          # my_net(moving, fixed) -> displacement; adacs-train's defaults
    paper = AdaCS.paper(my_net)    # the paper's settings (PAPER), as experiment=paper
    lightning.Trainer(max_epochs=60).fit(model, datamodule)
    registration_net = model.export_backbone()

Names are imported on first use, so that command-line tools answer ``--help`` without
loading PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name → the module that defines it
_EXPORTS = {
    "ACDCDataModule": "data",
    "CAMUSDataModule": "data",
    "DataError": "data",
    "FolderDataModule": "data",
    "Nuisances": "data",
    "OASISDataModule": "data",
    "SyntheticDataModule": "data",
    "Backbone": "backbones",
    "as_backbone": "backbones",
    "diffusemorph": "backbones",
    "globalnet": "backbones",
    "lapirn": "backbones",
    "transmorph": "backbones",
    "voxelmorph": "backbones",
    "load_backbone": "checkpoint",
    "AdaCSError": "errors",
    "ConfigError": "errors",
    "NonFiniteLossError": "errors",
    "AdaCS": "methods",
    "ClosedFormRobust": "methods",
    "LogVarianceNetwork": "methods",
    "PAPER": "methods",
    "ReferenceAdaCS": "methods",
    "RegistrationModule": "methods",
    "VarianceWeighted": "methods",
    "Refiner": "refine",
    "register_refined": "refine",
    "Phase": "schedule",
    "ScoringNetwork": "scoring",
    "VoxelMorphScorer": "scoring",
    "LocalNCC": "similarity",
    "MutualInformation": "similarity",
    "SquaredError": "similarity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adacs_lightning' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
