"""AdaCS as the reference code trains it: its scorer, its VoxelMorph, its momentum, its gradient leak."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from adacs_lightning import AdaCS, ClosedFormRobust, ReferenceAdaCS, VoxelMorphScorer, voxelmorph
from adacs_lightning.errors import ConfigError
from adacs_lightning.losses import masked_mean
from adacs_lightning.momentum import MomentumWeight
from adacs_lightning.schedule import Phase
from adacs_lightning.training import build

from .helpers.configs import compose_config
from .helpers.training import tiny_backbone, tiny_datamodule, tiny_trainer


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_reference_scorer_is_voxelmorphs_unet_at_full_resolution():
    scorer = VoxelMorphScorer(2)
    assert count(scorer) == 108_881  # the reference ScoringNet: encoder 16-32-32-32, decoder 32×5-16-16
    assert count(VoxelMorphScorer(3)) == 326_033
    convs = [m for m in scorer.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32, 32, 32, 32, 32, 32, 32, 16, 16, 1]
    assert not any(isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.BatchNorm2d)) for m in scorer.modules())
    image = torch.rand(2, 1, 32, 48)
    score = scorer(image)
    assert score.shape == (2, 1, 32, 48) and 0 <= float(score.min()) and float(score.max()) <= 1
    # four max-poolings: 1/16 of the input (a 24-voxel axis cannot be pooled four times evenly)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in scorer.modules()) == 4
    with pytest.raises(RuntimeError):
        scorer(torch.rand(1, 1, 24, 24))


def test_voxelmorph_goes_down_to_one_sixteenth_with_the_papers_widths():
    assert count(voxelmorph(2)) == 109_170  # the reference VxmDense (2D)
    assert count(voxelmorph(3)) == 327_331
    pools = [m for m in voxelmorph(2).modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == 4


def test_experiment_reference_sets_every_setting_of_the_reference_recipe(tmp_path):
    cfg = compose_config(["experiment=reference"], tmp_path)
    assert cfg.backbone.half_resolution is True and list(cfg.backbone.channels) == [16, 32, 32, 32, 32, 32, 32, 32]
    assert cfg.method.scorer._target_ == "adacs_lightning.VoxelMorphScorer"
    expected = {
        "bidirectional": True,
        "smoothness_on": "velocity",
        "momentum_mode": "reference",
        "reference_leak": True,
        "score_residual": "recompute",
        "accumulate_grad_batches": 2,
        "warmup_epochs": 20,
        "lr": 1e-4,
        "scorer_lr": 1e-4,
        "alpha": 0.02,
        "beta": 0.75,
        "lam": 0.01,
        "kappa": 50.0,
        "data_weighting": "mean",
    }
    assert {k: cfg.method[k] for k in expected} == expected
    assert cfg.data.intensity == "minmax" and cfg.data.batch_size == 4 and cfg.data.train_pairs == 400
    assert cfg.trainer.max_epochs == 340 and cfg.final_checkpoint == "last"
    assert cfg.similarity._target_.endswith("SquaredError")
    model = instantiate(cfg.method, backbone=instantiate(cfg.backbone))
    assert type(model) is ReferenceAdaCS and cfg.method._target_ == "adacs_lightning.ReferenceAdaCS"
    assert model.backbone.integration_downsize == 2
    assert count(model.backbone) == 109_170 and count(model.scorer) == 108_881


def test_velocity_penalty_acts_on_the_half_resolution_velocity():
    model = AdaCS(voxelmorph(2, half_resolution=True), smoothness_on="velocity", scoring=False)
    batch = {"source": torch.rand(2, 1, 32, 32), "target": torch.rand(2, 1, 32, 32)}
    direction = model._register(batch)[0]
    assert direction.output.velocity.shape == (2, 2, 16, 16)
    from adacs_lightning.losses import gradient_energy

    torch.testing.assert_close(
        model.objective.smoothness(direction.output, None), gradient_energy(direction.output.velocity)
    )
    with pytest.raises(ValueError, match="smoothness_on"):
        AdaCS(voxelmorph(2, integration_steps=0), smoothness_on="velocity")


def test_bidirectional_velocity_backbone_integrates_the_negated_half_resolution_velocity():
    backbone = voxelmorph(2, half_resolution=True)
    forward, backward = backbone.forward_train(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), True)
    torch.testing.assert_close(backward.velocity, -forward.velocity)
    # u and its inverse compose to about the identity: u(x) + u⁻¹(x + u(x)) ≈ 0
    composed = forward.ddf + backbone._integrated(backward.velocity, (32, 32))
    assert float(composed.abs().max()) < 1e-3 + 0.05 * float(forward.ddf.abs().max())


def test_reference_momentum_by_hand():
    """The reference's update: running mean over the epoch, γ_e = min(γ, 1 − 1/(e+1)), b = cos(π·50·μ) unclamped."""
    momentum = MomentumWeight(gamma=0.99, kappa=50.0, mode="reference")
    steps = [(0, 0.03), (0, 0.01), (1, 0.02), (1, 0.024)]
    m, sums = 0.0, {}
    for epoch, mu in steps:
        sums.setdefault(epoch, []).append(mu)
        running = sum(sums[epoch]) / len(sums[epoch])
        gamma = min(0.99, 1 - 1 / (epoch + 1))
        m = gamma * m + (1 - gamma) * math.cos(math.pi * 50 * running)  # train_vxm.py's, which writes π as 3.14
        assert momentum.update(torch.tensor(mu), epoch=epoch).item() == pytest.approx(m, rel=1e-5, abs=1e-6)
    assert m < 0  # the reference's weight turned negative: κ·μ > 1/2
    assert set(momentum.state_dict()) >= {"epoch", "epoch_sum", "epoch_count"}


