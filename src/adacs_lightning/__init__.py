"""adacs-lightning: Adaptive Correspondence Scoring for unsupervised registration, as a Lightning plug-in.

Wrap any registration network in one line::

    from adacs_lightning import AdaCS
    model = AdaCS(my_net)          # my_net(moving, fixed) -> displacement
    lightning.Trainer(max_epochs=60).fit(model, datamodule)
    registration_net = model.export_backbone()
"""

from .backbones import Backbone, as_backbone, voxelmorph
from .checkpoint import load_backbone
from .data import Nuisances, SyntheticDataModule
from .errors import AdaCSError, ConfigError, NonFiniteLossError
from .module import AdaCS
from .schedule import Phase
from .scoring import ScoringNetwork

__version__ = "0.1.0"

__all__ = [
    "AdaCS",
    "AdaCSError",
    "Backbone",
    "ConfigError",
    "NonFiniteLossError",
    "Nuisances",
    "Phase",
    "ScoringNetwork",
    "SyntheticDataModule",
    "as_backbone",
    "load_backbone",
    "voxelmorph",
]
