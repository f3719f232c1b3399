"""Every loss term against values computed by hand."""

import math

import pytest
import torch

from adacs_lightning.losses import (
    closed_form_score,
    correspondence_loss,
    displacement_data_term,
    gradient_energy,
    masked_mean,
    score_regulariser,
    scoring_loss,
    squared_residual,
)
from adacs_lightning.momentum import momentum_target


def test_squared_residual_is_channel_mean_of_squares():
    warped = torch.tensor([[[[0.0, 1.0]], [[0.5, 0.5]]]])  # (1, 2, 1, 2)
    target = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    # voxel 0: ((1-0)² + (0-0.5)²)/2 = 0.625 ; voxel 1: (0 + 0.25)/2 = 0.125
    assert torch.allclose(squared_residual(warped, target), torch.tensor([[[[0.625, 0.125]]]]))


def test_squared_residual_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        squared_residual(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))


def test_masked_mean_counts_only_voxels_inside():
    values = torch.tensor([[[[1.0, 2.0], [3.0, 10.0]]]])
    mask = torch.tensor([[[[1.0, 1.0], [1.0, 0.0]]]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_mean(values).item() == pytest.approx(4.0)
    assert masked_mean(values, torch.zeros_like(mask)).item() == 0.0


def test_gradient_energy_of_a_ramp():
    # x-ramp with slope 2 along the last axis: every forward difference is 2 → 4; none along rows.
    field = (2.0 * torch.arange(5.0)).expand(1, 1, 3, 5)
    assert gradient_energy(field).item() == pytest.approx(4.0)
    # 3D: slopes 1 and 3 along two axes → 1 + 9.
    z, y, x = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    assert gradient_energy((z + 3 * y)[None, None]).item() == pytest.approx(10.0)


def test_gradient_energy_sees_a_checkerboard():
    board = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2
    assert gradient_energy(board[None, None].float()).item() == pytest.approx(2.0)


def test_gradient_energy_inside_a_mask():
    """Only differences between two voxels inside the mask count; an all-ones mask changes nothing."""
    # Row [0, 1, 3, 10] along the last axis: differences 1, 2, 7; the mask excludes the last voxel.
    field = torch.tensor([0.0, 1.0, 3.0, 10.0]).expand(1, 1, 2, 4).clone()
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0]).expand(1, 1, 2, 4)
    assert gradient_energy(field, mask).item() == pytest.approx((1 + 4) / 2)
    assert gradient_energy(field, torch.ones_like(mask)).item() == pytest.approx(gradient_energy(field).item())
    changed = field.clone()
    changed[..., 3] = -50.0  # outside the mask: no effect
    assert gradient_energy(changed, mask).item() == pytest.approx(gradient_energy(field, mask).item())


def test_backbone_objective_hand_computed():
    """L_de = data term + λ·smoothness, through the objective every method uses."""
    from adacs_lightning.backbones import RegistrationOutput
    from adacs_lightning.objective import BackboneObjective, Direction
    from adacs_lightning.similarity import SquaredError

    residual = torch.tensor([[[[0.2, 0.4]]]])
    score = torch.tensor([[[[0.5, 1.0]]]])
    ddf = torch.zeros(1, 2, 1, 2)
    ddf[0, 0, 0, 1] = 1.0  # one step of 1 along x in channel 0 → energy (1² over 1 difference)/2 channels
    image = torch.zeros(1, 1, 1, 2)
    direction = Direction(image, image, RegistrationOutput(ddf), residual)
    objective = BackboneObjective(SquaredError(), lam=0.1)
    total, data, logs = objective([direction], [score], None)
    assert data.item() == pytest.approx((0.1 + 0.4) / 2)
    assert logs["train/smooth_ddf"].item() == pytest.approx(0.5)
    assert total.item() == pytest.approx(0.25 + 0.05)
    _, data_unscored, _ = objective([direction], [None], None)
    assert data_unscored.item() == pytest.approx(0.3)


def test_scoring_loss_hand_computed():
    score = torch.tensor([[[[0.5, 1.0], [0.0, 1.0]]]])
    residual = torch.tensor([[[[0.2, 0.4], [1.0, 0.0]]]])
    total, ucs, reg, smooth = scoring_loss(score, residual, alpha=0.02, beta=1.5, momentum=0.5)
    assert ucs.item() == pytest.approx((0.1 + 0.4 + 0.0 + 0.0) / 4)
    assert reg.item() == pytest.approx((0.25 + 0 + 1 + 0) / 4)
    # rows: (1-0.5)²=0.25, (1-0)²=1 → mean 0.625; columns: (0-0.5)²=0.25, (1-1)²=0 → mean 0.125
    assert smooth.item() == pytest.approx(0.75)
    assert total.item() == pytest.approx(0.125 + 0.02 * 0.3125 + 1.5 * 0.5 * 0.75)


