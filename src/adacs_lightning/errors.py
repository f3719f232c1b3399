"""Errors that reach users, each saying what was wrong and what to do."""

from __future__ import annotations


class AdaCSError(Exception):
    """An error meant for the user: the CLI prints its message without a traceback."""


class ConfigError(AdaCSError, ValueError):
    """A setting has a value the product cannot use."""

    def __init__(self, setting: str, problem: str, fix: str = "") -> None:
        self.setting, self.problem, self.fix = setting, problem, fix
        super().__init__(f"Setting '{setting}': {problem} {fix}".rstrip())


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
