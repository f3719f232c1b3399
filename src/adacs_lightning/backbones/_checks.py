"""Checks of image sizes against what a network's down-sampling needs."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ConfigError


def check_divisible(size: Sequence[int], divisor: int, setting: str, network: str, reason: str) -> None:
    """Raise :class:`ConfigError` naming ``setting`` unless every spatial size divides by ``divisor``."""
    if any(int(s) % divisor for s in size):
        raise ConfigError(
            setting,
            f"{network} needs image sizes divisible by {divisor} ({reason}), got {tuple(int(s) for s in size)}.",
            f"Resize or pad the images to multiples of {divisor}.",
        )
