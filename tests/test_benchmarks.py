"""Tiny versions of the benchmarks, so that the commands users run keep working."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from .helpers.training import run_command

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_step_time_benchmark_prints_ratios(tmp_path):
    only = ["joint, unet scorer (reuse)", "joint, voxelmorph scorer (reuse)"]
    command = [sys.executable, str(BENCHMARKS / "step_time.py"), "--size", "32", "--batch", "2", "--steps", "2"]
    command += ["--warmup", "1", "--repeats", "1", "--only", *only, "--json", str(tmp_path / "result.json")]
    result = run_command(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in (*only, "baseline", "inference:"):
        assert line in result.stdout
    results = json.loads((tmp_path / "result.json").read_text())
    assert set(results["step_s"]) == set(results["peak_mib"]) == {"baseline", *only}
    assert all(v > 0 for v in results["step_s"].values())
    assert results["inference_s"]["exported"] > 0


@pytest.mark.slow
def test_dose_response_study_tiny_mode_writes_its_report(tmp_path):
    out = tmp_path / "dose"
    command = [sys.executable, str(BENCHMARKS / "dose_response.py"), "--out", str(out), "--tiny", "--seeds", "0", "1"]
    command += ["--doses", "none", "strong", "--arms", "baseline", "shift_min", "dead_zone_pair"]
    result = run_command(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    arms = ("baseline", "shift_min", "dead_zone_pair")
    assert [(r["dose"], r["arm"]) for r in rows] == [(d, a) for d in ("none", "strong") for a in arms]
    strong = rows[4]
    assert 0.0 <= strong["auroc"] <= 1.0 and len(strong["seed_deltas"]) == 2  # the mask exists at a strong dose
    assert "t_p_holm" in strong and (out / "dose_response.png").is_file()
    assert 0.0 < strong["kept_mass"] <= 1.0 and 0.0 < strong["train_kept_mass"] <= 1.0  # the mechanism's health
    assert "| strong | AdaCS, calibrated + shift-min target |" in (out / "results.md").read_text()
    # A rerun reads the runs back instead of training them again.
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == 12 and run_command(command, cwd=tmp_path).returncode == 0
    assert sorted((out / "runs").glob("*.json")) == runs
    # The report alone, λ chosen on seed 0's validation pairs, from the runs on disk.
    report = run_command([*command, "--report-only", "--lambda-seeds", "0"], cwd=tmp_path)
    assert (
        report.returncode == 0 and "chosen on the validation pairs of seed(s) [0]" in (out / "results.md").read_text()
    )
    assert sorted((out / "runs").glob("*.json")) == runs


@pytest.mark.slow
def test_refine_benchmark_prints_ratios(tmp_path):
    command = [sys.executable, str(BENCHMARKS / "refine.py"), "--steps", "0", "3", "--sizes", "2:32", "3:16"]
    command += ["--repeats", "1", "--json", str(tmp_path / "rows.json")]
    result = run_command(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "× network alone" in result.stdout and "| 3D 16^3 | 3 | 4 |" in result.stdout
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert len(rows) == 2 * 3 and all(r["s_per_pair"] > 0 for r in rows)
    assert all(r["objective_after"] <= r["objective_before"] for r in rows if r["steps"] > 0)


@pytest.mark.slow
def test_refine_study_tiny_mode_compares_three_arms(tmp_path):
    out = tmp_path / "refine"
    command = [sys.executable, str(BENCHMARKS / "refine_study.py"), "--out", str(out), "--tiny", "--seeds", "0"]
    result = run_command([*command, "--steps", "3"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert {r["arm"] for r in results["rows"]} == {"network", "plain", "score"}
    assert {(t["a"], t["b"]) for t in results["tests"]} == {
        ("network", "plain"),
        ("network", "score"),
        ("plain", "score"),
    }
    assert "| score vs plain | dice |" in (out / "results.md").read_text()
    assert len(list((out / "models").glob("*.pt"))) == 1  # the trained model is kept for reruns


@pytest.mark.slow
def test_maps_figure_tool_registers_a_runs_test_pairs_and_draws_them(tmp_path):
    from .helpers.runs import make_run_folder

    run = make_run_folder(tmp_path / "run", method="adacs")
    figure = tmp_path / "maps.png"
    command = [sys.executable, str(BENCHMARKS.parent / "tools" / "maps_figure.py"), "--run", str(run)]
    command += ["--out", str(tmp_path / "maps"), "--pairs", "2", "--figure", str(figure)]
    result = run_command(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert figure.stat().st_size > 10_000 and result.stdout.count("flag ") == 2
    assert (tmp_path / "maps" / "pair1" / "score.nii.gz").exists()
