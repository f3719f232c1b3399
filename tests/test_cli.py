"""adacs-train: config composition, both override forms, errors, and end-to-end runs."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from adacs_lightning import AdaCSError, load_backbone
from adacs_lightning.cli.overrides import normalise_overrides
from adacs_lightning.configs import default_groups
from adacs_lightning.training import train

from .helpers.configs import compose_config
from .helpers.training import adacs_train, adacs_train_subprocess


def test_every_group_is_in_the_defaults_list():
    assert default_groups() == {
        "backbone",
        "data",
        "method",
        "similarity",
        "scorer",
        "trainer",
        "logger",
        "experiment",
        "debug",
        "search",
    }


def test_normalise_overrides_only_touches_group_choices():
    groups = {"backbone", "data"}
    assert normalise_overrides(["+backbone=localnet", "+data=synthetic"], groups) == [
        "backbone=localnet",
        "data=synthetic",
    ]
    untouched = ["+data.root=/x", "++seed=1", "+new_key=1", "backbone=voxelmorph", "~logger"]
    assert normalise_overrides(untouched, groups) == untouched


def test_both_override_forms_compose_the_same_config(tmp_path):
    plus = compose_config(["+backbone=localnet", "+data=synthetic", "+method=baseline"], tmp_path)
    plain = compose_config(["backbone=localnet", "data=synthetic", "method=baseline"], tmp_path)
    assert OmegaConf.to_yaml(plus) == OmegaConf.to_yaml(plain)
    assert plain.backbone.net._target_ == "monai.networks.nets.LocalNet"
    assert plain.method.scoring is False


def test_default_config_has_the_paper_settings_where_they_fit(tmp_path):
    cfg = compose_config([], tmp_path)
    assert cfg.method.alpha == 0.02 and cfg.method.beta == 1.5 and cfg.method.gamma == 0.99
    # chosen on validation pairs (docs/results.md): the normalised data term and its best λ
    assert cfg.method.data_weighting == "normalised" and cfg.method.lam == 0.05
    assert compose_config(["method=baseline"], tmp_path).method.lam == cfg.method.lam  # one λ for both
    assert cfg.backbone.spatial_dims == cfg.data.spatial_dims == 2
    paper = compose_config(["experiment=paper"], tmp_path)
    assert paper.method.warmup_epochs == 20 and paper.method.lr == 1e-4 and paper.trainer.max_epochs == 300
    assert paper.method.lam == 0.01 and paper.method.data_weighting == "mean"


def test_train_in_process_writes_checkpoints_metrics_and_summary(tmp_path):
    cfg = compose_config(["debug=tiny"], tmp_path)
    metrics = train(cfg)
    assert 0.0 <= metrics["val/dice"] <= 1.0 and "val/dice_identity" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "checkpoints").glob("best-epoch*.ckpt"))
    rows = list(csv.DictReader((tmp_path / "csv" / "metrics.csv").open()))
    dice = [float(r["val/dice"]) for r in rows if r.get("val/dice")]
    assert len(dice) == 3  # one per epoch
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_checkpoint"].endswith(".ckpt") and summary["epochs"] == 3

    # the checkpoint alone rebuilds the trained backbone, without the scorer
    backbone = load_backbone(tmp_path / "checkpoints" / "last.ckpt")
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    n_saved = sum(v.numel() for k, v in checkpoint["state_dict"].items() if k.startswith("backbone."))
    assert sum(p.numel() for p in backbone.parameters()) == n_saved
    assert any(k.startswith("scorer.") for k in checkpoint["state_dict"])
    moving = torch.rand(1, 1, 32, 32)
    assert backbone(moving, moving).shape == (1, 2, 32, 32)


def test_bf16_mixed_precision_trains_through_all_phases(tmp_path):
    metrics = train(compose_config(["debug=tiny", "trainer.precision=bf16-mixed", "logger=none"], tmp_path))
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("train/loss_de", "train/loss_se", "val/dice"))


def test_load_backbone_errors(tmp_path):
    with pytest.raises(AdaCSError, match="No checkpoint"):
        load_backbone(tmp_path / "missing.ckpt")
    (tmp_path / "bad.ckpt").write_text("not a checkpoint")
    with pytest.raises(AdaCSError, match="could not be read"):
        load_backbone(tmp_path / "bad.ckpt")


@pytest.mark.slow
def test_cli_bare_and_plus_forms_run(tmp_path):
    result = adacs_train_subprocess("debug=tiny", f"hydra.run.dir={tmp_path / 'bare'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "bare" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "bare" / ".hydra" / "config.yaml").is_file()
    assert "Epoch 2: joint phase" in result.stderr + result.stdout
    result = adacs_train(
        "+backbone=localnet", "+data=synthetic", "debug=tiny", f"hydra.run.dir={tmp_path / 'plus'}", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LocalNet" in (tmp_path / "plus" / ".hydra" / "config.yaml").read_text()


@pytest.mark.slow
def test_cli_resume_from_last_checkpoint(tmp_path):
    first = adacs_train("debug=tiny", "trainer.max_epochs=2", f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["epoch"] == 1  # the last epoch, whether or not it was the best
    second = adacs_train(
        "debug=tiny", "trainer.max_epochs=3", f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'b'}", cwd=tmp_path
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Restoring states from the checkpoint" in second.stderr + second.stdout
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["epochs"] == 3


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["backbone=nope"], ["Could not find 'backbone/nope'", "Available options in 'backbone'", "voxelmorph"]),
        (["+data=nope"], ["Could not find 'data/nope'", "synthetic"]),
        (["method.alpha=-1"], ["Setting 'method.alpha'", "non-negative"]),
        (["data=acdc", "data.root=/no/such/folder"], ["Setting 'data.root'", "/no/such/folder", "does not exist"]),
        (["ckpt_path=/no/such.ckpt"], ["Setting 'ckpt_path'", "no checkpoint file"]),
        (["data.image_size=[32]"], ["Setting 'data.image_size'", "needs 2 sizes"]),
        (["method.reference_leak=true"], ["Setting 'method.reference_leak'", "experiment=reference"]),
        (["+method.score_residual=recompute"], ["Setting 'method.score_residual'", "experiment=reference"]),
    ],
)
def test_cli_errors_name_the_setting(tmp_path, args, expected):
    result = adacs_train(*args, "debug=tiny", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_multirun_survives_a_failed_job(tmp_path):
    result = adacs_train("-m", "method.alpha=-1,0.02", "debug=tiny", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Setting 'method.alpha'" in result.stderr
    assert not (tmp_path / "0" / "summary.json").exists()
    assert (tmp_path / "1" / "summary.json").is_file()


def test_every_subpackage_and_config_file_is_installed():
    """The explicit package list and package data of pyproject.toml cover the source tree and every conf/ folder
    (each folder of configs a package of its own, so that setuptools ships it without a warning)."""
    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    root = Path(__file__).parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    source = root / "src"
    packages = {".".join(p.parent.relative_to(source).parts) for p in source.rglob("__init__.py")}
    assert packages <= listed, f"not installed: {sorted(packages - listed)}"
    data = project["tool"]["setuptools"]["package-data"]
    folders = {p.parent.relative_to(root / "conf").parts for p in (root / "conf").rglob("*.yaml")}
    config_packages = {".".join(("adacs_lightning", "conf", *parts)) for parts in folders}
    assert config_packages <= listed, f"config folders not installed: {sorted(config_packages - listed)}"
    assert all(data.get(name) == ["*.yaml"] for name in config_packages), "a config folder ships without its YAML"


@pytest.mark.slow
def test_the_built_wheel_installs_and_trains(tmp_path):
    """``pip wheel .`` builds without a warning of its own; installed (not editable) in a fresh environment, the
    wheel composes ``adacs-train --cfg job`` and trains a tiny run from its own config tree."""
    import subprocess
    import sysconfig
    import venv

    root = Path(__file__).parents[1]
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-v", "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    output = build.stdout + build.stderr
    warnings = [line for line in output.splitlines() if "warning" in line.lower() and "byte-compil" not in line]
    assert not any("absent from the" in w or "deprecated" in w.lower() for w in warnings), warnings
    (wheel,) = tmp_path.glob("adacs_lightning-*.whl")
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    env_python = env_dir / "bin" / "python"
    # The dependencies come from the test's own environment; the package itself only from the wheel.
    site = subprocess.run([str(env_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    train = [str(env_python), "-m", "adacs_lightning.cli.train"]
    where = subprocess.run([str(env_python), "-c", "import adacs_lightning; print(adacs_lightning.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path).stdout  # fmt: skip
    assert where.startswith(site), where
    job = subprocess.run([*train, "--cfg", "job"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert job.returncode == 0 and "_target_: adacs_lightning.AdaCS" in job.stdout, job.stderr[-3000:]
    run = subprocess.run(
        [*train, "debug=tiny", f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=600,
        cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("tool", ["train", "register", "evaluate", "export"])
def test_console_tools_start_without_loading_pytorch(tool):
    """``--help`` and tab completion import the tool's module only: PyTorch loads once a run starts."""
    import subprocess

    code = f"import sys, adacs_lightning.cli.{tool}; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_help_names_the_tool_and_lists_the_groups_without_internal_fragments(capsys, monkeypatch):
    from adacs_lightning.cli import train as train_cli
    from adacs_lightning.cli.groups import GROUPS

    monkeypatch.setattr(sys, "argv", ["adacs-train", "--help"])
    train_cli.main()
    text = capsys.readouterr().out
    assert text.startswith("usage: adacs-train") and "powered by Hydra" not in text
    assert "common" not in text  # data/common, method/common are fragments, not groups
    for group, description, default, _ in GROUPS:
        assert f"  {group} " in text and description in text
        assert default is None or f"{default}*" in text
    assert {g for g, *_ in GROUPS} == default_groups()