def test_score_terms_respect_the_mask():
    score = torch.tensor([[[[1.0, 0.0]]]])
    residual = torch.tensor([[[[0.5, 9.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])
    assert correspondence_loss(score, residual, mask).item() == pytest.approx(0.5)
    assert score_regulariser(score, mask).item() == pytest.approx(0.0)


def test_stop_gradients():
    """L_de never reaches the scorer; L_ucs never reaches the displacement."""
    scorer_param = torch.tensor(0.3, requires_grad=True)
    backbone_param = torch.tensor(0.7, requires_grad=True)
    score = torch.sigmoid(scorer_param * torch.ones(1, 1, 2, 2))
    residual = (backbone_param * torch.ones(1, 1, 2, 2)) ** 2
    data = displacement_data_term(residual, score)
    assert torch.autograd.grad(data, scorer_param, allow_unused=True)[0] is None
    assert torch.autograd.grad(data, backbone_param, retain_graph=True)[0] is not None
    ucs = correspondence_loss(score, residual)
    assert torch.autograd.grad(ucs, backbone_param, allow_unused=True, retain_graph=True)[0] is None
    assert torch.autograd.grad(ucs, scorer_param)[0] is not None


@pytest.mark.parametrize(
    ("mu", "kappa", "expected"),
    [
        (0.0, 50.0, 1.0),
        (0.01, 50.0, math.cos(math.pi / 4)),
        (0.02, 50.0, 0.0),
        (0.5, 50.0, 0.0),
        (0.01, 1.0, math.cos(0.005 * math.pi)),
    ],
)
def test_momentum_target(mu, kappa, expected):
    assert momentum_target(torch.tensor(mu), kappa).item() == pytest.approx(expected, abs=1e-6)


def test_momentum_target_stays_in_unit_interval():
    mu = torch.logspace(-6, 2, 200)
    b = momentum_target(mu, 50.0)
    assert bool((b >= 0).all()) and bool((b <= 1).all())


def test_data_weightings_by_hand():
    """mean: Σ S·r / N; normalised: Σ S·r / Σ S; scalar: mean(r)·mean(S); all inside the mask, S detached."""
    residual = torch.tensor([0.1, 0.2, 0.3, 0.4]).view(1, 1, 1, 4)
    score = torch.tensor([1.0, 0.5, 0.0, 0.5]).view(1, 1, 1, 4).requires_grad_()
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0]).view(1, 1, 1, 4)
    # inside: r = 0.1, 0.2, 0.3 and S = 1, 0.5, 0: Σ S·r = 0.2, Σ S = 1.5, mean r = 0.2, mean S = 0.5
    assert displacement_data_term(residual, score, mask, "mean").item() == pytest.approx(0.2 / 3)
    assert displacement_data_term(residual, score, mask, "normalised").item() == pytest.approx(0.2 / 1.5)
    assert displacement_data_term(residual, score, mask, "scalar").item() == pytest.approx(0.2 * 0.5)
    assert displacement_data_term(residual, None, mask, "normalised").item() == pytest.approx(0.2)
    assert not displacement_data_term(residual, score, mask, "normalised").requires_grad  # sg(Ŝ)
    # a uniform score changes nothing under normalisation: the baseline's balance against λ
    uniform = torch.full_like(residual, 0.3)
    assert displacement_data_term(residual, uniform, mask, "normalised").item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="weighting"):
        displacement_data_term(residual, score, mask, "median")


def test_closed_form_score_is_the_pointwise_minimiser_of_the_scorer_loss():
    alpha = 0.02
    residual = torch.tensor([0.0, 0.01, 0.03, 0.05]).view(1, 1, 1, 4)
    expected = torch.tensor([1.0, 0.75, 0.25, 0.0]).view(1, 1, 1, 4)
    torch.testing.assert_close(closed_form_score(residual, alpha), expected)
    grid = torch.linspace(0, 1, 10001)
    for r, s_star in zip(residual.flatten().tolist(), expected.flatten().tolist()):
        best = grid[torch.argmin(grid * r + alpha * (1 - grid) ** 2)]
        assert float(best) == pytest.approx(s_star, abs=1e-3)
    # weighting by sg(S*) gives the truncated quadratic's gradient ρ'(r) = S*
    r = residual.clone().requires_grad_()
    (closed_form_score(r, alpha) * r).sum().backward()
    torch.testing.assert_close(r.grad, expected)
