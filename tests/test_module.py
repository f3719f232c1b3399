"""The AdaCS LightningModule: schedule, stop-gradients, accumulation, mask, bidirectional, export."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from adacs_lightning import AdaCS, ConfigError, ReferenceAdaCS
from adacs_lightning.schedule import Phase

from .helpers.training import PairNet, assert_same_training, tiny_backbone, tiny_datamodule, tiny_model, tiny_trainer


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


class PhaseRecorder(L.Callback):
    """Records, per epoch, which networks changed."""

    def __init__(self):
        self.rows = []

    def on_train_epoch_start(self, trainer, module):
        self.before = (snapshot(module.backbone), snapshot(module.scorer), int(module.momentum.count))

    def on_train_epoch_end(self, trainer, module):
        backbone, scorer, count = self.before
        self.rows.append(
            (
                module.phase,
                changed(backbone, module.backbone),
                changed(scorer, module.scorer),
                int(module.momentum.count) - count,
            )
        )


def test_one_line_wrap_builds_scorer_for_the_backbone_dims():
    model = AdaCS(tiny_backbone(spatial_dims=3))
    assert model.scorer.spatial_dims == 3
    assert model.hparams.alpha == 0.02 and model.hparams.beta == 1.5 and model.hparams.lam == 0.05
    assert model.hparams.warmup_epochs == 3 and model.hparams.lr == 1e-3 and model.hparams.gamma == 0.99
    assert model.hparams.calibration == "data" and model.hparams.scorer_target == "shift_min"


def test_the_papers_settings_are_one_preset():
    from adacs_lightning import PAPER

    model = AdaCS.paper(tiny_backbone(), lr=3e-4)
    assert {k: model.hparams[k] for k in PAPER} == {**PAPER, "lr": 3e-4}
    assert model.hparams.lam == 0.01 and model.hparams.warmup_epochs == 20 and model.hparams.data_weighting == "mean"


def test_schedule_updates_the_right_network_in_each_phase():
    recorder = PhaseRecorder()
    tiny_trainer(3, callbacks=[recorder]).fit(tiny_model(), tiny_datamodule())
    steps = 2  # 8 pairs, batch 4
    assert recorder.rows == [
        (Phase.WARMUP_BACKBONE, True, False, 0),
        (Phase.WARMUP_SCORER, False, True, steps),
        (Phase.JOINT, True, True, steps),
    ]


def test_baseline_has_no_scorer_and_one_optimiser():
    model = tiny_model(scoring=False)
    assert model.scorer is None
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)
    recorder_rows = []

    class Check(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            recorder_rows.append(module.phase)

    tiny_trainer(3, callbacks=[Check()]).fit(model, tiny_datamodule())
    assert recorder_rows == [Phase.WARMUP_BACKBONE] * 3
    n_backbone = sum(p.numel() for p in model.backbone.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_backbone


class GradientAudit(AdaCS):
    """Records which network each backward pass reaches."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.audit = []

    def manual_backward(self, loss, *args, **kwargs):
        def grads(module):
            return [None if p.grad is None else p.grad.clone() for p in module.parameters()]

        before_f, before_g = grads(self.backbone), grads(self.scorer)
        super().manual_backward(loss, *args, **kwargs)

        def reached(module, before):
            return any(
                p.grad is not None and (b is None or not torch.equal(b, p.grad))
                for p, b in zip(module.parameters(), before)
            )

        self.audit.append((self.phase, reached(self.backbone, before_f), reached(self.scorer, before_g)))


def test_stop_gradients_in_the_joint_step():
    """Each step backpropagates L_de, then L_se: the first reaches only f_θ, the second only g_φ."""
    model = GradientAudit(tiny_backbone(), warmup_epochs=0, lr=1e-3)
    tiny_trainer(1).fit(model, tiny_datamodule())
    assert model.audit == [(Phase.JOINT, True, False), (Phase.JOINT, False, True)] * 2


def test_warmup_b_never_reaches_the_backbone():
    model = GradientAudit(tiny_backbone(), warmup_epochs=1, lr=1e-3)
    tiny_trainer(2).fit(model, tiny_datamodule())
    assert [row for row in model.audit if row[0] is Phase.WARMUP_SCORER] == [(Phase.WARMUP_SCORER, False, True)] * 2
    assert [row for row in model.audit if row[0] is Phase.WARMUP_BACKBONE] == [(Phase.WARMUP_BACKBONE, True, False)] * 2


