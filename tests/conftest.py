"""Shared fixtures; helpers live in tests/helpers/. Every test runs on the CPU in seconds."""

from __future__ import annotations

import os

import pytest
import torch

from adacs_lightning import Nuisances

from .helpers.training import tiny_datamodule

os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker process (and per training it starts), so that the workers share the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def datamodule():
    return tiny_datamodule()


@pytest.fixture
def clean_nuisance():
    return Nuisances(noise="none", drift=0.0, shadow_prob=0.0, dropout_prob=0.0, extra_structure_prob=0.0, fov=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is available (they are skipped, with the reason, elsewhere)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def single_thread():
    """One intra-op thread for the test: parallel reductions then sum in a fixed order (bit-exact reruns)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
