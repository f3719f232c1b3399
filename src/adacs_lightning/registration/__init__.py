"""Registering new scans with a trained run, as a library: one pair or a folder of pairs.

Example (a network and two NIfTI files made on the spot; with a trained run,
``RegistrationModel.load(Path("outputs/<run>"))`` builds the model)::

    >>> import tempfile
    >>> from pathlib import Path
    >>> import nibabel as nib, numpy as np, torch
    >>> from adacs_lightning import voxelmorph
    >>> from adacs_lightning.registration import PairSettings, RegistrationModel, register_pair
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("source", "target"):
    ...     nib.save(nib.Nifti1Image(np.random.rand(32, 32).astype("float32"), np.eye(4)), str(folder / f"{name}.nii.gz"))
    >>> network = voxelmorph(spatial_dims=2, channels=[4, 8, 8, 8], unet_out_channels=8, final_conv_channels=[8])
    >>> model = RegistrationModel(network, Path("untrained"), torch.device("cpu"), maps=("jacobian",))
    >>> result = register_pair(model, PairSettings(), folder / "source.nii.gz", folder / "target.nii.gz", folder / "out")
    >>> sorted(result.files)[:3], result.record["quality"]["flag"] in ("ok", "review")
    (['displacement', 'displacement_voxels', 'inverse_displacement'], True)

``adacs-register`` is this package's console front; tests/test_register.py runs the example on files it writes.
"""

from .folder import FolderResult, register_folder
from .grids import NetworkGrid, on_target_grid, resample_to
from .model import RegistrationModel, chosen_maps, load_run_method, training_grid, training_intensity
from .pair import GRID_CHOICES, PairResult, PairSettings, register_pair

__all__ = [
    "GRID_CHOICES",
    "FolderResult",
    "NetworkGrid",
    "PairResult",
    "PairSettings",
    "RegistrationModel",
    "chosen_maps",
    "load_run_method",
    "on_target_grid",
    "register_folder",
    "register_pair",
    "resample_to",
    "training_grid",
    "training_intensity",
]
