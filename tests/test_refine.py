"""Registration-time refinement: the run's own objective, per pair, from the network's field."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adacs_lightning.cli import register as register_cli
from adacs_lightning.losses import masked_mean
from adacs_lightning.metrics import folding_percentage
from adacs_lightning.objective import BackboneObjective
from adacs_lightning.refine import Refiner, per_pair_data_term
from adacs_lightning.similarity import SquaredError

from .helpers.runs import make_run_folder
from .test_interop import AFFINE_2D, assert_simpleitk_reproduces, blob, write_test_image


def _blobs(shifts, size=48):
    """Source/target pairs ``(B, 1, size, size)``: a blob and a bar, the target's moved by each ``shift`` (voxels)."""
    yy, xx = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")

    def image(dy, dx):
        blob_ = torch.exp(-((yy - 20 - dy) ** 2 + (xx - 22 - dx) ** 2) / 40.0)
        bar = 0.6 * torch.exp(-((xx - 34 - dx) ** 2) / 6.0) * (yy > 8) * (yy < 40)
        return (blob_ + bar)[None]

    moving = torch.stack([image(0, 0) for _ in shifts])
    fixed = torch.stack([image(*s) for s in shifts])
    return moving, fixed


class ConstantScorer(nn.Module):
    def __init__(self, score: torch.Tensor):
        super().__init__()
        self.register_buffer("score", score)

    def forward(self, image):
        return self.score.expand(image.shape[0], *self.score.shape[1:])


def test_refinement_lowers_the_objective_and_zero_steps_return_the_network_field_exactly():
    moving, fixed = _blobs([(2.0, -1.5)])
    start = torch.zeros(1, 2, 48, 48)
    start[:, 0] = 0.5  # a network's guess: half a voxel along the first axis
    refiner = Refiner(BackboneObjective(SquaredError(), lam=0.05), steps=60, lr=0.2, grid=4)
    result = refiner.refine(moving, fixed, start)
    assert result.objective_after[0] < 0.5 * result.objective_before[0]
    assert torch.allclose(refiner.objective_per_pair(moving, fixed, result.ddf), result.objective_after, rtol=1e-4)
    untouched = Refiner(BackboneObjective(SquaredError(), lam=0.05), steps=0).refine(moving, fixed, start)
    assert torch.equal(untouched.ddf, start) and int(untouched.steps[0]) == 0


def test_score_weighting_changes_the_data_gradient_only_where_the_score_is_below_one():
    moving, fixed = _blobs([(2.0, 1.0)])
    score = torch.ones(1, 1, 48, 48)
    score[..., 10:30, 10:24] = 0.2  # a hand-made map: low over part of the blob
    ddf = torch.zeros(1, 2, 48, 48, requires_grad=True)
    gradients = {}
    for name, weight in (("plain", None), ("scored", score)):
        refiner = Refiner(BackboneObjective(SquaredError(), lam=0.0), fold_weight=0.0, weighting="mean")
        residual = refiner.objective.residual(moving, fixed, ddf)
        (grad,) = torch.autograd.grad(per_pair_data_term(residual, weight, None, "mean").sum(), ddf)
        gradients[name] = grad
    low = (score < 1).expand_as(ddf)
    torch.testing.assert_close(gradients["plain"][~low], gradients["scored"][~low])
    assert (gradients["plain"][low] - gradients["scored"][low]).abs().max() > 1e-6
    torch.testing.assert_close(gradients["scored"][low], 0.2 * gradients["plain"][low])


def test_batched_and_unbatched_refinement_agree_and_the_scorer_weights_it():
    moving, fixed = _blobs([(2.0, -1.0), (-1.0, 2.5), (0.5, 0.5)])
    score = torch.rand(1, 1, 48, 48, generator=torch.Generator().manual_seed(1))
    refiner = Refiner(
        BackboneObjective(SquaredError(), lam=0.05), steps=25, lr=0.2, grid=4, scorer=ConstantScorer(score)
    )
    start = torch.zeros(3, 2, 48, 48)
    batched = refiner.refine(moving, fixed, start)
    for i in range(3):
        alone = refiner.refine(moving[i : i + 1], fixed[i : i + 1], start[i : i + 1])
        torch.testing.assert_close(alone.ddf, batched.ddf[i : i + 1], atol=1e-5, rtol=1e-4)
        assert int(alone.steps[0]) == int(batched.steps[i])
    unweighted = Refiner(BackboneObjective(SquaredError(), lam=0.05), steps=25, lr=0.2, grid=4).refine(
        moving, fixed, start
    )
    assert not torch.allclose(unweighted.ddf, batched.ddf)


