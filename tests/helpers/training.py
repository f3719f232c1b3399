"""Tiny data, networks, trainers and command runners: the real components at a fraction of the cost."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import lightning as L
import torch
from torch import nn

from adacs_lightning import PAPER, AdaCS, ScoringNetwork, SyntheticDataModule, voxelmorph

BIN = Path(sys.executable).parent


def run_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run a console command as a user would: this environment's scripts on PATH, W&B offline."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_MODE", None)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@contextlib.contextmanager
def working_directory(path):
    """``os.chdir`` for the block (Python 3.10 has no ``contextlib.chdir``)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def adacs_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``adacs-train ARGS`` run in this process, as the console script runs it: exit status and output captured.

    The same entry point and Hydra composition as the console script, without a new interpreter
    (seconds of imports per call). Runs that start processes of their own (DDP) use
    :func:`adacs_train_subprocess`.
    """
    from adacs_lightning.cli.train import main

    stdout, stderr = io.StringIO(), io.StringIO()
    argv, status = sys.argv, 0
    sys.argv = ["adacs-train", *args]
    # Lightning's loggers hold the interpreter's stderr from import time: give them the captured one.
    handler = logging.StreamHandler(stderr)
    lightning_loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in lightning_loggers:
        logger.addHandler(handler)
    try:
        with working_directory(cwd), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main()
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    except Exception:  # an uncaught error: a traceback, as the console script would print
        stderr.write(traceback.format_exc())
        status = 1
    finally:
        sys.argv = argv
        for logger in lightning_loggers:
            logger.removeHandler(handler)
    return subprocess.CompletedProcess(["adacs-train", *args], status, stdout.getvalue(), stderr.getvalue())


def adacs_train_subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``adacs-train ARGS`` as a new process (the installed console script)."""
    return run_command([str(BIN / "adacs-train"), *args], cwd)


def tiny_backbone(spatial_dims: int = 2):
    """A VoxelMorph with narrow layers: the real architecture at a fraction of the cost."""
    return voxelmorph(spatial_dims=spatial_dims, channels=(4, 8, 8, 8), unet_out_channels=8, final_conv_channels=(8,))


def tiny_datamodule(spatial_dims: int = 2, size: int = 32, pairs: int = 8, batch_size: int = 4, **kwargs):
    return SyntheticDataModule(
        spatial_dims=spatial_dims,
        image_size=size,
        train_pairs=pairs,
        val_pairs=4,
        test_pairs=4,
        batch_size=batch_size,
        **kwargs,
    )


def tiny_trainer(max_epochs: int, tmp_path=None, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path) if tmp_path else None,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def tiny_model(**kwargs) -> AdaCS:
    """AdaCS with the paper's settings (the hand computations of the tests assume its fixed constants),
    a one-epoch warm-up and lr 1e-3; ``kwargs`` override them."""
    return AdaCS(tiny_backbone(), **{**PAPER, "warmup_epochs": 1, "lr": 1e-3, **kwargs})


def assert_same_training(a: dict, b: dict, spatial_dims: int = 2, atol: float = 3e-4) -> None:
    """Two AdaCS state dicts describe the same trained model, up to float rounding.

    Backbone weights and the momentum state are compared directly. The scorer is compared by
    its output: biases in front of its instance norms have a zero gradient in exact
    arithmetic, so Adam turns rounding noise there into ±lr steps that the norm removes.
    """
    assert set(a) == set(b)
    for name in a:
        if not name.startswith("scorer."):
            torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=atol, msg=name)
    scorer_keys = [k for k in a if k.startswith("scorer.")]
    if scorer_keys:
        scorers = []
        for state in (a, b):
            scorer = ScoringNetwork(spatial_dims)
            scorer.load_state_dict({k.removeprefix("scorer."): state[k] for k in scorer_keys})
            scorers.append(scorer.eval())
        image = torch.rand((2, 1) + (32,) * spatial_dims, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(scorers[0](image), scorers[1](image), rtol=1e-3, atol=atol)


class PairNet(nn.Module):
    """A user network with the contract's own signature: (moving, fixed) -> ddf."""

    def __init__(self, ndim=2):
        super().__init__()
        self.conv = nn.Conv2d(2, ndim, 3, padding=1) if ndim == 2 else nn.Conv3d(2, ndim, 3, padding=1)

    def forward(self, moving, fixed):
        return self.conv(torch.cat([moving, fixed], 1))
