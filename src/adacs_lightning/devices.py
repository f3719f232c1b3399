"""The device a console tool runs on, from its ``--device`` setting."""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ConfigError("device", f"'{device}' is not a device ({error}).", "Use auto, cpu or cuda.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA is not available on this machine.", "Use --device cpu.")
    return resolved
