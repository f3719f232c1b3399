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
    result = run_command(
        [
            sys.executable,
            str(BENCHMARKS / "step_time.py"),
            "--size",
            "32",
            "--batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--reference-scorer",
            "8",
            "16",
            "16",
            "16",
            "--json",
            str(tmp_path / "result.json"),
        ],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("adacs joint (reuse)", "adacs joint (recompute)", "scorer as large as backbone", "inference:"):
        assert line in result.stdout
    results = json.loads((tmp_path / "result.json").read_text())
    assert set(results["step_s"]) == set(results["peak_mib"])
    assert all(v > 0 for v in results["step_s"].values())
    assert results["inference_s"]["exported"] > 0


@pytest.mark.slow
def test_adacs_study_tiny(tmp_path):
    """Two settings of the validation study, each a tiny run; the table and results file come out."""
    command = [sys.executable, str(BENCHMARKS / "adacs_study.py"), "--out", str(tmp_path), "--group", "ordering"]
    result = run_command([*command, "--only", "base_lam0.01", "adacs_default", "--extra", "debug=tiny"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {r["name"] for r in rows} == {"base_lam0.01", "adacs_default"}
    assert all(0.0 <= r["val_dice"] <= 1.0 for r in rows)
    adacs = next(r for r in rows if r["name"] == "adacs_default")
    assert adacs["m"] is not None and 0.0 <= adacs["m"] <= 1.0  # the scorer ran: m_T was logged
    assert "| adacs_default | 0 |" in (tmp_path / "results.md").read_text()
