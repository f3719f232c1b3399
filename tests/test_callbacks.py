"""The progress bar and the registration panels."""

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from adacs_lightning.callbacks import ProgressBar, RegistrationImages
from adacs_lightning.figures import PANELS, registration_panels

from .helpers.training import tiny_datamodule, tiny_model, tiny_trainer


def test_progress_bar_shows_the_phase_not_the_logger_version(tmp_path):
    bar = ProgressBar(refresh_rate=1)
    seen = []

    class Peek(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            seen.append(bar.get_metrics(trainer, module))

    trainer = tiny_trainer(3, callbacks=[bar, Peek()], enable_progress_bar=True, logger=CSVLogger(tmp_path))
    trainer.fit(tiny_model(), tiny_datamodule())
    assert [m["phase"] for m in seen] == ["warmup_backbone", "warmup_scorer", "joint"]
    assert all("v_num" not in m for m in seen)


def test_registration_panels_layout_and_baseline_score():
    dm = tiny_datamodule()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    grid = registration_panels(tiny_model(scoring=False), batch, max_pairs=2)
    assert grid.dtype == np.uint8 and grid.shape == (2 * 32, len(PANELS) * 32)
    score_panel = grid[:32, 4 * 32 : 5 * 32]
    assert (score_panel == 255).all()  # without a scorer, Ŝ ≡ 1


def test_registration_images_saved_every_n_epochs(tmp_path):
    trainer = tiny_trainer(4, callbacks=[RegistrationImages(every_n_epochs=2)], default_root_dir=str(tmp_path))
    trainer.fit(tiny_model(), tiny_datamodule())
    saved = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert saved == ["val_epoch001.png", "val_epoch003.png"]
    assert Image.open(tmp_path / "figures" / saved[0]).size == (
        len(PANELS) * 32,
        2 * 32 + 14,
    )  # a header names the panels
    assert torch.isfinite(trainer.callback_metrics["val/dice"])
