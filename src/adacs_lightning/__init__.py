"""adacs-lightning: Adaptive Correspondence Scoring for unsupervised registration, as a Lightning plug-in.

Wrap any registration network in one line::

    from adacs_lightning import AdaCS
    model = AdaCS(my_net)          # my_net(moving, fixed) -> displacement
    lightning.Trainer(max_epochs=60).fit(model, datamodule)
    registration_net = model.export_backbone()
"""

from .backbones import Backbone, as_backbone, diffusemorph, globalnet, lapirn, transmorph, voxelmorph
from .checkpoint import load_backbone
from .data import (
    ACDCDataModule,
    CAMUSDataModule,
    DataError,
    FolderDataModule,
    Nuisances,
    OASISDataModule,
    SyntheticDataModule,
)
from .errors import AdaCSError, ConfigError, NonFiniteLossError
from .module import AdaCS
from .schedule import Phase
from .scoring import ScoringNetwork
from .variance import LogVarianceNetwork, VarianceWeighted

__version__ = "0.1.0"

__all__ = [
    "ACDCDataModule",
    "AdaCS",
    "AdaCSError",
    "Backbone",
    "CAMUSDataModule",
    "ConfigError",
    "DataError",
    "FolderDataModule",
    "LogVarianceNetwork",
    "NonFiniteLossError",
    "Nuisances",
    "OASISDataModule",
    "Phase",
    "ScoringNetwork",
    "SyntheticDataModule",
    "VarianceWeighted",
    "as_backbone",
    "diffusemorph",
    "globalnet",
    "lapirn",
    "load_backbone",
    "transmorph",
    "voxelmorph",
]
