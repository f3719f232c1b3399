"""Errors that reach users, each saying what was wrong and what to do."""

from __future__ import annotations


class AdaCSError(Exception):
    """An error meant for the user: the CLI prints its message without a traceback."""


class ConfigError(AdaCSError, ValueError):
    """A setting has a value the product cannot use."""

    def __init__(self, setting: str, problem: str, fix: str = "") -> None:
        self.setting, self.problem, self.fix = setting, problem, fix
        super().__init__(f"Setting '{setting}': {problem} {fix}".rstrip())


class CheckpointWriteError(AdaCSError, OSError):
    """A checkpoint could not be written (a full disk, a quota); the previous file of that name is intact."""


class NonFiniteLossError(AdaCSError, FloatingPointError):
    """A loss term became NaN or infinite; no optimiser step was taken with it."""

    def __init__(self, step: int, epoch: int, phase: str, terms: list[str]) -> None:
        self.step, self.epoch, self.phase, self.terms = step, epoch, phase, terms
        super().__init__(
            f"Non-finite loss at training batch {step} (epoch {epoch}, phase '{phase}'): "
            f"{', '.join(terms)} became NaN or infinite. No optimiser step was taken with it, and the "
            "checkpoints already written (last.ckpt, best) are kept. Common causes: a learning rate too "
            "high, images not scaled to [0, 1], or NaNs in the input data. Resume from last.ckpt with a "
            "lower learning rate, or check the data."
        )


def check_writable(folder, what: str, fix: str = "Choose a folder you can write to, or fix its permissions.") -> None:
    """Raise :class:`AdaCSError` unless files can be created in ``folder`` (a path; it need not exist yet).

    Nothing is created: the nearest existing folder on the way up is tried with a temporary file,
    which catches what permission bits do not show (read-only mounts, immutable folders, root squash).
    A file where a folder is needed is named too. ``what`` names the folder for the user (e.g.
    ``"The run folder (hydra.run.dir)"``).
    """
    import tempfile
    from pathlib import Path

    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AdaCSError(f"{what} '{folder}' cannot be created: '{existing}' is a file, not a folder. {fix}")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".adacs-write-check-"):
            pass
    except OSError as error:
        where = "" if existing == folder else f" (its nearest existing folder, '{existing}')"
        raise AdaCSError(
            f"{what} '{folder}' is not writable{where}: {error.strerror or error}. {fix} Nothing was written."
        ) from None
