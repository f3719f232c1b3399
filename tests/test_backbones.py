"""The backbone contract and the adapter that brings MONAI and user networks to it."""

import pytest
import torch
from monai.networks.blocks import DVF2DDF, Warp
from monai.networks.nets import GlobalNet, LocalNet, VoxelMorph, VoxelMorphUNet
from torch import nn

from adacs_lightning.backbones import Backbone, as_backbone, voxelmorph

from .helpers.training import PairNet, tiny_backbone


class LossNet(PairNet):
    """A network that carries its own training loss."""

    def forward(self, moving, fixed):
        ddf = super().forward(moving, fixed)
        return {"ddf": ddf, "loss": ddf.pow(2).mean()}


def pair(shape=(2, 1, 32, 32)):
    return torch.rand(shape), torch.rand(shape)


def test_plain_user_network_needs_no_adapter_settings():
    backbone = as_backbone(PairNet())
    assert not backbone.concat_inputs and backbone.spatial_dims == 2 and backbone.in_channels == 1
    moving, fixed = pair()
    assert backbone(moving, fixed).shape == (2, 2, 32, 32)


def test_monai_localnet_through_the_adapter():
    net = LocalNet(spatial_dims=2, in_channels=2, num_channel_initial=4, extract_levels=(0, 1, 2), out_channels=2)
    backbone = as_backbone(net)
    assert backbone.concat_inputs and backbone.spatial_dims == 2 and backbone.in_channels == 1
    moving, fixed = pair()
    torch.testing.assert_close(backbone(moving, fixed), net(torch.cat([moving, fixed], 1)))


def test_monai_globalnet_affine_through_the_adapter():
    net = GlobalNet(image_size=(32, 32), spatial_dims=2, in_channels=2, num_channel_initial=4, depth=2)
    moving, fixed = pair()
    assert as_backbone(net)(moving, fixed).shape == (2, 2, 32, 32)


def test_monai_voxelmorph_tuple_output_gives_the_ddf():
    unet = VoxelMorphUNet(2, 2, 8, channels=(4, 8, 8, 8), final_conv_channels=(8,))
    net = VoxelMorph(backbone=unet, integration_steps=3, spatial_dims=2)
    moving, fixed = pair()
    torch.testing.assert_close(as_backbone(net)(moving, fixed), net(moving, fixed)[1])


def test_velocity_output_is_integrated_and_inverse_is_negated_velocity():
    net = PairNet()
    backbone = Backbone(net, output="velocity", integration_steps=5)
    moving, fixed = pair()
    velocity = net(moving, fixed)
    integrate = DVF2DDF(num_steps=5)
    forward, backward = backbone.forward_train(moving, fixed, bidirectional=True)
    torch.testing.assert_close(forward.ddf, integrate(velocity))
    torch.testing.assert_close(backward.ddf, integrate(-velocity))


def test_bidirectional_ddf_backbone_swaps_the_pair():
    net = PairNet()
    moving, fixed = pair()
    forward, backward = as_backbone(net).forward_train(moving, fixed, bidirectional=True)
    torch.testing.assert_close(backward.ddf, net(fixed, moving))


def test_extra_loss_is_carried():
    output, _ = as_backbone(LossNet()).forward_train(*pair())
    assert output.extra_loss is not None and output.extra_loss.ndim == 0


def test_wrong_output_channels_named_in_the_error():
    class Wrong(PairNet):
        def forward(self, moving, fixed):
            return super().forward(moving, fixed)[:, :1]

    with pytest.raises(ValueError, match=r"Wrong returned a displacement of shape \(2, 1, 32, 32\)"):
        as_backbone(Wrong())(*pair())


def test_dimension_mismatch_is_explained():
    with pytest.raises(ValueError, match="set up for 2D images"):
        as_backbone(PairNet())(*pair((1, 1, 8, 8, 8)))


def test_network_without_convolutions_needs_spatial_dims():
    class Affine(nn.Module):
        def forward(self, moving, fixed):
            return torch.zeros(moving.shape[0], 2, *moving.shape[2:])

    with pytest.raises(ValueError, match="pass spatial_dims"):
        as_backbone(Affine())
    assert as_backbone(Affine(), spatial_dims=2)(*pair()).abs().sum() == 0


def test_non_module_rejected():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        as_backbone(lambda m, f: m)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_voxelmorph_starts_near_identity_and_has_paper_widths(spatial_dims):
    shape = (1, 1) + (16,) * spatial_dims
    backbone = voxelmorph(spatial_dims=spatial_dims)
    ddf = backbone(torch.rand(shape), torch.rand(shape))
    assert ddf.shape == (1, spatial_dims) + (16,) * spatial_dims
    assert ddf.abs().max() < 1e-2
    widths = [m.out_channels for m in backbone.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert widths[:4] == [16, 32, 32, 32] and widths[-1] == spatial_dims


def test_warp_direction_recovers_a_known_translation():
    """A short fit on one pair recovers a 3-voxel shift: the displacement is in voxels, pull-back."""
    torch.manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = lambda cx: torch.exp(-((yy - 16) ** 2 + (xx - cx) ** 2) / 30.0)[None, None]  # noqa: E731
    moving, fixed = blob(17.0), blob(14.0)  # fixed(x) = moving(x + 3) along the last axis
    backbone = tiny_backbone()
    warp = Warp()
    opt = torch.optim.Adam(backbone.parameters(), lr=3e-3)
    for _ in range(150):
        ddf = backbone(moving, fixed)
        loss = (warp(moving, ddf) - fixed).pow(2).mean() + 1e-3 * sum(
            torch.diff(ddf, dim=d).pow(2).mean() for d in (2, 3)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    ddf = backbone(moving, fixed).detach()
    centre = ddf[0, :, 12:20, 11:19].mean(dim=(1, 2))
    assert abs(centre[1].item() - 3.0) < 1.0 and abs(centre[0].item()) < 1.0
