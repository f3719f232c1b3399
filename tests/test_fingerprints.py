"""Seeded tiny runs of every method train what they trained when tests/data/method_fingerprints.pt was recorded.

The record was made before the methods' objective, metrics and reference recipe moved into modules of
their own (``python -m tests.helpers.fingerprints --check`` reports bit-identity on the recording CPU).
Here the comparison allows float rounding, since another CPU may round differently.
"""

from __future__ import annotations

import pytest
import torch

from .helpers.fingerprints import FINGERPRINTS, RUNS, train_run


@pytest.fixture(scope="module")
def recorded():
    return torch.load(FINGERPRINTS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_seeded_tiny_run_trains_the_recorded_model(name, recorded, tmp_path):
    expected, actual = recorded[name], train_run(name, tmp_path)
    assert set(actual["state"]) == set(expected["state"])
    for key, value in expected["state"].items():
        torch.testing.assert_close(actual["state"][key], value, rtol=1e-3, atol=2e-4, msg=key)
    assert actual["val_dice"] == pytest.approx(expected["val_dice"], abs=2e-3)
