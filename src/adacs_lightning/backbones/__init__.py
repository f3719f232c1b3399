"""Registration backbones and the adapter that brings any network to the backbone contract.

Each named backbone is a factory returning a :class:`Backbone` (``(moving, fixed)`` →
displacement in voxels); ``conf/backbone/NAME.yaml`` builds it for ``adacs-train backbone=NAME``.
Your own network needs one line::

    model = AdaCS(my_net)                                  # my_net(moving, fixed) -> ddf
    model = AdaCS(as_backbone(my_net, inputs="concat"))    # my_net(cat([moving, fixed], 1)) -> ddf
    model = AdaCS(as_backbone(my_net, output="velocity"))  # a stationary velocity field
"""

from .adapter import Backbone, RegistrationOutput, as_backbone, infer_image_geometry
from .custom import custom_backbone
from .diffusemorph import DiffuseMorph, diffusemorph
from .globalnet import globalnet
from .lapirn import ConditionalLapIRN, lapirn
from .transmorph import TransMorph, transmorph
from .voxelmorph import voxelmorph

__all__ = [
    "Backbone",
    "ConditionalLapIRN",
    "DiffuseMorph",
    "RegistrationOutput",
    "TransMorph",
    "as_backbone",
    "custom_backbone",
    "diffusemorph",
    "globalnet",
    "infer_image_geometry",
    "lapirn",
    "transmorph",
    "voxelmorph",
]
