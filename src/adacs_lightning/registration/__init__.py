"""Registering new scans with a trained run, as a library: one pair or a folder of pairs.

Example::

    >>> from pathlib import Path
    >>> from adacs_lightning.registration import PairSettings, RegistrationModel, register_pair
    >>> model = RegistrationModel.load(Path("outputs/run"), device="cpu")  # doctest: +SKIP
    >>> result = register_pair(model, PairSettings(), Path("es.nii.gz"), Path("ed.nii.gz"), Path("out"))  # doctest: +SKIP
    >>> result.record["quality"]["flag"]  # doctest: +SKIP
    'ok'

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
