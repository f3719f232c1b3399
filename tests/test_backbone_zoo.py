"""The named backbones (conf/backbone/*.yaml): training through every AdaCS phase, the output contract, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from hydra.utils import instantiate
from monai.networks.blocks import DVF2DDF, Warp
from torch import nn

from adacs_lightning import AdaCS, ConfigError, Nuisances, Phase
from adacs_lightning.backbones import Backbone, custom_backbone, diffusemorph, transmorph
from adacs_lightning.training import build

from .helpers.configs import compose_config
from .helpers.training import adacs_train, run_command, tiny_datamodule, tiny_trainer

ROOT = Path(__file__).parents[1]
NAMES = ["voxelmorph", "transmorph", "diffusemorph", "lapirn", "localnet", "regunet", "globalnet"]

# Narrow versions of each config: the real architecture at a fraction of the cost.
SMALL = yaml.safe_load((Path(__file__).parents[1] / "benchmarks" / "narrow_backbones.yaml").read_text())
# Adam moves every weight by about lr per step: GlobalNet's dense affine head needs a small one.
LR = {"globalnet": 1e-4}
SIZE_3D = {"transmorph": 32}  # TransMorph needs sizes divisible by 32; the others train on 16³.


def compose_backbone(name: str, spatial_dims: int = 2, size: int = 32, extra: tuple[str, ...] = ()):
    return compose_config([f"backbone={name}", f"data.spatial_dims={spatial_dims}", f"data.image_size={size}", *extra])


def small_backbone(name: str, spatial_dims: int = 2, size: int = 32) -> Backbone:
    torch.manual_seed(0)
    return build(compose_backbone(name, spatial_dims, size, tuple(SMALL[name])), "backbone")


def clean_pairs(spatial_dims: int, size: int, pairs: int = 2):
    nuisance = Nuisances(
        noise="none", drift=0.0, shadow_prob=0.0, dropout_prob=0.0, extra_structure_prob=0.0, fov=False
    )
    return tiny_datamodule(spatial_dims, size, pairs=pairs, batch_size=2, nuisance=nuisance, seed=0)


def data_loss(backbone: Backbone, batch: dict) -> float:
    """Mean squared error of the warped source against the target, the backbone in eval mode."""
    backbone.eval()
    with torch.no_grad():
        warped = Warp()(batch["source"], backbone(batch["source"], batch["target"]))
    backbone.train()
    return (warped - batch["target"]).pow(2).mean().item()


class PhaseLog(L.Callback):
    """Per epoch: phase, whether the backbone's weights changed, and the logged L_de values."""

    def __init__(self):
        self.epochs: list[dict] = []

    def on_train_epoch_start(self, trainer, module):
        self._before = [p.detach().clone() for p in module.backbone.parameters()]
        self.epochs.append({"phase": module.phase, "loss_de": []})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if "train/loss_de" in trainer.callback_metrics:
            self.epochs[-1]["loss_de"].append(float(trainer.callback_metrics["train/loss_de"]))

    def on_train_epoch_end(self, trainer, module):
        after = list(module.backbone.parameters())
        self.epochs[-1]["backbone_changed"] = any(not torch.equal(a, b) for a, b in zip(self._before, after))


@pytest.mark.parametrize(
    ("name", "spatial_dims"),
    [(n, 2) for n in NAMES] + [pytest.param(n, 3, marks=pytest.mark.slow) for n in NAMES],
    ids=lambda v: str(v),
)
def test_backbone_trains_through_every_adacs_phase(name, spatial_dims, tmp_path):
    size = 32 if spatial_dims == 2 else SIZE_3D.get(name, 16)
    backbone = small_backbone(name, spatial_dims, size)
    datamodule = clean_pairs(spatial_dims, size)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    before = data_loss(backbone, batch)

    log = PhaseLog()
    model = AdaCS(backbone, warmup_epochs=1, lr=LR.get(name, 3e-3))
    trainer = tiny_trainer(3, tmp_path, limit_train_batches=1, limit_val_batches=1, callbacks=[log])
    trainer.fit(model, datamodule=datamodule)

    assert [e["phase"] for e in log.epochs] == [Phase.WARMUP_BACKBONE, Phase.WARMUP_SCORER, Phase.JOINT]
    assert [e["backbone_changed"] for e in log.epochs] == [True, False, True]
    losses = [v for e in log.epochs for v in e["loss_de"]]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    after = data_loss(model.backbone, batch)
    assert after < before, f"{name}: data loss on the training pair went from {before:.5f} to {after:.5f}"