class GradientRecorder(ReferenceAdaCS):
    """Keeps a copy of the backbone's gradient at each of its optimiser steps, and its weights before it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[tuple[dict, list]] = []

    def on_before_optimizer_step(self, optimizer):
        if optimizer is self._optimisers_pair()[0].optimizer:
            weights = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
            self.steps.append((weights, [p.grad.clone() for p in self.backbone.parameters()]))


def test_leak_switch_adds_the_scorer_steps_backbone_gradient_to_the_next_backbone_step():
    """Hand-built two passes: the second backbone step's gradient is L_de's plus ∇θ mean(Ŝ_φ0 · r(θ1)) of step 1."""
    dm = tiny_datamodule()
    dm.setup("fit")
    batches = [b for b, _ in zip(dm.train_dataloader(), range(2))]
    models = {}
    for leak in (False, True):
        torch.manual_seed(0)
        model = GradientRecorder(
            tiny_backbone(),
            warmup_epochs=0,
            lr=1e-3,
            score_residual="recompute",
            reference_leak=leak,
            momentum_mode="paper",
        )
        scorer0 = copy.deepcopy(model.scorer)
        tiny_trainer(1, limit_train_batches=2, limit_val_batches=0).fit(model, dm)
        models[leak] = model
    plain, leaky = models[False], models[True]
    assert len(plain.steps) == len(leaky.steps) == 2
    for a, b in zip(plain.steps[0][1], leaky.steps[0][1]):  # the first step: nothing leaked yet
        torch.testing.assert_close(a, b)
    theta1 = leaky.steps[1][0]
    for (k, a), b in zip(plain.steps[1][0].items(), theta1.values()):  # same weights before step 2
        torch.testing.assert_close(a, b, msg=k)
    # ∇θ of L_ucs on batch 1 at θ1, weighted by the scorer as it was at step 1 (φ0)
    probe = copy.deepcopy(leaky.backbone).train()
    probe.load_state_dict(theta1)
    batch = {k: v for k, v in batches[0].items() if k != "meta"}
    source, target, mask = batch["source"], batch["target"], batch["mask"]
    ddf = probe.forward_train(source, target)[0].ddf
    residual = (leaky.warp(source, ddf) - target).pow(2)
    leak = torch.autograd.grad(masked_mean(scorer0(target).detach() * residual, mask), list(probe.parameters()))
    for with_leak, without, expected in zip(leaky.steps[1][1], plain.steps[1][1], leak):
        torch.testing.assert_close(with_leak - without, expected, rtol=1e-4, atol=1e-8)


def test_leak_piles_up_through_warm_up_b_and_lands_in_the_first_joint_step():
    """The first joint step's gradient is L_de's plus the sum of every warm-up B step's leaked gradient."""
    import lightning as L

    class Snapshots(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            scorer = copy.deepcopy(module.scorer).eval()
            self.rows.append((module.phase, scorer, {k: v for k, v in batch.items() if k != "meta"}))

    models, snapshots = {}, Snapshots()
    for leak in (False, True):
        torch.manual_seed(0)
        model = GradientRecorder(
            tiny_backbone(),
            warmup_epochs=1,
            lr=1e-3,
            reference_leak=leak,
            score_residual="reuse",
            momentum_mode="paper",
        )
        callbacks = [snapshots] if leak else []
        tiny_trainer(3, limit_val_batches=0, callbacks=callbacks).fit(model, tiny_datamodule())
        models[leak] = model
    plain, leaky = models[False], models[True]
    assert len(leaky.steps) == 4  # 2 backbone steps in warm-up A, none in B, 2 in the joint phase
    theta = leaky.steps[2][0]  # the backbone through warm-up B (frozen there)
    probe = copy.deepcopy(leaky.backbone).train()
    probe.load_state_dict(theta)
    leaked = [torch.zeros_like(p) for p in probe.parameters()]
    for phase, scorer, batch in snapshots.rows:
        if phase is not Phase.WARMUP_SCORER:
            continue
        ddf = probe.forward_train(batch["source"], batch["target"])[0].ddf
        residual = (leaky.warp(batch["source"], ddf) - batch["target"]).pow(2)
        loss = masked_mean(scorer(batch["target"]).detach() * residual, batch["mask"])
        leaked = [a + g for a, g in zip(leaked, torch.autograd.grad(loss, list(probe.parameters())))]
    for with_leak, without, expected in zip(leaky.steps[2][1], plain.steps[2][1], leaked):
        torch.testing.assert_close(with_leak - without, expected, rtol=1e-3, atol=1e-8)


def test_momentum_reference_mode_is_frozen_in_warm_up_b():
    torch.manual_seed(0)
    model = ReferenceAdaCS(tiny_backbone(), warmup_epochs=1, lr=1e-3, reference_leak=False, score_residual="reuse")
    counts = []

    import lightning as L

    class Count(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            counts.append((module.phase, int(module.momentum.count)))

    tiny_trainer(3, callbacks=[Count()], limit_val_batches=0).fit(model, tiny_datamodule())
    # updated at every backbone micro-batch (2 per epoch) in warm-up A and the joint phase, not in B
    assert counts == [(Phase.WARMUP_BACKBONE, 2), (Phase.WARMUP_SCORER, 2), (Phase.JOINT, 4)]


def test_closed_form_control_weights_by_the_pointwise_optimum():
    model = ClosedFormRobust(tiny_backbone(), alpha=0.02, warmup_epochs=0)
    residual = torch.tensor([0.0, 0.01, 0.04, 0.1]).view(1, 1, 1, 4)
    torch.testing.assert_close(model.weight_map(None, residual), torch.tensor([1.0, 0.75, 0.0, 0.0]).view(1, 1, 1, 4))
    trainer = tiny_trainer(1, limit_val_batches=0)
    trainer.fit(model, tiny_datamodule())
    assert 0.0 < float(trainer.callback_metrics["train/score_mean"]) <= 1.0


def test_reference_momentum_gets_the_references_mu_in_both_directions():
    """train_vxm.py: μ_t = Σ_d (1/n_dir)·mean(w_d·D_d) with w_d = 0.5 when bidirectional, 1 otherwise."""

    for bidirectional, expected_mu in ((True, 0.5 * 0.03), (False, 0.03)):
        model = ReferenceAdaCS(tiny_backbone(), bidirectional=bidirectional, kappa=50.0)
        model._trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda t, reduce_op: t), current_epoch=0)
        logs = model._update_momentum([torch.tensor(0.03)])  # D averaged over the directions
        assert logs["train/mu"].item() == pytest.approx(expected_mu)
        # epoch 0: γ_0 = 0, so m is the reference's b itself
        assert logs["train/m"].item() == pytest.approx(math.cos(math.pi * 50 * expected_mu), abs=1e-6)


