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