def test_recompute_and_reuse_differ_only_in_the_scorer_step():
    """After one joint step the backbones agree; the scorers saw post- vs pre-update residuals."""
    results = {}
    for mode in ("recompute", "reuse"):
        torch.manual_seed(0)
        model = ReferenceAdaCS(
            tiny_backbone(), warmup_epochs=0, lr=1e-3, score_residual=mode, reference_leak=False, momentum_mode="paper"
        )
        tiny_trainer(1, limit_train_batches=1).fit(model, tiny_datamodule())
        results[mode] = model
    for (name, a), b in zip(
        results["recompute"].backbone.state_dict().items(), results["reuse"].backbone.state_dict().values()
    ):
        torch.testing.assert_close(a, b, msg=name)
    assert changed(snapshot(results["recompute"].scorer), results["reuse"].scorer)


def test_gradient_accumulation_matches_the_larger_batch():
    """Two micro-batches of 4 with accumulation 2 give the same update as one batch of 8."""
    models = {}
    for accumulate, batch in ((1, 8), (2, 4)):
        torch.manual_seed(0)
        model = tiny_model(warmup_epochs=1, accumulate_grad_batches=accumulate)
        dm = tiny_datamodule(pairs=8, batch_size=batch)
        tiny_trainer(3).fit(model, dm)
        models[accumulate] = model
    # FOV masks have the same size in every pair, so masked means over 8 = mean of two means over 4.
    # Adam's first steps are ±lr wherever a gradient is near 0, which turns float rounding of
    # the summation order into differences of up to ~1e-4 here (lr 1e-3): hence the tolerance.
    assert_same_training(models[1].state_dict(), models[2].state_dict())


def test_mask_hides_residuals_outside_the_field_of_view():
    """Residuals outside the mask change neither the losses nor any gradient of either network."""
    from adacs_lightning.losses import scoring_loss

    dm = tiny_datamodule()
    dm.setup("fit")
    batch = {k: torch.stack([dm.datasets["train"][i][k] for i in range(4)]) for k in ("source", "target", "mask")}
    outside = 1 - batch["mask"]
    assert outside.sum() > 0
    garbage = 5.0 * outside * torch.rand_like(outside)

    def losses_and_grads(extra_residual):
        torch.manual_seed(0)
        model = tiny_model(warmup_epochs=0)
        forward, _ = model.backbone.forward_train(batch["source"], batch["target"])
        direction = model.objective.directions(batch["source"], batch["target"], forward)[0]
        direction.residual = residual = direction.residual + extra_residual
        score = model.scorer(batch["target"])
        loss_de = model.objective([direction], [score], batch["mask"], "mean")[0]
        loss_se = scoring_loss(score, residual, 0.02, 1.5, 0.5, batch["mask"])[0]
        (loss_de + loss_se).backward()
        return [loss_de.item(), loss_se.item()], [p.grad.clone() for p in model.parameters()]

    clean_losses, clean_grads = losses_and_grads(0.0)
    noisy_losses, noisy_grads = losses_and_grads(garbage)
    assert clean_losses == pytest.approx(noisy_losses, rel=1e-6)
    for a, b in zip(clean_grads, noisy_grads):
        torch.testing.assert_close(a, b)


def test_bidirectional_training_runs_all_phases_and_scores_both_images():
    inputs, batches = [], []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            batches.append(batch)

    model = tiny_model(bidirectional=True)
    model.scorer.register_forward_hook(lambda m, inp, out: inputs.append(inp[0].detach()) if m.training else None)
    tiny_trainer(3, callbacks=[Record()]).fit(model, tiny_datamodule())
    scored = inputs[-1]  # the last training step: g(target) for the forward, g(source) for the backward direction
    assert scored.shape[0] == 8
    torch.testing.assert_close(scored[:4], batches[-1]["target"])
    torch.testing.assert_close(scored[4:], batches[-1]["source"])
    assert torch.isfinite(torch.tensor(float(model.trainer.callback_metrics["train/loss_se"])))


