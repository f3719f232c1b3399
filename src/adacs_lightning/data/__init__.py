"""Data modules producing the batch dict: ``source``, ``target``, optional labels, ``mask`` and ``meta``."""

from .phantom import LABEL_NAMES, Nuisances, PhantomPair, make_pair
from .synthetic import SyntheticDataModule, SyntheticPairs

__all__ = ["LABEL_NAMES", "Nuisances", "PhantomPair", "SyntheticDataModule", "SyntheticPairs", "make_pair"]
