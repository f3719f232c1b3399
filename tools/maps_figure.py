"""The registration maps of docs/interop.md: a trained synthetic run registers test pairs through adacs-register's
library, and a figure shows each target, its score map over it (the true no-correspondence mask outlined) and
the field's Jacobian determinant, titled with the pair's quality flag.

    python tools/maps_figure.py --run outputs/<synthetic run> --out maps --figure docs/figures/registration_maps.png

The run must be trained on synthetic data (its test pairs carry the no-correspondence mask); the pairs are
written as NIfTI files under ``--out`` and registered exactly as ``adacs-register --maps score,jacobian`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchmetrics.functional.classification import binary_auroc

from adacs_lightning.configs import RUN_CONFIG
from adacs_lightning.figures import SCORE_ALPHA, save_figure
from adacs_lightning.registration import PairSettings, RegistrationModel, register_pair


def test_pairs(run: Path, count: int) -> list[dict]:
    """The first ``count`` test pairs of the run's own (synthetic) data module."""
    config = OmegaConf.load(run / RUN_CONFIG)
    datamodule = instantiate(OmegaConf.to_container(config.data, resolve=True))
    datamodule.setup("test")
    dataset = datamodule.test_dataloader().dataset
    return [dataset[i] for i in range(min(count, len(dataset)))]


def register(run: Path, pairs: list[dict], out: Path) -> list[dict]:
    """Write each pair as NIfTI, register it with the maps, and return the target, maps, mask and quality."""
    model = RegistrationModel.load(run, device="cpu", maps="score,jacobian")
    rows = []
    for index, pair in enumerate(pairs):
        folder = out / f"pair{index}"
        folder.mkdir(parents=True, exist_ok=True)
        for role in ("source", "target"):
            nib.save(nib.Nifti1Image(pair[role][0].numpy(), np.eye(4)), str(folder / f"{role}.nii.gz"))
        result = register_pair(model, PairSettings(), folder / "source.nii.gz", folder / "target.nii.gz", folder)
        maps = {
            name: np.asarray(nib.load(str(result.files[name])).dataobj) for name in ("score", "jacobian_determinant")
        }
        nocorr = pair["nocorr"][0].numpy() > 0.5
        score = torch.from_numpy(maps["score"]).flatten()
        auroc = float(binary_auroc(1.0 - score, torch.from_numpy(nocorr).flatten().long())) if nocorr.any() else None
        quality = json.loads(result.files["record"].read_text())["quality"]
        rows.append({"target": pair["target"][0].numpy(), "nocorr": nocorr, "auroc": auroc, "quality": quality, **maps})
        gap = maps["score"][~nocorr].mean() - maps["score"][nocorr].mean() if nocorr.any() else float("nan")
        print(
            f"pair {index}: flag {quality['flag']} ({quality.get('flag_reasons') or 'no reason'}); score mean "
            f"{quality['score_mean']:.2f}, share < 0.5 {quality['score_low_share']:.2f}; Ŝ outside − inside the "
            f"mask {gap:+.2f}; AUROC of 1 − Ŝ {auroc if auroc is None else round(auroc, 2)}; det J min "
            f"{quality['det_jacobian_min']:.2f}, folding {quality['folding_pct']:.2f} %"
        )
    return rows


def draw(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(9.5, 3.0 * len(rows)), squeeze=False)
    for row, (ax_target, ax_score, ax_jacobian) in zip(rows, axes):
        ax_target.imshow(row["target"].T, cmap="gray", origin="lower")
        ax_score.imshow(row["target"].T, cmap="gray", origin="lower")
        score = ax_score.imshow(row["score"].T, cmap="viridis", vmin=0, vmax=1, alpha=SCORE_ALPHA, origin="lower")
        jacobian = ax_jacobian.imshow(row["jacobian_determinant"].T, cmap="RdBu", vmin=0, vmax=2, origin="lower")
        for ax in (ax_target, ax_score):
            ax.contour(row["nocorr"].T.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        fig.colorbar(score, ax=ax_score, fraction=0.046, pad=0.02).set_label("Ŝ", fontsize=8)
        fig.colorbar(jacobian, ax=ax_jacobian, fraction=0.046, pad=0.02).set_label("det J", fontsize=8)
        quality = row["quality"]
        auroc = "–" if row["auroc"] is None else f"{row['auroc']:.2f}"
        ax_target.set_ylabel(f"flag: {quality['flag']}", fontsize=9)
        ax_score.set_xlabel(f"Ŝ < 0.5 on {quality['score_low_share']:.0%}; AUROC {auroc}", fontsize=8)
        ax_jacobian.set_xlabel(
            f"min {quality['det_jacobian_min']:.2f}, folding {quality['folding_pct']:.2f} %", fontsize=8
        )
        for ax in (ax_target, ax_score, ax_jacobian):
            ax.set_xticks([])
            ax.set_yticks([])
    for ax, title in zip(axes[0], ("target (red: no counterpart)", "score Ŝ over the target", "det J of the field")):
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run folder of adacs-train on synthetic data")
    parser.add_argument("--out", type=Path, required=True, help="where the pairs and their registrations go")
    parser.add_argument("--pairs", type=int, default=3, help="how many test pairs")
    parser.add_argument("--figure", type=Path, default=Path("docs/figures/registration_maps.png"))
    args = parser.parse_args(argv)
    rows = register(args.run, test_pairs(args.run, args.pairs), args.out)
    print(f"figure: {draw(rows, args.figure)}")


if __name__ == "__main__":
    main()