def test_the_folding_guard_keeps_a_tempting_pair_unfolded():
    """A target whose blob is squeezed to a line tempts a field that folds; the guard keeps it at the network's 0 %."""
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
    moving = torch.exp(-((yy - 24) ** 2 + (xx - 24) ** 2) / 60.0)[None, None]
    fixed = torch.exp(-((yy - 24) ** 2) / 60.0 - (xx - 24) ** 2 / 0.5)[None, None]
    start = torch.zeros(1, 2, 48, 48)
    free = Refiner(BackboneObjective(SquaredError(), lam=0.0), steps=150, lr=1.0, grid=1, fold_weight=0.0).refine(
        moving, fixed, start
    )
    guarded = Refiner(BackboneObjective(SquaredError(), lam=0.0), steps=150, lr=1.0, grid=1, fold_weight=1.0).refine(
        moving, fixed, start
    )
    assert float(free.folding_after[0]) > 0.5  # the temptation is real
    assert float(guarded.folding_after[0]) <= float(guarded.folding_before[0]) == 0.0
    assert float(folding_percentage(guarded.ddf)[0]) == 0.0


@pytest.mark.parametrize("ndim", [2, 3])
def test_the_fold_guard_is_its_formula_in_value_and_gradient_whether_or_not_a_voxel_nears_folding(ndim):
    from adacs_lightning.metrics import jacobian_determinant

    refiner = Refiner(BackboneObjective(SquaredError(), lam=0.0), fold_margin=0.1)
    torch.manual_seed(ndim)
    for scale in (0.01, 1.0):  # a smooth field far from folding; a rough one that folds
        ddf = (scale * torch.randn((2, ndim) + (8,) * ndim)).requires_grad_()
        mask = (torch.rand((2, 1) + (8,) * ndim) > 0.2).float()
        formula = masked_mean(F.relu(0.1 - jacobian_determinant(ddf)).unsqueeze(1), mask, per_sample=True)
        guard = refiner._fold_guard(ddf, mask)
        torch.testing.assert_close(guard, formula)
        weights = torch.tensor([1.0, 2.0])
        (expected,) = torch.autograd.grad((formula * weights).sum(), ddf)
        if guard.requires_grad:
            (got,) = torch.autograd.grad((guard * weights).sum(), ddf)
            torch.testing.assert_close(got, expected)
        else:  # nothing near folding: the formula is 0 with a zero gradient, and no graph was built
            assert scale == 0.01 and not expected.any() and not guard.any()


@pytest.fixture
def run_folder(tmp_path):
    return make_run_folder(tmp_path / "run", method="adacs")


def test_register_refine_writes_fields_simpleitk_applies_and_records_the_objective(tmp_path, run_folder):
    paths = {}
    for name, seed in (("source", 0), ("target", 1)):
        paths[name] = tmp_path / f"{name}.nii.gz"
        write_test_image(blob((40, 36), seed), AFFINE_2D, paths[name])
    files = register_cli.run(
        ["--model", str(run_folder), "--source", str(paths["source"]), "--target", str(paths["target"])]
        + ["--out", str(tmp_path / "out"), "--refine", "15", "--device", "cpu"]
    )
    record = json.loads(files["record"].read_text())["refinement"]
    assert record["weights"] == "score" and record["grid"] == 4 and 1 <= record["steps"] <= 15
    assert record["objective_after"] <= record["objective_before"] and record["seconds"] > 0
    assert record["folding_pct_after"] <= max(record["folding_pct_before"], 0.0) + 1e-9
    assert_simpleitk_reproduces(paths["source"], paths["target"], files, tmp_path / "sitk_warped.nii.gz")


def test_a_folder_refined_in_batches_gives_each_pair_the_field_it_gets_alone(tmp_path, run_folder):
    """--csv --refine: pairs of one size are refined together (``pairs_in_batch``); each pair's field equals the
    one it gets refined alone, and a row that cannot be read costs no other row of its batch."""
    from adacs_lightning.fields import read_voxel_displacement

    from .helpers.fakes import make_folder

    csv_path = make_folder(tmp_path / "data", rows=4, shape=(20, 16), formats=(".nii.gz",), split=False)
    # The second row: a target label map on another grid, found once the pair is read (the batch fills up with the
    # rows after it).
    nib.save(nib.Nifti1Image(np.ones((12, 12), np.uint8), np.eye(4)), str(csv_path.parent / "small_gt.nii.gz"))
    lines = csv_path.read_text().splitlines()
    lines.insert(2, lines[1].replace("labels/r0_target.nii.gz", "small_gt.nii.gz"))
    csv_path.write_text("\n".join(lines) + "\n")
    fields = {}
    for batch in (3, 1):
        out = tmp_path / f"batch{batch}"
        reports = register_cli.run(
            ["--model", str(run_folder), "--csv", str(csv_path), "--out", str(out), "--device", "cpu"]
            + ["--refine", "10", "--refine-batch", str(batch), "--maps", "none"]
        )
        assert "on the target's grid" in reports["failed"].read_text()
        cases = sorted(p.name for p in out.iterdir() if p.is_dir())
        assert len(cases) == 4
        records = [json.loads((out / c / "registration.json").read_text())["refinement"] for c in cases]
        assert [r["pairs_in_batch"] for r in records] == ([3, 3, 3, 1] if batch == 3 else [1, 1, 1, 1])
        fields[batch] = [read_voxel_displacement(out / c / "displacement_voxels.nii.gz") for c in cases]
    for together, alone in zip(fields[3], fields[1]):
        np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)


