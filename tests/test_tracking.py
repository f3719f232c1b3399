"""W&B logging (offline), sweep definitions expanded as an agent would, Hydra's Optuna search."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adacs_lightning.loggers import wandb_api_key_configured, wandb_logger
from adacs_lightning.sweeps import command_line, load_sweep, parameter_sets

from .helpers.training import adacs_train, run_command
from .helpers.wandb_records import read_run

SWEEPS = sorted((Path(__file__).parents[1] / "src" / "adacs_lightning" / "sweeps").glob("*.yaml"))


def test_offline_unless_a_key_is_configured(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert not wandb_api_key_configured()
    assert wandb_logger(save_dir=str(tmp_path))._offline
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert wandb_api_key_configured()
    assert not wandb_logger(save_dir=str(tmp_path))._offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_logger(save_dir=str(tmp_path))._offline
    assert not wandb_logger(save_dir=str(tmp_path), offline=False)._offline


def test_sweep_files_are_wandb_sweeps_over_adacs_settings():
    assert {p.stem for p in SWEEPS} == {"grid_alpha_beta", "bayes"}
    for path in SWEEPS:
        sweep = load_sweep(path)
        assert sweep["metric"] == {"name": "val/dice", "goal": "maximize"}
        assert "${args_no_hyphens}" in sweep["command"] and sweep["program"] == "adacs-train"
        assert sweep["project"] == "adacs-lightning" and "${program}" in sweep["command"]
        assert all(name.startswith("method.") for name in sweep["parameters"])
    grid = load_sweep(SWEEPS[[p.stem for p in SWEEPS].index("grid_alpha_beta")])
    assignments = list(parameter_sets(grid))
    assert len(assignments) == 9 and assignments[0] == {"method.alpha": 0.01, "method.beta": 0.5}
    assert command_line(grid, assignments[0])[-2:] == ["method.alpha=0.01", "method.beta=0.5"]


def test_sweeps_module_prints_the_path_and_the_commands_as_documented():
    """``python -m adacs_lightning.sweeps`` as docs/experiments.md runs it, in a fresh interpreter."""
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True, timeout=120)
    path = run([sys.executable, "-m", "adacs_lightning.sweeps", "--path", "bayes"]).stdout.strip()
    assert path.endswith("bayes.yaml") and Path(path).is_file()
    commands = run([sys.executable, "-m", "adacs_lightning.sweeps", "grid_alpha_beta"]).stdout.splitlines()
    assert len(commands) == 9 and commands[0].endswith("method.alpha=0.01 method.beta=0.5")


def test_sweep_files_satisfy_wandbs_schema():
    """Validated against the sweep config schema W&B's own sweep package ships (schema.json)."""
    import importlib.util
    import json

    jsonref = pytest.importorskip("jsonref")
    from jsonschema import Draft7Validator

    spec = importlib.util.find_spec("sweeps")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("W&B's sweeps package is not installed (make install adds it)")
    schema_file = Path(next(iter(spec.submodule_search_locations))) / "config" / "schema.json"
    schema = jsonref.replace_refs(json.loads(schema_file.read_text()), proxies=False)
    validator = Draft7Validator(schema)
    for path in SWEEPS:
        errors = [e.message for e in validator.iter_errors(load_sweep(path))]
        assert not errors, f"{path.name}: {errors}"
    assert list(validator.iter_errors({"method": "grid", "parameters": {"x": {"values": [1]}}, "command": 3}))


def test_expansion_matches_the_agents_own_argument_forms():
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    sweep = load_sweep("grid_alpha_beta")
    assignment = {"method.alpha": 0.04, "method.beta": 1.5}
    expected = create_sweep_command_args({"args": {k: {"value": v} for k, v in assignment.items()}})["args_no_hyphens"]
    assert command_line(sweep, assignment) == [
        "/usr/bin/env", "adacs-train", "logger=csv_wandb", "experiment_name=grid_alpha_beta", *expected
    ]  # fmt: skip
    assert expected == ["method.alpha=0.04", "method.beta=1.5"]


def test_bayes_samples_stay_in_their_ranges():
    bayes = load_sweep(SWEEPS[[p.stem for p in SWEEPS].index("bayes")])
    for assignment in parameter_sets(bayes, count=50, seed=1):
        for name, value in assignment.items():
            spec = bayes["parameters"][name]
            assert spec["min"] <= value <= spec["max"]


@pytest.mark.slow
@pytest.mark.parametrize("sweep_path", [p for p in SWEEPS if p.stem == "grid_alpha_beta"], ids=lambda p: p.stem)
def test_first_sweep_command_runs_offline_and_logs_config_scalars_images(tmp_path, sweep_path):
    sweep = load_sweep(sweep_path)
    assignment = next(parameter_sets(sweep, count=1))
    command = command_line(sweep, assignment) + ["debug=tiny", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_command(command, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    records = read_run(run_dir)
    assert {"config", "history", "artifact"} <= records["kinds"]
    assert {"method", "data", "backbone", "alpha", "kappa"} <= records["config"]
    assert {"val/dice", "train/mu_step", "train/m_step", "train/loss_se_step"} <= records["history"]
    assert "val/registration/_type" in records["history"]
    assert list((run_dir / "files" / "media" / "images").rglob("*.png"))
    # sweeps and W&B tables rank by the best val/dice, not the last epoch's
    assert records["summaries"]["val/dice"] == {"max"} and records["summaries"]["val/residual"] == {"min"}
    (metadata,) = records["artifacts"]
    assert metadata["metric"] == "val/dice" and 0.0 <= metadata["value"] <= 1.0 and metadata["selected"] == "best"
    hydra_config = yaml.safe_load((tmp_path / "run" / ".hydra" / "config.yaml").read_text())
    for name, value in assignment.items():
        group, key = name.split(".")
        assert hydra_config[group][key] == pytest.approx(value)


@pytest.mark.slow
def test_optuna_search_runs_trials_and_reports_the_best(tmp_path):
    sweep_dir = f"hydra.sweep.dir={tmp_path / 'sweep'}"
    result = adacs_train("search=optuna", "hydra.sweeper.n_trials=2", "debug=tiny", sweep_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"method.alpha", "method.beta", "method.kappa", "method.lr"}
    assert 0.0 <= results["best_value"] <= 1.0
    assert (tmp_path / "sweep" / "1" / "summary.json").is_file()


@pytest.mark.slow
def test_tensorboard_gets_scalars_images_and_hyperparameters(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = adacs_train("debug=tiny", "logger=csv_tensorboard", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "csv" / "metrics.csv").is_file()
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"val/dice", "val/residual", "train/loss_de_step"} <= set(tags["scalars"])
    assert any(tag.startswith("val/registration") for tag in tags["images"])
    assert len(events.Scalars("val/dice")) == 3  # one per epoch
    assert events.PluginTagToContent("hparams"), "no hyper-parameters logged"
    assert any(tag.startswith("hp/best_val_dice") for tag in tags["scalars"])
