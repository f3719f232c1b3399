import math

import pytest
import torch

from adacs_lightning.momentum import MomentumWeight
from adacs_lightning.schedule import Phase, phase_at


def b(mu, kappa):
    return math.cos(0.5 * math.pi * min(kappa * mu, 1.0))


def test_first_value_is_b1_and_recursion_matches_hand_computation():
    momentum = MomentumWeight(gamma=0.9, kappa=50.0)
    mus = [0.015, 0.01, 0.004, 0.002]
    expected, m = [], 0.0
    for t, mu in enumerate(mus, start=1):
        g = min(0.9, 1 - 1 / t)
        m = g * m + (1 - g) * b(mu, 50.0)
        expected.append(m)
    got = [momentum.update(torch.tensor(mu)).item() for mu in mus]
    assert got == pytest.approx(expected, rel=1e-6)
    assert got[0] == pytest.approx(b(0.015, 50.0))
    assert int(momentum.count) == 4


def test_auto_kappa_calibrates_on_first_residual():
    momentum = MomentumWeight(gamma=0.99, kappa="auto")
    assert momentum.update(torch.tensor(0.02)).item() == pytest.approx(0.0, abs=1e-6)
    assert momentum.kappa.item() == pytest.approx(50.0)
    momentum.update(torch.tensor(0.005))  # κμ = 0.25 → b = cos(π/8), weight 1/2 at T=2
    assert momentum.value.item() == pytest.approx(0.5 * math.cos(math.pi / 8), rel=1e-6)
    assert momentum.kappa.item() == pytest.approx(50.0)


def test_value_stays_in_unit_interval_for_any_residual():
    momentum = MomentumWeight(gamma=0.5, kappa=50.0)
    for mu in [10.0, 0.0, 1e-8, 3.0, 0.02, 0.0]:
        value = momentum.update(torch.tensor(mu)).item()
        assert 0.0 <= value <= 1.0


def test_state_travels_in_state_dict():
    momentum = MomentumWeight(kappa="auto")
    momentum.update(torch.tensor(0.01))
    momentum.update(torch.tensor(0.008))
    restored = MomentumWeight(kappa="auto")
    restored.load_state_dict(momentum.state_dict())
    assert set(momentum.state_dict()) == {"value", "count", "kappa"}
    assert restored.update(torch.tensor(0.005)).item() == pytest.approx(momentum.update(torch.tensor(0.005)).item())


@pytest.mark.parametrize("kwargs", [{"gamma": 1.0}, {"gamma": -0.1}, {"kappa": 0.0}, {"kappa": "fast"}])
def test_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        MomentumWeight(**kwargs)


def test_schedule_phases():
    phases = [phase_at(epoch, 2) for epoch in range(6)]
    assert phases == [Phase.WARMUP_BACKBONE] * 2 + [Phase.WARMUP_SCORER] * 2 + [Phase.JOINT] * 2
    assert phase_at(0, 0) is Phase.JOINT
    assert {phase_at(e, 2, scoring=False) for e in range(10)} == {Phase.WARMUP_BACKBONE}
    with pytest.raises(ValueError):
        phase_at(-1, 2)
