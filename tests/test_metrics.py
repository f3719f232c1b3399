import pytest
import torch

from adacs_lightning.metrics import dice_per_label, folding_percentage, jacobian_determinant


def test_dice_per_label_hand_computed():
    reference = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    reference[0, 0, :2, :] = 1  # 8 voxels of label 1
    reference[0, 0, 2:, :2] = 2  # 4 voxels of label 2
    prediction = torch.zeros_like(reference)
    prediction[0, 0, 1:3, :] = 1  # overlaps label 1 on 4 voxels
    dice = dice_per_label(prediction, reference, [1, 2, 3])
    assert dice[0, 0].item() == pytest.approx(2 * 4 / (8 + 8))
    assert dice[0, 1].item() == pytest.approx(0.0)
    assert torch.isnan(dice[0, 2])  # absent from both


def test_jacobian_of_affine_field():
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    a = torch.tensor([[0.2, 0.1], [-0.3, 0.5]])  # u_j = Σ_i a[j, i] x_i
    ddf = torch.stack([a[0, 0] * yy + a[0, 1] * xx, a[1, 0] * yy + a[1, 1] * xx])[None]
    det = jacobian_determinant(ddf)
    expected = torch.linalg.det(torch.eye(2) + a)
    assert torch.allclose(det, expected.expand_as(det), atol=1e-5)
    assert folding_percentage(ddf).item() == 0.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_written_out_determinant_equals_lu_on_random_fields_and_in_its_gradient(ndim):
    torch.manual_seed(ndim)
    ddf = (2.0 * torch.randn((2, ndim) + (6,) * ndim, dtype=torch.float64)).requires_grad_()
    gradients = torch.gradient(ddf, dim=tuple(range(2, ddf.ndim)))
    jac = torch.stack(gradients, dim=-1).movedim(1, -2) + torch.eye(ndim, dtype=ddf.dtype)
    by_lu = torch.linalg.det(jac)  # (B, *spatial): LU per voxel
    written = jacobian_determinant(ddf.float())
    torch.testing.assert_close(written, by_lu.float(), rtol=1e-4, atol=1e-4)
    assert (by_lu <= 0).any() and (by_lu > 0).any()  # both signs: folding is judged right too
    weights = torch.randn_like(by_lu)
    (grad_lu,) = torch.autograd.grad((by_lu * weights).sum(), ddf)
    (grad_written,) = torch.autograd.grad((jacobian_determinant(ddf) * weights).sum(), ddf)
    torch.testing.assert_close(grad_written, grad_lu)


def test_jacobian_3d_identity_and_folding():
    ddf = torch.zeros(1, 3, 5, 5, 5)
    assert torch.allclose(jacobian_determinant(ddf), torch.ones(1, 5, 5, 5))
    z = torch.arange(5.0).view(5, 1, 1).expand(5, 5, 5)
    ddf[0, 0] = -2.0 * z  # x0 ↦ x0 - 2 x0 = -x0: a reflection, det = -1 everywhere
    assert folding_percentage(ddf).item() == pytest.approx(100.0)
    mask = torch.zeros(1, 1, 5, 5, 5)
    mask[..., :2] = 1
    assert folding_percentage(ddf, mask).item() == pytest.approx(100.0)
