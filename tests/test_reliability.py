"""Nothing lost, nothing silent: resumes keep their history, bad values name their file, every error is a paragraph."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from adacs_lightning.checkpoint import BACKBONE_CONFIG_KEY
from adacs_lightning.data import DataError, FolderDataModule
from adacs_lightning.errors import ConfigError
from adacs_lightning.training import resume_checkpoint

from .helpers.configs import compose_config
from .helpers.fakes import make_folder, write_nifti
from .helpers.logs import skipped
from .helpers.training import BIN, adacs_train

TINY = ("debug=tiny", "logger=csv")


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def validation_epochs(run: Path) -> list[int]:
    return [int(float(r["epoch"])) for r in rows(run) if r.get("val/dice")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def backbone_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("backbone.")}


# ---------------------------------------------------------------- resume and run folders
@pytest.mark.slow
def test_sigkill_then_resume_keeps_every_earlier_row_once_and_ends_as_an_uninterrupted_run(tmp_path):
    """A real training process is killed with SIGKILL mid-run and resumed into its own folder."""
    args = [*TINY, "trainer.max_epochs=5", "data.train_pairs=48", "data.batch_size=4"]
    reference = tmp_path / "reference"
    assert adacs_train(*args, f"hydra.run.dir={reference}", cwd=tmp_path).returncode == 0

    run = tmp_path / "killed"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "WANDB_MODE": "offline"}
    process = subprocess.Popen(
        [str(BIN / "adacs-train"), *args, f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if last.is_file() and torch.load(last, weights_only=False)["epoch"] >= 1:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = torch.load(last, weights_only=False)["epoch"]
    assert killed_at < 4

    resumed = adacs_train(*args, f"hydra.run.dir={run}", f"ckpt_path={last}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert validation_epochs(run) == [0, 1, 2, 3, 4]  # every epoch's row once, the earlier ones kept
    assert validation_epochs(run) == validation_epochs(reference)
    ours, theirs = (
        backbone_weights(run / "checkpoints" / "last.ckpt"),
        backbone_weights(reference / "checkpoints" / "last.ckpt"),
    )
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)
    assert list((run / ".hydra").glob("before-resume-*/config.yaml"))  # the first run's config kept


@pytest.mark.slow
def test_a_run_folder_that_holds_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    run = tmp_path / "run"
    assert adacs_train(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    before = snapshot(run)
    again = adacs_train(*TINY, "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert again.returncode == 2
    assert "already holds a run" in again.stderr and "ckpt_path=" in again.stderr and "overwrite=true" in again.stderr
    assert snapshot(run) == before  # nothing touched, .hydra/config.yaml included
    replaced = adacs_train(*TINY, "trainer.max_epochs=1", "overwrite=true", f"hydra.run.dir={run}", cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-2000:]


def small_filesystem(path: Path, megabytes: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True
    )
    return result.returncode == 0


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_loadable(tmp_path):
    disk = tmp_path / "disk"
    if not small_filesystem(disk, 12):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount): the full-disk case is not exercised")
    try:
        run = disk / "run"
        first = adacs_train(*TINY, "logger=none", "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=tmp_path)
        assert first.returncode == 0, first.stderr[-2000:]
        last = run / "checkpoints" / "last.ckpt"
        good = last.read_bytes()
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * max(free - 64 * 1024, 0))  # 64 KiB left: less than a checkpoint
        resumed = adacs_train(
            *TINY, "logger=none", "trainer.max_epochs=3", f"ckpt_path={last}", f"hydra.run.dir={run}", cwd=tmp_path
        )
        assert resumed.returncode == 2, resumed.stderr[-2000:]
        message = resumed.stderr
        assert "last.ckpt" in message or "checkpoint" in message
        assert "intact" in message and "Traceback" not in message
        assert last.read_bytes() == good  # the last good checkpoint, untouched and loadable
        assert torch.load(last, weights_only=False)["epoch"] == 0
        assert not list(run.glob("checkpoints/.*.partial"))
    finally:
        # lazy: detaches the file system even while a log handler of the in-process run still holds a file
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)


# ---------------------------------------------------------------- unlabelled pairs
@pytest.mark.slow
def test_unlabelled_pairs_train_with_checkpoints_ranked_by_the_residual(tmp_path):
    csv_path = make_folder(tmp_path / "data", rows=8, shape=(16, 16), formats=(".nii.gz",))
    with csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    unlabelled = tmp_path / "data" / "unlabelled.csv"
    with unlabelled.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["source", "target", "split"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("source", "target", "split")} for r in table)
    run = tmp_path / "run"
    result = adacs_train(
        *TINY, "data=folder", f"data.csv={unlabelled}", "data.image_size=[16,16]", "data.batch_size=2",
        f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (result.stdout + result.stderr).count("checkpoints are ranked by val/residual") == 1
    summary = (run / "summary.json").read_text()
    assert '"ranked_by": "val/residual"' in summary and list((run / "checkpoints").glob("best-*.ckpt"))


# ---------------------------------------------------------------- values checked at load time
def bad_folder(tmp_path: Path, name: str, array: np.ndarray, column: str = "source") -> Path:
    csv_path = make_folder(tmp_path / name, rows=4, shape=(16, 12), formats=(".nii.gz",))
    folder = "labels" if column.endswith("label") else "images"
    which = column.removesuffix("_label")
    write_nifti(tmp_path / name / folder / f"r1_{which}.nii.gz", array, (1.0, 1.0))
    return csv_path


BAD_VALUES = {
    "inf": (
        np.where(np.arange(192).reshape(16, 12) == 5, np.inf, 1.0 + np.arange(192).reshape(16, 12)),
        "source",
        "NaN or infinite",
    ),
    "nan": (
        np.where(np.arange(192).reshape(16, 12) == 7, np.nan, 1.0 + np.arange(192).reshape(16, 12)),
        "target",
        "NaN or infinite",
    ),
    "constant": (np.zeros((16, 12)), "source", "is constant"),
    "empty label": (np.zeros((16, 12)), "source_label", "no label"),
    "float label": (np.full((16, 12), 0.5), "target_label", "non-integer values"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_voxel_values_are_a_named_skip_or_a_strict_stop(tmp_path, case, caplog):
    array, column, problem = BAD_VALUES[case]
    csv_path = bad_folder(tmp_path, "data", array.astype(np.float32), column)
    with skipped(caplog, rf"r1_{column.removesuffix('_label')}\.nii\.gz: .*{problem}"):
        dm = FolderDataModule(str(csv_path), output_dir=str(tmp_path / "run"))
        dm.setup("fit")
    assert "row0002" not in [item["meta"]["case_id"] for item in dm.datasets["train"]]  # r1 is line 3: row0002
    assert problem in (tmp_path / "run" / "skipped_cases.json").read_text()
    with pytest.raises(DataError, match=problem):
        FolderDataModule(str(csv_path), strict=True).setup("fit")


def test_float_stored_integer_labels_are_repaired_with_a_warning(tmp_path):
    label = np.zeros((16, 12), np.float32)
    label[2:8, 2:6] = 1.0 + 1e-5  # float storage noise around the label 1
    csv_path = bad_folder(tmp_path, "data", label, "source_label")
    with pytest.warns(UserWarning, match="rounded to integers"):
        dm = FolderDataModule(str(csv_path), strict=True)
        dm.setup("fit")
    item = next(i for i in dm.datasets["train"] if i["meta"]["case_id"] == "row0002")
    assert set(item["source_label"].unique().tolist()) == {0, 1}


# ---------------------------------------------------------------- the command line's error layer
def fail(tmp_path: Path, *args: str) -> str:
    result = adacs_train(*args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2, (result.stdout + result.stderr)[-3000:]
    message = result.stderr
    assert "Traceback" not in message and message.strip().count("\n") <= 2, message
    return message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["+foo=1"], ["Setting 'foo'", "not a setting of adacs-train"]),
        (["+data.csv=/tmp/x.csv"], ["Setting 'data.csv'", "data=synthetic", "data=folder"]),
        (["data.csv=/tmp/x.csv"], ["Setting 'data.csv'", "data=folder"]),
        (["data.csv=/data/scan (1)/pairs.csv"], ["cannot parse", "quoted", "\"data.csv='/data/scan (1)/pairs.csv'\""]),
        (["data.csv=/data/données/pairs.csv"], ["cannot parse", "quoted"]),
        (["trainer.max_epochs=0"], ["Setting 'trainer.max_epochs'", "at least 1"]),
    ],
)
def test_command_line_mistakes_are_one_paragraph(tmp_path, args, expected):
    message = fail(tmp_path, *args)
    for text in expected:
        assert text in message, message
    assert not (tmp_path / "run").exists()  # stopped before Hydra made the run folder


def test_damaged_and_foreign_checkpoints_are_named(tmp_path):
    run = tmp_path / "first"
    assert (
        adacs_train(*TINY, "logger=none", "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    )
    last = run / "checkpoints" / "last.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    message = fail(tmp_path, *TINY, f"ckpt_path={truncated}")
    assert "truncated.ckpt" in message and "not a readable checkpoint" in message
    message = fail(tmp_path, *TINY, "backbone=localnet", f"ckpt_path={last}")
    assert "holds a 2D Backbone" in message or "holds a 2D voxelmorph" in message, message
    assert "LocalNet" in message or "localnet" in message


def test_unwritable_run_folder_and_checkpoint_folder_that_is_a_file(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    message = fail(tmp_path, *TINY, f"callbacks.checkpoint.dirpath={blocked}")
    assert "is a file, not a folder" in message
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs an ordinary user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        result = adacs_train(*TINY, f"hydra.run.dir={locked / 'run'}", cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr


def test_a_2d_model_on_3d_data_is_explained_by_adacs_eval(tmp_path, capsys):
    from adacs_lightning.cli import evaluate as evaluate_cli

    from .helpers.runs import save_tiny_checkpoint

    checkpoint = tmp_path / "two_d.ckpt"
    save_tiny_checkpoint(checkpoint)
    with pytest.raises(SystemExit) as exit_:
        evaluate_cli.main(
            [
                str(checkpoint),
                "data=synthetic",
                "data.spatial_dims=3",
                "data.image_size=16",
                "data.test_pairs=2",
                "-o",
                str(tmp_path / "eval"),
            ]
        )
    assert exit_.value.code == 2
    message = capsys.readouterr().err
    assert "2D" in message and "3D" in message and "Traceback" not in message, message


def test_resuming_another_wrapped_monai_network_is_named(tmp_path):
    """LocalNet and RegUNet share the adapter's ``_target_``: the wrapped network tells them apart."""
    stored = OmegaConf.to_container(compose_config(["backbone=localnet"], tmp_path).backbone, resolve=True)
    checkpoint = tmp_path / "localnet.ckpt"
    torch.save({"state_dict": {}, BACKBONE_CONFIG_KEY: stored}, checkpoint)
    assert resume_checkpoint(compose_config(["backbone=localnet", f"ckpt_path={checkpoint}"], tmp_path)) is not None
    with pytest.raises(ConfigError, match="holds a 2D LocalNet backbone, but this run builds a 2D RegUNet one"):
        resume_checkpoint(compose_config(["backbone=regunet", f"ckpt_path={checkpoint}"], tmp_path))
