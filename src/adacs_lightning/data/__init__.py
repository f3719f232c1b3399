"""Data modules producing the batch dict: ``source``, ``target``, optional labels, ``mask`` and ``meta``.

``SyntheticDataModule`` generates its pairs in memory; ``ACDCDataModule``, ``CAMUSDataModule``,
``OASISDataModule`` and ``FolderDataModule`` read data sets from disk (see their modules for the
layouts), preprocess every case once with MONAI and keep it cached.
"""

from .acdc import ACDCDataModule
from .bad_cases import BadCase, DataError, SkippedCaseWarning
from .base import FileDataModule, PairDataModule
from .camus import CAMUSDataModule
from .folder import FolderDataModule
from .io import SimpleITKReader
from .oasis import OASISDataModule
from .phantom import LABEL_NAMES, Nuisances, PhantomPair, make_pair
from .synthetic import SyntheticDataModule, SyntheticPairs

__all__ = [
    "ACDCDataModule",
    "BadCase",
    "CAMUSDataModule",
    "DataError",
    "FileDataModule",
    "FolderDataModule",
    "LABEL_NAMES",
    "Nuisances",
    "OASISDataModule",
    "SkippedCaseWarning",
    "PairDataModule",
    "PhantomPair",
    "SimpleITKReader",
    "SyntheticDataModule",
    "SyntheticPairs",
    "make_pair",
]
