"""Hydra configuration tree of adacs-lightning, shipped as the package ``adacs_lightning.conf``."""
