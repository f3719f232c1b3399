"""Seeded tiny runs of every method, recorded so that a change to the code can be shown to change nothing.

``python -m tests.helpers.fingerprints --write`` trains each run of :data:`RUNS` (composed from the
command line's configs, every setting that a default could move given explicitly) and saves its
trained networks, momentum state and validation Dice to ``tests/data/method_fingerprints.pt``;
``--check`` retrains and reports, per run, whether the result is bit-identical.
tests/test_fingerprints.py runs the same check within a tolerance (another CPU may round differently).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

from .configs import compose_config
from .training import tiny_trainer

FINGERPRINTS = Path(__file__).resolve().parents[1] / "data" / "method_fingerprints.pt"

#: Narrow networks and explicit settings: the same model whatever the configs' defaults say.
COMMON = (
    "debug=tiny",
    "backbone.channels=[4,8,8,8]",
    "backbone.unet_out_channels=8",
    "backbone.final_conv_channels=[8]",
    "method.lam=0.02",
    "method.lr=0.01",
    "method.warmup_epochs=1",
    "data.train_pairs=16",
    "data.image_size=64",
)
TINY_UNET = ("scorer.channels=[4,8,8,8]",)
RUNS: dict[str, tuple[str, ...]] = {
    "baseline": ("method=baseline",),
    "adacs": ("method=adacs_shift_min", *TINY_UNET),
    "adacs_paper": ("method=adacs_mean", *TINY_UNET),
    "adacs_normalised": ("method=adacs_normalised", *TINY_UNET),
    "reference": (
        "experiment=reference",
        "scorer.encoder=[4,8,8,8]",
        "scorer.decoder=[8,8,8,8,8,4,4]",
        "method.lr=0.01",
        "method.scorer_lr=0.01",
    ),
    "robust": ("method=robust",),
    "nll": ("method=nll", "method.variance_net.channels=[4,8,8,8]"),
    "beta_nll": ("method=beta_nll", "method.variance_net.channels=[4,8,8,8]"),
}
EPOCHS = 5


def train_run(name: str, tmp_path: Path) -> dict:
    """Train run ``name`` for :data:`EPOCHS` epochs on one thread; its state dict and last validation Dice."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = compose_config([*RUNS[name], *COMMON], tmp_path)
        L.seed_everything(0, verbose=False)
        datamodule = instantiate(cfg.data, _convert_="all")
        model = instantiate(cfg.method, _convert_="all", backbone=instantiate(cfg.backbone, _convert_="all"))
        trainer = tiny_trainer(EPOCHS, tmp_path)
        trainer.fit(model, datamodule=datamodule)
    finally:
        torch.set_num_threads(threads)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "val_dice": float(trainer.callback_metrics["val/dice"]), "model": model}


def differences(expected: dict, actual: dict) -> list[str]:
    """The entries of two runs that are not bit-identical (empty when they are)."""
    found = (
        [f"key set {sorted(set(expected['state']) ^ set(actual['state']))}"]
        if expected["state"].keys() != actual["state"].keys()
        else []
    )
    for key in sorted(set(expected["state"]) & set(actual["state"])):
        a, b = expected["state"][key], actual["state"][key]
        if a.shape != b.shape or not torch.equal(a, b):
            gap = (a.double() - b.double()).abs().max().item() if a.shape == b.shape else "shape"
            found.append(f"{key} (max |Δ| {gap})")
    if expected["val_dice"] != actual["val_dice"]:
        found.append(f"val_dice {expected['val_dice']} → {actual['val_dice']}")
    return found


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="record the runs (before a change)")
    parser.add_argument("--check", action="store_true", help="retrain and compare with the record")
    parser.add_argument("runs", nargs="*", default=list(RUNS))
    args = parser.parse_args()
    recorded = torch.load(FINGERPRINTS) if FINGERPRINTS.exists() else {}
    failed = False
    for name in args.runs:
        with tempfile.TemporaryDirectory() as tmp:
            result = train_run(name, Path(tmp))
        result.pop("model")
        if args.write:
            recorded[name] = result
            print(f"{name:18s} val/dice {result['val_dice']:.6f}  recorded")
        else:
            found = differences(recorded[name], result)
            failed |= bool(found)
            verdict = "bit-identical" if not found else "DIFFERS: " + "; ".join(found[:4])
            print(
                f"{name:18s} val/dice {result['val_dice']:.6f} (recorded {recorded[name]['val_dice']:.6f})  {verdict}"
            )
    if args.write:
        FINGERPRINTS.parent.mkdir(exist_ok=True)
        torch.save(recorded, FINGERPRINTS)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
