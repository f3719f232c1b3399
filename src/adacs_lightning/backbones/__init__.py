"""Registration backbones and the adapter that brings any network to the backbone contract."""

from .adapter import Backbone, RegistrationOutput, as_backbone, infer_image_geometry
from .voxelmorph import voxelmorph

__all__ = ["Backbone", "RegistrationOutput", "as_backbone", "infer_image_geometry", "voxelmorph"]