def test_momentum_in_unit_interval_and_logged():
    model = tiny_model(kappa=50.0)
    trainer = tiny_trainer(4)
    trainer.fit(model, tiny_datamodule())
    m = float(trainer.callback_metrics["train/m"])
    assert 0.0 <= m <= 1.0 and int(model.momentum.count) == 6


def test_validation_reports_dice_identity_and_folding():
    trainer = tiny_trainer(1)
    trainer.fit(tiny_model(), tiny_datamodule())
    metrics = trainer.callback_metrics
    for key in ("val/dice", "val/dice_identity", "val/dice_label2", "val/residual", "val/folding_pct"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert 0.0 <= float(metrics["val/dice"]) <= 1.0


def test_export_backbone_is_the_bare_network():
    bare = tiny_backbone()
    model = AdaCS(copy.deepcopy(bare))
    exported = model.export_backbone()
    assert sum(p.numel() for p in exported.parameters()) == sum(p.numel() for p in bare.parameters())
    assert not exported.training and not any(p.requires_grad for p in exported.parameters())
    moving, fixed = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(exported(moving, fixed), bare(moving, fixed))


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"alpha": -1}, "alpha"),
        ({"lr": 0}, "lr"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches"),
        ({"score_residual": "later"}, "score_residual"),
    ],
)
def test_invalid_settings_name_the_setting(kwargs, setting):
    with pytest.raises(ConfigError, match=f"Setting '{setting}'"):
        tiny_model(**kwargs)


def test_bad_batch_is_explained():
    model = tiny_model()
    with pytest.raises(KeyError, match="'source' and 'target'"):
        model.validation_step((torch.zeros(1), torch.zeros(1)), 0)


def test_three_dimensional_training_through_all_phases():
    model = AdaCS(tiny_backbone(spatial_dims=3), warmup_epochs=1, lr=1e-3)
    assert model.scorer.spatial_dims == 3
    trainer = tiny_trainer(3)
    trainer.fit(model, tiny_datamodule(spatial_dims=3, size=16, pairs=4, batch_size=2))
    assert int(model.momentum.count) == 4
    assert torch.isfinite(trainer.callback_metrics["train/loss_se"])
    assert 0.0 <= float(trainer.callback_metrics["val/dice"]) <= 1.0


def test_channel_mismatch_is_explained():
    model = tiny_model()
    batch = {"source": torch.rand(2, 3, 32, 32), "target": torch.rand(2, 3, 32, 32)}
    with pytest.raises(ValueError, match="pass in_channels=3"):
        model.validation_step(batch, 0)


def test_user_pair_network_trains_with_no_adapter_settings():
    model = AdaCS(PairNet(), warmup_epochs=1, lr=1e-3)
    assert model.backbone.in_channels == 1
    trainer = tiny_trainer(3)
    trainer.fit(model, tiny_datamodule())
    assert torch.isfinite(trainer.callback_metrics["train/loss_se"])


def test_compile_covers_the_training_path(monkeypatch):
    """Compiling reaches the calls a training step makes (forward_train), not only __call__."""
    import functools

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    monkeypatch.setattr(
        torch.nn.Module, "compile", functools.partialmethod(torch.nn.Module.compile, backend=counting_backend)
    )
    torch._dynamo.reset()
    model = tiny_model(compile=True, warmup_epochs=5)  # warm-up A only: the backbone alone trains
    tiny_trainer(1, limit_val_batches=0).fit(model, tiny_datamodule())
    assert graphs, "no graph was compiled while training the backbone"


@pytest.mark.parametrize("options", [{"channels_last": True}, {"compile": True}])
def test_speed_options_train_the_same_model(options, monkeypatch):
    """channels_last and torch.compile change speed, not the result (compile checked with the eager backend)."""
    import functools

    monkeypatch.setattr(torch.nn.Module, "compile", functools.partialmethod(torch.nn.Module.compile, backend="eager"))
    results = []
    for kwargs in ({}, options):
        torch.manual_seed(0)
        model = tiny_model(**kwargs)
        tiny_trainer(3).fit(model, tiny_datamodule())
        results.append(model)
    plain, fast = results
    assert_same_training(plain.state_dict(), fast.state_dict())
    moving, fixed = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    exported = fast.export_backbone()
    torch.testing.assert_close(exported(moving, fixed), plain.export_backbone()(moving, fixed), rtol=1e-3, atol=1e-4)
