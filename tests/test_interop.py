"""Outputs other tools apply: ITK-convention fields checked in a fresh SimpleITK process, grids, folders, exports."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from adacs_lightning import Backbone
from adacs_lightning.cli import export as export_cli
from adacs_lightning.cli import register as register_cli

from .helpers.runs import save_tiny_checkpoint

# A flipped axis, anisotropic spacing, an origin away from 0 and (3D) an oblique direction.
AFFINE_2D = np.array([[-1.5, 0.0, 0.0, 40.0], [0.0, 0.8, 0.0, -12.0], [0.0, 0.0, 1.0, 3.0], [0, 0, 0, 1.0]])
ROTATION = np.array([[np.cos(0.3), -np.sin(0.3), 0.0], [np.sin(0.3), np.cos(0.3), 0.0], [0.0, 0.0, 1.0]])
AFFINE_3D = np.eye(4)
AFFINE_3D[:3, :3] = ROTATION @ np.diag([1.2, -0.9, 2.0])
AFFINE_3D[:3, 3] = [-20.0, 15.0, 7.0]


class KnownField(nn.Module):
    """A 'network' returning one smooth displacement (voxels) whatever the images."""

    def __init__(self, field: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("field", field)

    def forward(self, moving, fixed):
        return self.field.expand(moving.shape[0], *self.field.shape[1:]).clone()


def known_field(shape: tuple[int, ...]) -> torch.Tensor:
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    bump = torch.exp(-sum(a**2 for a in axes) / 0.3)
    return torch.stack([2.5 * bump * (i + 1) / len(shape) * (-1) ** i for i in range(len(shape))])[None]


def blob(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    axes = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    centre = [n / 2 + 1.5 for n in shape]
    r2 = sum((a - c) ** 2 for a, c in zip(axes, centre))
    texture = np.random.default_rng(seed).normal(0, 3.0, shape)
    return (300.0 * np.exp(-r2 / (0.08 * min(shape) ** 2)) + 60.0 * np.sin(axes[0] / 2.0) + 100.0 + texture).astype(
        np.float32
    )


@pytest.fixture
def patch_backbone(monkeypatch):
    def install(field: torch.Tensor):
        ndim = field.shape[1]
        backbone = Backbone(KnownField(field), inputs="pair", spatial_dims=ndim, in_channels=1)
        monkeypatch.setattr("adacs_lightning.checkpoint.load_backbone", lambda *a, **k: backbone.eval())

    return install


def pair_args(folder: Path) -> list[str]:
    """``adacs-register`` arguments for ``folder``'s source.nii.gz and target.nii.gz (the model is patched)."""
    return ["--model", "m.ckpt", "--source", str(folder / "source.nii.gz"), "--target", str(folder / "target.nii.gz")]


SITK_APPLY = """
import sys, numpy as np, SimpleITK as sitk
moving, field, target, out = sys.argv[1:5]
transform = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(field), sitk.sitkVectorFloat64))
result = sitk.Resample(sitk.ReadImage(moving), sitk.ReadImage(target), transform, sitk.sitkLinear, 0.0)
sitk.WriteImage(result, out)
"""


@pytest.mark.parametrize(("ndim", "suffix"), [(2, ".nii.gz"), (3, ".nii.gz"), (2, ".mha"), (3, ".nrrd")])
def test_simpleitk_applies_the_written_field_and_gets_the_tools_warped_image(tmp_path, patch_backbone, ndim, suffix):
    shape = (40, 36) if ndim == 2 else (24, 22, 20)
    affine = AFFINE_2D if ndim == 2 else AFFINE_3D
    paths = {}
    for name, seed in (("source", 0), ("target", 1)):
        paths[name] = tmp_path / f"{name}{suffix}"
        write_test_image(blob(shape, seed), affine, paths[name])
    patch_backbone(known_field(shape))
    files = register_cli.run(
        ["--model", str(tmp_path / "model.ckpt"), "--source", str(paths["source"]), "--target", str(paths["target"])]
        + ["--out", str(tmp_path / "out"), "--divisible", "1"]
    )
    assert files["displacement"].name == f"displacement{suffix}"
    ours, inner = assert_simpleitk_reproduces(
        paths["source"], paths["target"], files, tmp_path / f"sitk_warped{suffix}"
    )
    # and the field is not the identity: the warp moved the image
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(paths["source"])))
    assert np.corrcoef(source[inner].ravel(), ours[inner].ravel())[0, 1] < 0.999