@pytest.mark.parametrize("name", NAMES)
def test_output_contract_at_initialisation(name):
    """(B, ndim, *spatial) from the pair, near identity before training, deterministic in eval mode."""
    backbone = small_backbone(name).eval()
    moving, fixed = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        ddf = backbone(moving, fixed)
        torch.testing.assert_close(ddf, backbone(moving, fixed))
    assert ddf.shape == (2, 2, 32, 32) and ddf.abs().max() < 0.1


def _blobs(shift: int = 3):
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    blob = lambda cx: torch.exp(-((yy - 16) ** 2 + (xx - cx) ** 2) / 30.0)[None, None]  # noqa: E731
    return blob(17.0), blob(17.0 - shift)  # fixed(x) = moving(x + shift) along the last axis


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_displacement_is_in_voxels_and_pulls_the_moving_image_back(name):
    """A short fit on one pair related by a 3-voxel shift recovers it at the centre (MONAI Warp convention)."""
    moving, fixed = _blobs(3)
    backbone = small_backbone(name)
    ddf = backbone(moving, fixed)
    assert ddf.shape == (1, 2, 32, 32) and ddf.abs().max() < 0.1  # starts at (near) identity
    warp = Warp()
    opt = torch.optim.Adam(backbone.parameters(), lr=LR.get(name, 3e-3))
    for _ in range(120):
        out, _ = backbone.forward_train(moving, fixed)
        smooth = sum(torch.diff(out.ddf, dim=d).pow(2).mean() for d in (2, 3))
        loss = (warp(moving, out.ddf) - fixed).pow(2).mean() + 1e-3 * smooth
        if out.extra_loss is not None:
            loss = loss + 1e-3 * out.extra_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval()
    with torch.no_grad():
        centre = backbone(moving, fixed)[0, :, 12:20, 11:19].mean(dim=(1, 2))
    assert abs(centre[1].item() - 3.0) < 1.0 and abs(centre[0].item()) < 1.0, centre


def test_every_config_follows_data_spatial_dims():
    for name in NAMES:
        for spatial_dims in (2, 3):
            backbone = instantiate(compose_backbone(name, spatial_dims, 32, tuple(SMALL[name])).backbone)
            assert backbone.spatial_dims == spatial_dims and backbone.in_channels == 1, name


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_transmorph_paper_configuration(spatial_dims):
    backbone = transmorph(spatial_dims=spatial_dims)
    net = backbone.net
    widths = [block.transp_conv.conv.out_channels for block in net.decoder]
    assert widths == [384, 192, 96, 48, 16]
    assert net.encoder.embed_dim == 96 and net.divisor == 32
    assert tuple(net.encoder.window_size) == ((5, 6, 7) if spatial_dims == 3 else (4, 4))
    params = sum(p.numel() for p in backbone.parameters())
    # The TransMorph paper reports 46.8 M parameters in 3D.
    assert (40e6 < params < 48e6) if spatial_dims == 3 else (25e6 < params < 35e6)


def test_transmorph_rejects_sizes_not_divisible_by_32(tmp_path):
    cfg = compose_backbone("transmorph", 2, 48, tuple(SMALL["transmorph"]))
    with pytest.raises(ConfigError, match=r"backbone\.img_size.*divisible by 32"):
        build(cfg, "backbone")
    backbone = small_backbone("transmorph")
    with pytest.raises(ConfigError, match=r"data\.image_size.*divisible by 32"):
        backbone(torch.rand(1, 1, 40, 40), torch.rand(1, 1, 40, 40))


def test_diffusemorph_carries_its_diffusion_loss_in_training_only():
    backbone = small_backbone("diffusemorph")
    moving, fixed = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    out, _ = backbone.forward_train(moving, fixed)
    assert out.extra_loss is not None and out.extra_loss.ndim == 0 and out.extra_loss > 0
    out.extra_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.net.denoiser.parameters())
    backbone.eval()
    out, _ = backbone.forward_train(moving, fixed)
    assert out.extra_loss is None
    torch.testing.assert_close(backbone(moving, fixed), backbone(moving, fixed))  # t = 0, no noise: deterministic
    assert backbone.net.scheduler.num_train_timesteps == 2000
    betas = backbone.net.scheduler.betas
    assert torch.isclose(betas[0], torch.tensor(1e-6)) and torch.isclose(betas[-1], torch.tensor(1e-2))


def test_diffusemorph_weight_follows_dimension():
    assert diffusemorph(2).net.diffusion_weight == pytest.approx(0.5)
    assert diffusemorph(3, denoiser_channels=(16, 16), norm_num_groups=8).net.diffusion_weight == pytest.approx(0.05)