@pytest.mark.parametrize("data", ["synthetic", "camus", "acdc", "oasis", "folder"])
def test_experiment_reference_builds_every_data_set(tmp_path, data):
    """The recipe's per-frame min–max scaling is a setting every data module accepts."""
    root = [] if data in ("synthetic", "folder") else [f"data.root={tmp_path}"]
    cfg = compose_config(["experiment=reference", f"data={data}", *root], tmp_path)
    assert cfg.data.intensity == "minmax"
    build(cfg, "data")


def test_a_data_setting_error_names_the_key_once(tmp_path):
    cfg = compose_config(["data=camus", f"data.root={tmp_path}", "data.image_size=2"], tmp_path)
    with pytest.raises(ConfigError, match=r"Setting 'data\.image_size'"):
        build(cfg, "data")


def test_runs_written_before_the_recipe_had_its_class_still_load(tmp_path):
    """Their configs name AdaCS with the recipe's settings; AdaCS's own values of them are accepted and dropped."""
    from adacs_lightning.checkpoint import _current_method_config

    cfg = compose_config(["experiment=reference"], tmp_path)
    cfg.method._target_ = "adacs_lightning.AdaCS"  # as such a run's .hydra/config.yaml says
    method = _current_method_config(cfg.method)
    assert method._target_ == "adacs_lightning.ReferenceAdaCS" and cfg.method._target_ == "adacs_lightning.AdaCS"
    model = AdaCS(tiny_backbone(), score_residual="reuse", momentum_mode="paper", reference_leak=False)
    assert "score_residual" not in model.hparams and type(model) is AdaCS
    with pytest.raises(ConfigError, match="reference_leak.*reference recipe"):
        AdaCS(tiny_backbone(), reference_leak=True)