def test_a_batch_whose_refinement_fails_is_refined_pair_by_pair(tmp_path, run_folder, monkeypatch):
    """Refining several pairs at once can fail where one pair fits (memory): the batch is retried pair by pair,
    and only a pair that fails alone is listed in failed.csv."""
    from adacs_lightning.registration import folder

    from .helpers.fakes import make_folder

    real = folder.refine_staged

    def flaky(model, staged):
        if len(staged) > 1:
            raise RuntimeError("not enough memory for the batch (simulated)")
        if "r1_" in str(staged[0].paths[0]):
            raise RuntimeError("this pair fails alone")
        return real(model, staged)

    monkeypatch.setattr(folder, "refine_staged", flaky)
    csv_path = make_folder(tmp_path / "data", rows=3, shape=(20, 16), formats=(".nii.gz",), split=False)
    reports = register_cli.run(
        ["--model", str(run_folder), "--csv", str(csv_path), "--out", str(tmp_path / "out"), "--device", "cpu"]
        + ["--refine", "3", "--refine-batch", "3", "--maps", "none"]
    )
    failed = reports["failed"].read_text().splitlines()[1:]
    assert len(failed) == 1 and failed[0].startswith("row0002,") and "fails alone" in failed[0]
    assert [line.split(",")[0] for line in reports["quality"].read_text().splitlines()[1:]] == ["row0001", "row0003"]


def test_register_refine_needs_the_run_folder(tmp_path, capsys):
    from adacs_lightning.cli.common import console_main

    from .helpers.runs import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "bare" / "model.ckpt")
    paths = []
    for name in ("s", "t"):
        paths.append(tmp_path / f"{name}.nii.gz")
        write_test_image(blob((32, 32)), np.eye(4), paths[-1])
    argv = ["--model", str(tmp_path / "bare" / "model.ckpt"), "--source", str(paths[0]), "--target", str(paths[1])]
    with pytest.raises(SystemExit):
        console_main("adacs-register", register_cli.run, [*argv, "--refine", "5", "--out", str(tmp_path / "o")])
    assert "--refine needs the run folder" in capsys.readouterr().err


def test_eval_shows_network_and_refined_side_by_side(tmp_path, run_folder):
    from adacs_lightning.cli import evaluate as evaluate_cli

    from .helpers.tables import read_csv

    out = tmp_path / "report"
    evaluate_cli.run([str(run_folder), "-o", str(out), "--device", "cpu", "--figures", "0", "--refine", "5"])
    cases = read_csv(out / "cases.csv")
    assert {c["method"] for c in cases} == {"adacs", "adacs+refine5"}
    refined = [c for c in cases if c["method"] == "adacs+refine5"]
    assert all(c["objective_after"] <= c["objective_before"] for c in refined)
    assert "adacs+refine5" in (out / "comparison.md").read_text()


def test_one_call_on_a_trained_module_refines_its_backbones_field():
    from adacs_lightning import AdaCS, register_refined

    from .helpers.training import tiny_backbone

    module = AdaCS(tiny_backbone(), lam=0.05).eval()
    moving, fixed = _blobs([(2.0, -1.0)], size=32)
    result = register_refined(module, moving, fixed, steps=10)
    with torch.no_grad():
        network = module.backbone(moving, fixed)
    assert result.ddf.shape == network.shape and not torch.equal(result.ddf, network)
    assert result.objective_after[0] <= result.objective_before[0]
    assert all(not p.requires_grad or p.grad is None for p in module.parameters())  # the weights are not trained


def test_the_label_term_handles_large_label_values_pair_by_pair():
    moving, fixed = _blobs([(2.0, 0.0), (0.0, 2.0)], size=32)
    labels = [(im > 0.5).long() * value for im, value in ((moving, 2035), (fixed, 2035))]
    refiner = Refiner(BackboneObjective(SquaredError(), lam=0.05, label_weight=1.0), steps=5, lr=0.2)
    batched = refiner.refine(moving, fixed, torch.zeros(2, 2, 32, 32), None, *labels)
    alone = refiner.refine(moving[:1], fixed[:1], torch.zeros(1, 2, 32, 32), None, labels[0][:1], labels[1][:1])
    torch.testing.assert_close(alone.ddf, batched.ddf[:1], atol=1e-5, rtol=1e-4)
    assert batched.objective_after[0] < batched.objective_before[0]


def test_one_rule_decides_the_weights_and_refuses_a_score_without_a_scorer():
    from adacs_lightning import AdaCS
    from adacs_lightning.errors import AdaCSError

    from .helpers.training import tiny_backbone

    scored, plain = AdaCS(tiny_backbone()), AdaCS(tiny_backbone(), scoring=False)
    assert Refiner.from_module(scored).weights == "score" and Refiner.from_module(plain).weights == "none"
    assert Refiner.from_module(scored, "none").scorer is None
    assert Refiner.from_module(scored).objective is scored.objective  # training's objective, not a copy
    with pytest.raises(AdaCSError, match="needs a run with a scorer"):
        Refiner.from_module(plain, "score")
