"""Where a run writes: unwritable folders, a full disk and unusable data end in one paragraph, and nothing written is lost."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from adacs_lightning import checkpoint_io
from adacs_lightning.cli import evaluate as evaluate_cli
from adacs_lightning.cli import export as export_cli
from adacs_lightning.cli import register as register_cli
from adacs_lightning.cli.common import console_main
from adacs_lightning.cli.train import disk_full_message
from adacs_lightning.errors import check_writable

from .helpers.fakes import make_folder, write_nifti
from .helpers.runs import make_run_folder, save_tiny_checkpoint
from .helpers.training import adacs_train, adacs_train_subprocess


def _unwritable_folder() -> Path:
    """A folder nobody may create files in, even root: sysfs. Skips where that is not so."""
    folder = Path("/sys/adacs-test-unwritable")
    try:
        with tempfile.NamedTemporaryFile(dir="/sys"):
            pass
    except OSError:
        return folder
    pytest.skip("/sys is writable here: no folder that root cannot write to")


def _one_paragraph(text: str, *expected: str) -> None:
    assert "Traceback" not in text, text[-3000:]
    for piece in expected:
        assert piece in text, (piece, text[-3000:])


def test_check_writable_names_the_folder_and_creates_nothing(tmp_path):
    check_writable(tmp_path / "new" / "deeper", "The run folder")  # the nearest existing folder is writable
    assert not (tmp_path / "new").exists() and list(tmp_path.iterdir()) == []
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(Exception, match=r"The run folder '.*taken/run' cannot be created: '.*taken' is a file"):
        check_writable(tmp_path / "taken" / "run", "The run folder")


def test_an_unwritable_run_folder_stops_before_anything_runs(tmp_path):
    folder = _unwritable_folder() / "run"
    result = adacs_train("debug=tiny", f"hydra.run.dir={folder}", "logger=none", cwd=tmp_path)
    assert result.returncode == 2
    _one_paragraph(result.stderr, "The run folder (hydra.run.dir)", str(folder), "is not writable", "hydra.run.dir=")
    occupied = tmp_path / "notes.txt"
    occupied.write_text("keep me")
    result = adacs_train("debug=tiny", f"hydra.run.dir={occupied / 'run'}", "logger=none", cwd=tmp_path)
    assert result.returncode == 2
    _one_paragraph(result.stderr, f"'{occupied}' is a file, not a folder")
    assert occupied.read_text() == "keep me"


def _cli(main_module, prog: str, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        console_main(prog, main_module.run, argv)
    return exit_.value.code, capsys.readouterr().err


def test_unwritable_outputs_of_register_eval_and_export(tmp_path, capsys):
    unwritable = _unwritable_folder()
    checkpoint = tmp_path / "model.ckpt"
    save_tiny_checkpoint(checkpoint)
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    source = write_nifti(tmp_path / "s.nii.gz", image, (1.0, 1.0))
    target = write_nifti(tmp_path / "t.nii.gz", image, (1.0, 1.0))
    pair = ["--model", str(checkpoint), "--source", str(source), "--target", str(target), "--device", "cpu"]
    status, err = _cli(register_cli, "adacs-register", [*pair, "--out", str(unwritable / "out")], capsys)
    assert status == 2
    _one_paragraph(err, "The output folder (--out)", str(unwritable / "out"), "not writable")
    run = make_run_folder(tmp_path / "run")
    status, err = _cli(evaluate_cli, "adacs-eval", [str(run), "-o", str(unwritable / "report")], capsys)
    assert status == 2
    _one_paragraph(err, "The report folder (-o/--output)", "not writable")
    status, err = _cli(export_cli, "adacs-export", [str(run), "-o", str(unwritable / "net.pt2")], capsys)
    assert status == 2
    _one_paragraph(err, "The folder of -o/--output", "not writable")
    assert list((tmp_path / "run").rglob("evaluation")) == []


def test_a_full_disk_during_training_names_the_intact_checkpoint_and_how_to_resume(tmp_path, monkeypatch):
    """The second checkpoint write fails as torch fails on a full disk; the first stays intact and is named."""
    calls = {"n": 0}
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1408 vs 1302")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "save", save)
    run = tmp_path / "run"
    result = adacs_train("debug=tiny", f"hydra.run.dir={run}", "logger=csv", cwd=tmp_path)
    assert result.returncode == 2
    _one_paragraph(
        result.stderr, "Could not write the checkpoint", "The last complete checkpoint is intact", "ckpt_path="
    )
    named = result.stderr.split("intact: ")[1].split(". Free")[0]
    assert Path(named).is_file() and Path(named).parent == run / "checkpoints"
    assert "state_dict" in torch.load(named, map_location="cpu", weights_only=False)
    assert not list((run / "checkpoints").glob(".*.partial"))


def test_disk_full_message_for_any_write():
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/r/csv/metrics.csv")
    text = disk_full_message(error, None)
    assert text.startswith("Could not write /runs/r/csv/metrics.csv (No space left on device).")
    assert "No checkpoint was complete yet" in text


@pytest.mark.slow
def test_an_all_unusable_folder_names_data_csv_and_the_files_under_any_warnings_filter(tmp_path, monkeypatch):
    csv_path = make_folder(tmp_path / "data", rows=4, formats=(".nii.gz",))
    for image in (tmp_path / "data" / "images").glob("*_source.nii.gz"):
        write_nifti(image, np.full((16, 12), np.nan, np.float32), (1.0, 1.0))
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    run = tmp_path / "run"
    result = adacs_train_subprocess(
        "debug=tiny", "data=folder", f"data.csv={csv_path}", "data.image_size=[16,16]", f"hydra.run.dir={run}",
        "logger=none", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    output = result.stdout + result.stderr
    _one_paragraph(
        output,
        "Setting 'data.csv'",
        "no pair of the 'train' split could be loaded",
        "r0_source.nii.gz",
        "NaN",
        "skipped_cases.json",
    )
    assert "data.root" not in output and "src/adacs_lightning" not in output


def test_a_full_disk_in_a_console_tool_is_one_paragraph(capsys):
    def run(argv):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/out/registered/warped.nii.gz")

    with pytest.raises(SystemExit) as exit_:
        console_main("adacs-register", run, [])
    assert exit_.value.code == 2
    _one_paragraph(capsys.readouterr().err, "Could not write /out/registered/warped.nii.gz (No space left on device)")


def test_a_checkpoint_write_that_fills_the_disk_says_so(tmp_path, monkeypatch):
    """PyTorch's writer hides ENOSPC behind its own words: the folder's free space names the cause."""

    def save(obj, handle, *args, **kwargs):
        handle.write(b"x" * 4096)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1014016 vs 1013904")

    monkeypatch.setattr(checkpoint_io.torch, "save", save)
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda folder: shutil._ntuple_diskusage(10**9, 10**9, 512))
    with pytest.raises(checkpoint_io.CheckpointWriteError, match="No space left on the device holding") as caught:
        checkpoint_io.AtomicCheckpointIO().save_checkpoint({"a": 1}, tmp_path / "last.ckpt")
    assert str(tmp_path) in str(caught.value) and not list(tmp_path.glob(".*.partial"))
