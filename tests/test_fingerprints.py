"""Seeded tiny runs of every method train what they trained when tests/data/method_fingerprints.pt was recorded.

The record was made before the methods' objective, metrics and reference recipe moved into modules of
their own (``python -m tests.helpers.fingerprints --check`` reports bit-identity on the recording CPU).
Here the comparison allows float rounding, since another CPU may round differently.
"""

from __future__ import annotations

import copy

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
    model = actual["model"].eval()
    networks = tuple(f"{n}." for n, net in model.named_children() if net in model.weighting_networks)
    for key, value in expected["state"].items():
        if not key.startswith(networks):
            torch.testing.assert_close(actual["state"][key], value, rtol=1e-3, atol=2e-4, msg=key)
    # A weighting network is compared by its map: biases in front of its instance norms have a zero
    # gradient in exact arithmetic, and Adam turns another CPU's rounding there into ±lr steps.
    record = copy.deepcopy(model)
    record.load_state_dict(expected["state"])
    fixed = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    residual = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)) * 0.05
    with torch.no_grad():
        maps = [m.weight_map(fixed, residual) for m in (model, record)]
    if maps[0] is not None:
        torch.testing.assert_close(maps[0], maps[1], rtol=1e-3, atol=2e-4)
    assert actual["val_dice"] == pytest.approx(expected["val_dice"], abs=2e-3)
