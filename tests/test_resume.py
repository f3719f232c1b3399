"""Checkpoints carry both networks, both optimisers, the schedule position and m_T."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adacs_lightning import NonFiniteLossError
from adacs_lightning.configs import config_file

from .helpers.training import tiny_datamodule, tiny_model, tiny_trainer


def checkpoints(folder):
    """The checkpoint callbacks of conf/config.yaml: best by val/dice, and last.ckpt after every epoch."""
    cfg = OmegaConf.create(config_file("config.yaml").read_text())
    callbacks = []
    for key in ("checkpoint", "last_checkpoint"):
        settings = OmegaConf.to_container(cfg.callbacks[key])
        settings.update(dirpath=str(folder), monitor="val/dice" if settings["monitor"] else None)
        callbacks.append(instantiate(settings))
    return callbacks


def fit(max_epochs, ckpt_dir, ckpt_path=None, **model_kwargs):
    L.seed_everything(0, verbose=False)
    model = tiny_model(kappa="auto", **model_kwargs)
    trainer = tiny_trainer(max_epochs, callbacks=checkpoints(ckpt_dir), enable_checkpointing=True)
    trainer.fit(model, tiny_datamodule(), ckpt_path=ckpt_path)
    return model, trainer


@pytest.mark.parametrize("split_epoch", [1, 3])
def test_resume_continues_exactly(tmp_path, split_epoch, single_thread):
    """N epochs straight equals N/2 + resume from last.ckpt + N/2, through all three phases.

    On one thread: with several, the CPU's parallel reductions may sum in a different order from
    one run to the next when the machine is loaded, which is what once made this test fail in a
    full run and pass alone.
    """
    straight, _ = fit(5, tmp_path / "straight")
    fit(split_epoch, tmp_path / "split")
    checkpoint = torch.load(tmp_path / "split" / "last.ckpt", weights_only=False)
    assert len(checkpoint["optimizer_states"]) == 2
    assert checkpoint["epoch"] == split_epoch - 1  # written after the last epoch, not the best one
    assert {"momentum.value", "momentum.count", "momentum.kappa"} <= set(checkpoint["state_dict"])
    resumed, trainer = fit(5, tmp_path / "split", ckpt_path=tmp_path / "split" / "last.ckpt")
    assert trainer.current_epoch == 5
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
    assert int(resumed.momentum.count) == int(straight.momentum.count) > 0


class PoisonAtEpoch(L.Callback):
    """Puts a NaN into one training image when ``epoch`` starts."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            for item in trainer.datamodule.datasets["train"].items:
                item["source"] = item["source"].clone()
                item["source"][0, 0, 0] = float("nan")


def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    L.seed_everything(0, verbose=False)
    model = tiny_model(warmup_epochs=2)
    trainer = tiny_trainer(4, callbacks=[*checkpoints(tmp_path), PoisonAtEpoch(1)], enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError) as error:
        trainer.fit(model, tiny_datamodule())
    message = str(error.value)
    assert "epoch 1" in message and "warmup_backbone" in message and "L_de" in message
    assert "last.ckpt" in message
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    # the weights in memory were never stepped with the bad loss either
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_loss_in_the_joint_phase_leaves_the_momentum_untouched(tmp_path):
    """The check runs before m_T is updated: a NaN batch cannot poison the momentum buffers."""
    L.seed_everything(0, verbose=False)
    model = tiny_model(warmup_epochs=1)
    trainer = tiny_trainer(4, callbacks=[PoisonAtEpoch(2)])
    with pytest.raises(NonFiniteLossError, match="joint"):
        trainer.fit(model, tiny_datamodule())
    assert int(model.momentum.count) == 2  # the two warm-up B steps, nothing from the bad step
    assert all(torch.isfinite(b).all() for b in model.momentum.buffers())
    assert all(torch.isfinite(p).all() for p in model.parameters())
