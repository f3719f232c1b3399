"""Checkpoint files: read by one reader, and written atomically (a file is replaced only once its successor is complete)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from .errors import AdaCSError, CheckpointWriteError

__all__ = ["AtomicCheckpointIO", "CheckpointWriteError", "UnreadableCheckpoint", "read_checkpoint"]


class UnreadableCheckpoint(AdaCSError):
    """A file torch cannot read as a checkpoint (truncated, or not a checkpoint at all); ``cause`` is torch's error."""

    def __init__(self, path: str | Path, cause: Exception) -> None:
        self.path, self.cause = path, cause
        super().__init__(f"'{path}' could not be read as a checkpoint ({type(cause).__name__}: {cause}).")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """What a checkpoint file (a ``.ckpt`` or ``backbone.pt``) holds; :class:`UnreadableCheckpoint` if it cannot be read.

    The files hold configs and names beside the weights, so they are unpickled in full
    (``weights_only=False``): read only checkpoints you trust.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # torch raises several types for a damaged file
        raise UnreadableCheckpoint(path, error) from error


def _is_write_failure(error: RuntimeError) -> bool:
    """Whether torch's serialiser failed writing (a full disk, a quota): ``inline_container.cc … unexpected pos``."""
    text = str(error)
    return "inline_container" in text or "unexpected pos" in text or "file write failed" in text


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O, writing next to the destination and renaming.

    The checkpoint goes to a hidden ``.<name>.partial`` file in the destination folder, is flushed
    to disk, and replaces the destination with one atomic rename. A full disk or any other write
    error leaves the previous checkpoint untouched and loadable (Lightning's own writer stages the
    file elsewhere and, across file systems, truncates the old file before copying).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with partial.open("wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)
        except (OSError, RuntimeError) as error:  # torch's writer reports a full disk as a RuntimeError
            written = partial.stat().st_size if partial.exists() else 0
            partial.unlink(missing_ok=True)
            if isinstance(error, RuntimeError) and not _is_write_failure(error):
                raise
            reason = (
                _full_disk(path.parent, error, written)
                or getattr(error, "strerror", None)
                or str(error).splitlines()[0]
            )
            kept = " The previous checkpoint of that name is intact." if path.is_file() else ""
            raise CheckpointWriteError(
                f"Could not write the checkpoint {path} ({reason}).{kept} Free disk space (or "
                f"choose a writable folder), then resume from the last complete checkpoint with ckpt_path=."
            ) from error


def _full_disk(folder: Path, error: BaseException, written: int) -> str | None:
    """ "No space left on the device holding …" when that is why a write failed, else None.

    PyTorch's writer hides ENOSPC behind its own message, so the folder's free space is read after the
    failure: less than what the failed write had put down (at least 1 MiB) counts as full.
    """
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    if getattr(error, "errno", None) != errno.ENOSPC and free >= max(written, 1 << 20):
        return None
    return f"No space left on the device holding {folder}: {free / 2**20:.1f} MiB free"