def assert_simpleitk_reproduces(source: Path, target: Path, files: dict, applied: Path):
    """SimpleITK, in a fresh process, applies the written displacement to the source and gets the tool's warped image.

    Returns the tool's warped array and the inner region compared (ITK pads with 0 outside, the tool with the border).
    """
    script = subprocess.run(
        [sys.executable, "-c", SITK_APPLY, str(source), str(files["displacement"]), str(target), str(applied)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert script.returncode == 0, script.stderr
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(applied)))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(files["warped"])))
    inner = tuple(slice(3, -3) for _ in range(ours.ndim))
    correlation = np.corrcoef(theirs[inner].ravel(), ours[inner].ravel())[0, 1]
    assert correlation > 0.999, correlation
    return ours, inner


def write_test_image(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    if str(path).endswith(".nii.gz"):
        nib.save(nib.Nifti1Image(array, affine), str(path))
        return
    from adacs_lightning.data.io import Volume
    from adacs_lightning.fields import write_image

    write_image(array, Volume(array, affine), path)


def test_the_inverse_field_maps_back(tmp_path, patch_backbone):
    shape = (40, 36)
    for name in ("source", "target"):
        nib.save(nib.Nifti1Image(blob(shape), AFFINE_2D), str(tmp_path / f"{name}.nii.gz"))
    field = known_field(shape)
    patch_backbone(field)
    files = register_cli.run(
        ["--model", "m.ckpt", "--source", str(tmp_path / "source.nii.gz"), "--target", str(tmp_path / "target.nii.gz")]
        + ["--out", str(tmp_path / "out"), "--divisible", "1"]
    )
    from adacs_lightning.fields import voxel_displacement

    world = np.asarray(nib.load(str(files["inverse_displacement"])).dataobj)[:, :, 0, 0, :]
    inverse = torch.as_tensor(voxel_displacement(np.moveaxis(world, -1, 0), AFFINE_2D))[None]
    from adacs_lightning.warping import warp_block

    composed = field + warp_block("bilinear", "border")(inverse, field)  # u(x) + u⁻¹(x + u(x)) ≈ 0
    assert float(composed[..., 4:-4, 4:-4].abs().max()) < 0.05 * float(field.abs().max())


def test_images_on_different_grids_are_refused_or_resampled(tmp_path, patch_backbone, capsys):
    shape = (32, 32)
    target_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    source_affine = np.diag([2.0, 2.0, 1.0, 1.0])
    source_affine[:3, 3] = [15.0, 0.0, 0.0]
    nib.save(nib.Nifti1Image(blob(shape), source_affine), str(tmp_path / "source.nii.gz"))
    nib.save(nib.Nifti1Image(blob(shape, 1), target_affine), str(tmp_path / "target.nii.gz"))
    patch_backbone(torch.zeros(1, 2, *shape))
    args = pair_args(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        register_cli.main([*args, "--out", str(tmp_path / "refused")])
    message = capsys.readouterr().err
    assert exit_.value.code == 2 and "different grids" in message
    assert "spacing 2×2 mm" in message and "spacing 1×1 mm" in message and "--grid resample" in message
    assert not (tmp_path / "refused").exists()
    files = register_cli.run([*args, "--out", str(tmp_path / "resampled"), "--grid", "resample"])
    record = json.loads(files["record"].read_text())
    assert "resampled onto the target grid" in record["grid"]
    warped = np.asarray(nib.load(str(files["warped"])).dataobj)
    # zero displacement: the warped source is the source resampled by world coordinates
    world = np.meshgrid(np.arange(32.0), np.arange(32.0), indexing="ij")
    inside = (world[0] >= 15) & (world[0] <= 15 + 2 * 31 - 2) & (world[1] <= 2 * 31 - 2)
    source = blob(shape)
    expected = source[((world[0] - 15) / 2).clip(0, 31).round().astype(int), (world[1] / 2).round().astype(int)]
    assert np.corrcoef(warped[inside], expected[inside])[0, 1] > 0.95


def test_a_whole_folder_in_one_process_with_metrics_and_a_skipped_row(tmp_path):
    from .helpers.fakes import make_folder

    csv_path = make_folder(tmp_path / "data", rows=5, shape=(16, 16), formats=(".nii.gz", ".mha"), split=False)
    with csv_path.open() as handle:
        rows = list(csv.DictReader(handle))
    rows.append({**rows[0], "source": "images/missing.nii.gz"})
    # a target label map on another grid than its image: found only when the metrics are computed
    nib.save(nib.Nifti1Image(np.ones((12, 12), np.uint8), np.eye(4)), str(csv_path.parent / "small_gt.nii.gz"))
    rows.append({**rows[1], "target_label": "small_gt.nii.gz"})
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    checkpoint = tmp_path / "model.ckpt"
    save_tiny_checkpoint(checkpoint)
    reports = register_cli.run(["--model", str(checkpoint), "--csv", str(csv_path), "--out", str(tmp_path / "out")])
    with reports["metrics"].open() as handle:
        metrics = list(csv.DictReader(handle))
    assert [m["case"] for m in metrics] == [f"row{i:04d}" for i in range(1, 6)]
    assert all(0.0 <= float(m["dice"]) <= 1.0 and float(m["folding_pct"]) >= 0 for m in metrics)
    with reports["quality"].open() as handle:  # every registered pair, with its flag, labels or not
        quality = list(csv.DictReader(handle))
    assert [q["case"] for q in quality] == [f"row{i:04d}" for i in range(1, 6)]
    assert all(q["flag"] in ("ok", "review") and float(q["residual_after"]) >= 0 for q in quality)
    with reports["failed"].open() as handle:
        failed = list(csv.DictReader(handle))
    assert [f["case"] for f in failed] == ["row0006", "row0007"] and "missing" in failed[0]["problem"]
    assert "on the target's grid" in failed[1]["problem"]
    assert (tmp_path / "out" / "row0002" / "warped.mha").is_file()  # each pair in its target's format
    assert (tmp_path / "out" / "row0001" / "displacement.nii.gz").is_file()


EXPORT_CHECK = """
import sys, torch
kind, path, moving, fixed, expected = sys.argv[1:6]
moving, fixed, expected = torch.load(moving), torch.load(fixed), torch.load(expected)
program = torch.jit.load(path) if kind == "torchscript" else torch.export.load(path).module()
got = program(moving, fixed)
print((got - expected).abs().max().item())
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "spatial_dims", "kind"),
    [
        ("voxelmorph", 2, "export"),
        ("voxelmorph", 2, "torchscript"),
        ("voxelmorph", 3, "torchscript"),
        ("transmorph", 2, "torchscript"),
        ("transmorph", 3, "torchscript"),
    ],
)
def test_exported_network_reproduces_the_displacement_in_a_fresh_process(tmp_path, backbone, spatial_dims, kind):
    from adacs_lightning.checkpoint import load_backbone

    from .helpers.runs import save_backbone_checkpoint

    size = 32
    checkpoint = save_backbone_checkpoint(tmp_path / "model.ckpt", backbone, spatial_dims)
    output = export_cli.run([str(checkpoint), "-o", str(tmp_path / "net.pt2"), "--format", kind, "--size", str(size)])
    moving, fixed = (torch.rand((1, 1) + (size,) * spatial_dims) for _ in range(2))
    with torch.no_grad():
        expected = load_backbone(checkpoint)(moving, fixed)
    for name, tensor in (("moving", moving), ("fixed", fixed), ("expected", expected)):
        torch.save(tensor, tmp_path / f"{name}.pt")
    check = subprocess.run(
        [sys.executable, "-c", EXPORT_CHECK, kind, str(output), *(str(tmp_path / f"{n}.pt") for n in ("moving", "fixed", "expected"))],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr[-2000:]
    assert float(check.stdout.strip().splitlines()[-1]) < 1e-5
    assert json.loads(Path(f"{output}.json").read_text())["input_size"] == [size] * spatial_dims


def test_onnx_without_its_package_is_explained(tmp_path, capsys):
    checkpoint = tmp_path / "model.ckpt"
    save_tiny_checkpoint(checkpoint)
    try:
        import onnx  # noqa: F401

        pytest.skip("onnx is installed here")
    except ImportError:
        pass
    with pytest.raises(SystemExit):
        export_cli.main([str(checkpoint), "-o", str(tmp_path / "net.onnx"), "--format", "onnx", "--size", "32", "32"])
    assert "pip install onnx" in capsys.readouterr().err


class PointwiseField(nn.Module):
    """A 'network' whose displacement at a voxel depends on the two intensities there alone."""

    def forward(self, moving, fixed):
        return torch.cat([2.0 * moving - fixed, moving * fixed], dim=1)


def test_sliding_window_inference_stitches_the_same_field(tmp_path, monkeypatch):
    """A pointwise network's field is the same whether the images go in whole or in overlapping windows."""
    shape = (48, 40)
    for name, seed in (("source", 0), ("target", 1)):
        nib.save(nib.Nifti1Image(blob(shape, seed), AFFINE_2D), str(tmp_path / f"{name}.nii.gz"))
    backbone = Backbone(PointwiseField(), inputs="pair", spatial_dims=2, in_channels=1).eval()
    monkeypatch.setattr("adacs_lightning.checkpoint.load_backbone", lambda *a, **k: backbone)
    args = pair_args(tmp_path)
    from adacs_lightning.fields import read_voxel_displacement

    windows = register_cli.run([*args, "--out", str(tmp_path / "windows"), "--roi-size", "16", "--divisible", "1"])
    whole = register_cli.run([*args, "--out", str(tmp_path / "whole"), "--divisible", "1"])
    field = read_voxel_displacement(windows["displacement_voxels"])
    expected = read_voxel_displacement(whole["displacement_voxels"])
    assert field.shape == (2, *shape) and np.ptp(expected) > 0.5  # a field that varies across the image
    np.testing.assert_allclose(field, expected, atol=1e-5)