def test_lapirn_is_conditioned_on_the_regularisation_weight():
    cfg = compose_backbone("lapirn", 2, 32, (*SMALL["lapirn"], "method.lam=0.5"))
    backbone = build(cfg, "backbone")
    assert backbone.net.reg_weight == 0.5 and len(backbone.net.levels) == 3
    for module in backbone.modules():  # make the conditional norms depend on λ
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.5)
    for level in backbone.net.levels:
        nn.init.normal_(level.flow.weight, std=0.05)
    moving, fixed = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        default = backbone(moving, fixed)
        torch.testing.assert_close(default, backbone.net(moving, fixed, reg_weight=0.5))
        assert not torch.allclose(default, backbone.net(moving, fixed, reg_weight=5.0))


@pytest.mark.parametrize("combine", ["add", "compose"])
def test_lapirn_levels_refine_odd_sizes(combine):
    backbone = small_backbone("lapirn")
    backbone.net.combine = combine
    assert backbone(torch.rand(1, 1, 30, 26), torch.rand(1, 1, 30, 26)).shape == (1, 2, 30, 26)


def test_half_resolution_velocity_integrates_like_full_resolution():
    """Half-resolution integration approximates full-resolution scaling and squaring, in full-size voxels."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    velocity = torch.stack([4 * torch.exp(-(xx**2 + yy**2) / 0.3), 3 * torch.sin(torch.pi * yy)])[None]

    class Fixed(nn.Module):
        def forward(self, pair):
            return velocity

    half_resolution = Backbone(Fixed(), inputs="concat", output="velocity", integration_downsize=2, spatial_dims=2)
    half = half_resolution(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))
    full = DVF2DDF(num_steps=7)(velocity)
    inner = (slice(None), slice(None), slice(8, -8), slice(8, -8))
    assert (half - full)[inner].abs().mean() < 0.05 * full[inner].abs().mean()


def test_voxelmorph_half_resolution_option():
    cfg = compose_backbone("voxelmorph", 2, 32, (*SMALL["voxelmorph"], "backbone.half_resolution=true"))
    backbone = build(cfg, "backbone")
    assert backbone.integration_downsize == 2
    assert backbone(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    cfg = compose_backbone("voxelmorph", 2, 32, ("backbone.half_resolution=true", "backbone.integration_steps=0"))
    with pytest.raises(ConfigError, match="backbone.half_resolution"):
        build(cfg, "backbone")


def test_custom_backbone_builds_any_module_and_explains_an_unset_class():
    cfg = compose_backbone(
        "custom",
        2,
        32,
        (
            "backbone.net._target_=torch.nn.Conv2d",
            "+backbone.net.in_channels=2",
            "+backbone.net.out_channels=2",
            "+backbone.net.kernel_size=3",
            "+backbone.net.padding=1",
        ),
    )
    backbone = build(cfg, "backbone")
    assert backbone.concat_inputs and isinstance(backbone.net, nn.Conv2d)
    assert backbone(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)).shape == (1, 2, 32, 32)
    with pytest.raises(ConfigError, match=r"backbone\.net\._target_.*names no network class"):
        build(compose_backbone("custom"), "backbone")
    with pytest.raises(ConfigError, match="could not build 'no.such.Net'"):
        custom_backbone({"_target_": "no.such.Net"})
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        custom_backbone({"_target_": "builtins.dict"})


CLI_EXTRA = {
    # The paper-size TransMorph takes a minute here; a narrower one runs the same code path.
    "transmorph": ["backbone.embed_dim=24"],
    "custom": [
        "backbone.net._target_=torch.nn.Conv2d",
        "+backbone.net.in_channels=2",
        "+backbone.net.out_channels=2",
        "+backbone.net.kernel_size=3",
        "+backbone.net.padding=1",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", [*NAMES, "custom"])
def test_adacs_train_runs_every_backbone(name, tmp_path):
    result = adacs_train(f"backbone={name}", "debug=tiny", "logger=none", *CLI_EXTRA.get(name, []), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(next(tmp_path.glob("outputs/*/*/summary.json")).read_text())
    assert summary["epochs"] == 3 and summary["backbone"]
    assert 0.0 <= summary["metrics"]["val/dice"] <= 1.0


@pytest.mark.slow
def test_adacs_train_reports_an_unset_custom_network(tmp_path):
    result = adacs_train("+backbone=custom", "debug=tiny", "logger=none", cwd=tmp_path)
    assert result.returncode == 2
    assert "backbone.net._target_" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_backbone_benchmark_tiny_mode(tmp_path):
    out = tmp_path / "zoo.json"
    result = run_command(
        [sys.executable, str(ROOT / "benchmarks" / "backbones.py"), "--tiny", "--json", str(out)], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["backbones"]
    assert [r["backbone"] for r in rows] == NAMES
    assert rows[0]["step_vs_voxelmorph"] == pytest.approx(1.0)
    for row in rows:
        assert row["params_2d"] > 0 and row["params_3d"] > 0 and row["step_s"] > 0
        assert row["backbone"] in result.stdout
