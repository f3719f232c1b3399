"""The variance-weighted methods the paper compares against: NLL and β-NLL."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from adacs_lightning.checkpoint import METHOD_KEY, load_backbone, method_of, save_backbone
from adacs_lightning.evaluation.runs import resolve_run
from adacs_lightning.losses import beta_nll
from adacs_lightning.methods import LogVarianceNetwork, VarianceWeighted
from adacs_lightning.schedule import Phase

from .helpers.training import adacs_train, tiny_backbone, tiny_datamodule, tiny_trainer

R = torch.tensor([0.5, 2.0]).view(1, 1, 1, 2)
LOG_VAR = torch.tensor([0.0, math.log(2.0)]).view(1, 1, 1, 2)
# Per voxel 0.5·(r/σ² + log σ²): 0.5·(0.5 + 0) = 0.25 and 0.5·(2/2 + log 2) = 0.5 + 0.5·log 2.
NLL = (0.25, 0.5 + 0.5 * math.log(2.0))


def test_gaussian_nll_by_hand():
    """β = 0: the plain heteroscedastic NLL."""
    assert beta_nll(R, LOG_VAR, beta=0.0).item() == pytest.approx(sum(NLL) / 2)
    mask = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert beta_nll(R, LOG_VAR, beta=0.0, mask=mask).item() == pytest.approx(NLL[0])


def test_beta_nll_by_hand_with_a_stop_gradient_weight():
    r, log_var = R.clone().requires_grad_(), LOG_VAR.clone().requires_grad_()
    loss = beta_nll(r, log_var, beta=0.5)
    weights = (1.0, math.sqrt(2.0))  # σ^{2β} = exp(0.5·log σ²)
    assert loss.item() == pytest.approx((weights[0] * NLL[0] + weights[1] * NLL[1]) / 2)
    loss.backward()
    # The weight is detached: ∂/∂ log σ² = w·0.5·(1 − r/σ²)/N and ∂/∂r = w·0.5/σ²/N.
    torch.testing.assert_close(log_var.grad.flatten(), torch.tensor([0.5 * 0.5 / 2, 0.0]))
    torch.testing.assert_close(r.grad.flatten(), torch.tensor([0.5 / 2, weights[1] * 0.5 / 2 / 2]))


def test_beta_nll_limits():
    r = R.clone().requires_grad_()
    beta_nll(r, LOG_VAR, beta=1.0).backward()
    torch.testing.assert_close(r.grad.flatten(), torch.full((2,), 0.5 / 2))  # β = 1: the MSE's gradient
    with pytest.raises(ValueError):
        beta_nll(R, LOG_VAR, beta=-0.1)


def test_log_variance_network_is_floored():
    net = LogVarianceNetwork(2, channels=(4, 8, 8, 8), min_variance=1e-3)
    image = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        raw = net.unet(image)
        torch.testing.assert_close(net(image), torch.log(torch.exp(raw) + 1e-3))
        net.unet = torch.nn.Sequential(net.unet, Shift(-50.0))  # σ² of e^-50 is floored at 1e-3
        out = net(image)
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out, torch.full_like(out, math.log(1e-3)))


class Shift(torch.nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return x + self.value


def _parameters(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_variance_weighted_trains_both_networks_after_its_warm_up(beta, tmp_path):
    model = VarianceWeighted(
        tiny_backbone(),
        LogVarianceNetwork(2, channels=(4, 8, 8, 8)),
        beta_nll=beta,
        lr=1e-3,
        warmup_epochs=1,
    )
    backbone0, variance0 = _parameters(model.backbone), _parameters(model.variance)
    trainer = tiny_trainer(1, tmp_path)
    trainer.fit(model, tiny_datamodule())
    assert model.phase is Phase.JOINT  # epoch 1 onwards
    assert not torch.equal(_parameters(model.backbone), backbone0)
    assert torch.equal(_parameters(model.variance), variance0)  # warm-up: the backbone alone
    trainer = tiny_trainer(2, tmp_path)
    trainer.fit(model, tiny_datamodule(), ckpt_path=None)
    assert not torch.equal(_parameters(model.variance), variance0)
    metrics = trainer.callback_metrics
    assert {"val/dice", "val/residual", "val/folding_pct", "train/log_variance"} <= set(metrics)
    exported = model.export_backbone()
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in tiny_backbone().parameters())
    score = model.score_map(torch.rand(2, 1, 32, 32))
    assert score.shape == (2, 1, 32, 32) and 0.0 <= score.min() and score.amax(dim=(1, 2, 3)).allclose(torch.ones(2))


def test_variance_weighted_checkpoint_round_trip(tmp_path):
    model = VarianceWeighted(tiny_backbone(), beta_nll=0.5, lr=1e-3)
    trainer = tiny_trainer(1, tmp_path, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(model, tiny_datamodule())
    path = tmp_path / "nll.ckpt"
    trainer.save_checkpoint(path)
    restored = VarianceWeighted.load_from_checkpoint(path, backbone=tiny_backbone())
    assert restored.hparams.beta_nll == 0.5 and "alpha" not in restored.hparams
    torch.testing.assert_close(_parameters(restored), _parameters(model))
    # adacs-eval names the method from the file alone: the checkpoint, and the exported backbone.
    assert resolve_run(path).method == "beta_nll"
    assert resolve_run(save_backbone(path, tmp_path / "backbone.pt")).method == "beta_nll"


def test_checkpoints_name_their_method_and_older_ones_are_told_by_their_networks(tmp_path):
    for beta, name in ((0.0, "nll"), (0.5, "beta_nll")):
        model = VarianceWeighted(tiny_backbone(), LogVarianceNetwork(2, channels=(4, 8, 8, 8)), beta_nll=beta)
        stored = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
        model.on_save_checkpoint(stored)
        assert stored[METHOD_KEY] == name and method_of(stored) == name
        del stored[METHOD_KEY]  # a file written before checkpoints named their method
        assert method_of(stored) == name
        path = tmp_path / f"{name}.ckpt"
        torch.save(stored, path)
        assert resolve_run(path).method == name
        assert torch.load(save_backbone(path, tmp_path / f"{name}.pt"), weights_only=False)[METHOD_KEY] == name


def test_variance_network_follows_channels_last():
    model = VarianceWeighted(tiny_backbone(), LogVarianceNetwork(2, channels=(4, 8, 8, 8)), channels_last=True)
    model.configure_model()
    weights = [p for p in model.variance.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not any(w.is_contiguous() for w in weights)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nll", "beta_nll"])
def test_variance_methods_train_from_the_cli(method, tmp_path):
    run = tmp_path / method
    result = adacs_train(
        f"method={method}", "debug=tiny", "method.warmup_epochs=1", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (run / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert any(r.get("val/dice") for r in rows) and any(r.get("train/log_variance_step") for r in rows)
    backbone = load_backbone(run / "backbone.pt")
    assert sum(p.numel() for p in backbone.parameters()) > 0
    assert list((run / "checkpoints").glob("best-*.ckpt"))
