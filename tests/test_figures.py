"""Figures: the Figure 4 layout per case, the warped-grid panel, and the μ_T / m_T curves."""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from adacs_lightning.callbacks import (
    PANELS,
    MomentumCurves,
    RegistrationImages,
    panel_tensors,
    registration_figure,
    registration_panels,
)
from adacs_lightning.methods import VarianceWeighted

from .helpers.training import tiny_backbone, tiny_datamodule, tiny_model, tiny_trainer


def _batch():
    dm = tiny_datamodule()
    dm.setup("fit")
    return next(iter(dm.val_dataloader()))


def test_displacement_panel_is_a_grid_warped_by_the_displacement():
    batch = _batch()
    model = tiny_model().eval()
    (pair,) = panel_tensors(model, batch, max_pairs=1)
    grid = pair["displacement"][0]
    assert grid.shape == (32, 32)
    torch.testing.assert_close(grid, torch.from_numpy(_lines()), atol=1e-3, rtol=0)  # near identity at start
    (moved,) = panel_tensors(Shift(), batch, max_pairs=1)  # every horizontal line up by 2 rows
    shifted = moved["displacement"][0]
    torch.testing.assert_close(shifted[:-2], grid.new_tensor(np.roll(_lines(), -2, axis=0))[:-2])
    assert registration_panels(model, batch, 2).shape == (64, len(PANELS) * 32)


class Shift(torch.nn.Module):
    """A bare backbone displacing by +2 rows everywhere: moving(x + u) shows row r + 2 at row r."""

    def forward(self, moving, fixed):
        return torch.tensor([2.0, 0.0]).view(1, 2, 1, 1).expand(moving.shape[0], 2, *moving.shape[2:])


def _lines() -> np.ndarray:
    lines = np.zeros((32, 32), dtype=np.float32)
    lines[::4, :] = 1.0
    lines[:, ::4] = 1.0
    return lines


def test_registration_figure_has_the_seven_columns_for_each_method():
    batch = _batch()
    for model in (tiny_model(), tiny_model(scoring=False), VarianceWeighted(tiny_backbone()), tiny_backbone()):
        image = registration_figure(model.eval(), batch, max_pairs=2, case_ids=["a", "b"])
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert image.shape[1] > 3 * image.shape[0] / 2  # seven columns, two rows
        assert image.std() > 0


def test_fit_writes_layout_figures_and_momentum_curves(tmp_path):
    callbacks = [RegistrationImages(every_n_epochs=3), MomentumCurves()]
    trainer = tiny_trainer(3, callbacks=callbacks, default_root_dir=str(tmp_path), logger=CSVLogger(tmp_path))
    model = tiny_model()
    trainer.fit(model, tiny_datamodule())
    figures = tmp_path / "figures"
    assert (figures / "val_epoch002.png").is_file() and (figures / "layout" / "val_epoch002.png").is_file()
    curves = callbacks[1]
    assert curves.steps == list(range(1, int(model.momentum.count) + 1))  # every scorer update once
    assert curves.m[-1] == float(model.momentum.value) and all(0.0 <= m <= 1.0 for m in curves.m)
    assert Image.open(figures / "momentum.png").size[0] > 0


def test_no_momentum_curves_for_the_baseline(tmp_path):
    trainer = tiny_trainer(1, callbacks=[MomentumCurves()], default_root_dir=str(tmp_path))
    trainer.fit(tiny_model(scoring=False), tiny_datamodule())
    assert not (tmp_path / "figures" / "momentum.png").exists()


def test_momentum_curves_survive_a_checkpoint():
    curves = MomentumCurves()
    curves.steps, curves.mu, curves.m = [1, 2], [0.5, 0.25], [0.0, 0.3]
    restored = MomentumCurves()
    restored.load_state_dict(curves.state_dict())
    assert (restored.steps, restored.mu, restored.m) == ([1, 2], [0.5, 0.25], [0.0, 0.3])
