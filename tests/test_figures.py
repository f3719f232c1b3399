"""Figures: the Figure 4 layout per case, the warped-grid panel, and the μ_T / m_T curves."""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from adacs_lightning.callbacks import MomentumCurves, RegistrationImages
from adacs_lightning.figures import PANELS, panel_tensors, registration_figure, registration_panels
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


def test_figures_are_drawn_after_the_last_epoch_whatever_the_interval(tmp_path):
    trainer = tiny_trainer(3, callbacks=[RegistrationImages(every_n_epochs=5)], default_root_dir=str(tmp_path))
    trainer.fit(tiny_model(), tiny_datamodule())
    assert sorted(p.name for p in (tmp_path / "figures" / "layout").glob("*.png")) == ["val_epoch002.png"]


def test_orientation_follows_the_recorded_direction():
    from adacs_lightning.figures import view_of

    stored = view_of(2, None)
    assert stored.edges is None and "as stored" in stored.caption
    # axis 0 along +x (towards the patient's right), axis 1 along +y (anterior): an axial slice in RAS
    axial = view_of(2, np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert (axial.rows, axial.columns) == (1, 0)  # x across the screen, y down the rows…
    assert axial.invert_x and axial.invert_y  # …the patient's right on the left, anterior at the top
    assert axial.edges == ("R", "L", "A", "P") and "Slicer" in axial.caption
    # a coronal 3D volume stored (x, z, y): the axial slice is the one across axis 1
    volume = view_of(3, np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert volume.slice_axis == 1 and volume.edges == ("R", "L", "A", "P")


def test_the_figure_has_colour_bars_and_names_its_case_and_epoch(tmp_path):
    import matplotlib.pyplot as plt

    from adacs_lightning.figures import FIGURE_COLUMNS, draw_registration

    batch = _batch()
    direction = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0]])
    pairs = panel_tensors(tiny_model().eval(), batch, 2)
    fig = draw_registration(pairs, ["case_a", "case_b"], [torch.tensor([0.5, 0.5])] * 2, [direction] * 2, epoch=7)
    panels, bars = fig.axes[:14], fig.axes[14:]
    assert len(panels) == 2 * len(FIGURE_COLUMNS) and len(bars) == len(panels)  # a colour bar per panel
    assert {bar.get_ylabel() for bar in bars} >= {"intensity", "|u| (mm)", "score (0 to 1)"}
    assert [panels[0].get_ylabel(), panels[len(FIGURE_COLUMNS)].get_ylabel()] == ["case_a", "case_b"]
    assert fig._suptitle.get_text().endswith("epoch 7")
    texts = {t.get_text() for ax in panels for t in ax.texts} | {t.get_text() for t in fig.texts}
    assert {"R", "L", "A", "P"} <= texts and any("Slicer" in t for t in texts)  # orientation marked
    scale_bar = [a for a in panels[0].artists if hasattr(a, "txt_label") and "mm" in a.txt_label.get_text()]
    assert scale_bar, "no scale bar in mm on the source panel"
    plt.close(fig)
    image = registration_figure(tiny_model().eval(), batch, max_pairs=2, epoch=7)
    assert image.ndim == 3 and image.shape[0] > 300 and image.std() > 0


def test_momentum_figure_shades_the_phases():
    from adacs_lightning.callbacks import phase_spans

    spans = phase_spans([1, 2, 3, 4, 5], ["warm-up A", "warm-up A", "warm-up B", "joint", "joint"])
    assert spans == [("warm-up A", 1, 2), ("warm-up B", 3, 3), ("joint", 4, 5)]
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon, Rectangle

    from adacs_lightning.figures import draw_momentum

    fig = draw_momentum([1, 2, 3, 4, 5], [0.1] * 5, [0.5] * 5, spans)
    for ax in fig.axes:
        shaded = [p for p in ax.patches if isinstance(p, (Polygon, Rectangle))]
        assert len(shaded) == 3  # one span per phase, on both panels
    assert [t.get_text() for t in fig.axes[1].get_legend().get_texts()] == ["warm-up A", "warm-up B", "joint"]
    plt.close(fig)


def test_a_run_that_did_not_register_is_flagged():
    from adacs_lightning.callbacks import RunHealth

    health = RunHealth()
    health.best_dice, health.identity, health.displacement = 0.585, 0.58, 0.01
    problems = health.problems()
    assert len(problems) == 2 and "not learnt to register" in problems[0] and "near zero" in problems[1]
    health.best_dice, health.displacement = 0.75, 1.2
    assert health.problems() == []


def test_three_dimensional_figures_without_orientation():
    dm = tiny_datamodule(spatial_dims=3, size=16, pairs=2, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    from adacs_lightning import AdaCS

    from .helpers.training import tiny_backbone

    model = AdaCS(tiny_backbone(spatial_dims=3))
    image = registration_figure(model.eval(), batch, max_pairs=1, epoch=0)
    assert image.ndim == 3 and image.std() > 0


def test_a_method_without_a_scorer_says_so_on_the_score_panel():
    import matplotlib.pyplot as plt

    from adacs_lightning.figures import draw_registration

    batch = _batch()
    for model, expected in ((tiny_model(scoring=False).eval(), True), (tiny_model().eval(), False)):
        pairs = panel_tensors(model, batch, 1)
        assert pairs[0]["scored"] is not expected
        fig = draw_registration(pairs, split="test")
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any("no scorer" in t for t in texts) is expected
        assert fig._suptitle.get_text() == "Registration of test pairs"
        plt.close(fig)
