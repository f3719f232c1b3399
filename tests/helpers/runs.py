"""Tiny trained-model files for the evaluation and registration tests: checkpoints and run folders."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from adacs_lightning import AdaCS
from adacs_lightning.checkpoint import BACKBONE_CONFIG_KEY

from .training import tiny_backbone

TINY_BACKBONE_CONFIG = {
    "_target_": "adacs_lightning.backbones.voxelmorph",
    "spatial_dims": 2,
    "channels": [4, 8, 8, 8],
    "unet_out_channels": 8,
    "final_conv_channels": [8],
}


def tiny_data_config(test_pairs: int = 4) -> dict:
    return {
        "_target_": "adacs_lightning.data.SyntheticDataModule",
        "spatial_dims": 2,
        "image_size": 32,
        "train_pairs": 4,
        "val_pairs": 4,
        "test_pairs": test_pairs,
        "batch_size": 2,
        "seed": "${seed}",
    }


def save_tiny_checkpoint(path: Path, scoring: bool = True, flow_std: float = 0.5, seed: int = 0) -> AdaCS:
    """An AdaCS checkpoint in adacs-train's format; the flow head is perturbed so the displacement is not ~0."""
    torch.manual_seed(seed)
    model = AdaCS(tiny_backbone(), scoring=scoring, warmup_epochs=1)
    last = [m for m in model.backbone.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.normal_(0.0, flow_std)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            BACKBONE_CONFIG_KEY: TINY_BACKBONE_CONFIG,
        },
        path,
    )
    return model


def make_run_folder(folder: Path, method: str = "adacs", seed: int = 0, backbone: str = "voxelmorph") -> Path:
    """A run folder as adacs-train writes it: .hydra/config.yaml, .hydra/hydra.yaml, checkpoints/best-*.ckpt."""
    scoring = method != "baseline"
    save_tiny_checkpoint(folder / "checkpoints" / "best-epoch000.ckpt", scoring=scoring, seed=seed + 10 * scoring)
    method_config = {"_target_": "adacs_lightning.AdaCS", "scoring": scoring, "warmup_epochs": 1}
    method_config["scorer"] = {"_target_": "adacs_lightning.ScoringNetwork", "spatial_dims": 2} if scoring else None
    config = {"seed": seed, "data": tiny_data_config(), "backbone": TINY_BACKBONE_CONFIG, "method": method_config}
    (folder / ".hydra").mkdir(parents=True, exist_ok=True)
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    choices = {"hydra": {"runtime": {"choices": {"backbone": backbone, "method": method}}}}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(choices))
    return folder


NARROW = {
    "voxelmorph": {"channels": [4, 8, 8, 8], "unet_out_channels": 8, "final_conv_channels": [8]},
    "transmorph": {"embed_dim": 12, "num_heads": [1, 1, 2, 2], "drop_path_rate": 0.0},
}


def save_backbone_checkpoint(path: Path, name: str, spatial_dims: int) -> Path:
    """A checkpoint holding a narrow ``name`` backbone (and its config), as adacs-train writes one."""
    from hydra.utils import instantiate

    config = {"_target_": f"adacs_lightning.backbones.{name}", "spatial_dims": spatial_dims, **NARROW[name]}
    torch.manual_seed(0)
    backbone = instantiate(config)
    last = [m for m in backbone.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))][-1]
    with torch.no_grad():
        last.weight.normal_(0.0, 0.3)  # a displacement well away from 0
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, BACKBONE_CONFIG_KEY: config}, path)
    return path
