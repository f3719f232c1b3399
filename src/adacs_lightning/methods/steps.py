"""Manual optimisation's bookkeeping: batches in, accumulation cycles, optimiser steps (no method logic)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Cycle:
    """Where a micro-batch sits in its gradient-accumulation cycle: ``length`` micro-batches, ``end`` the last."""

    end: bool
    length: int


def cycle_at(batch_idx: int, every: int, num_batches: float) -> Cycle:
    """The cycle of ``batch_idx`` with ``every`` micro-batches per step; a cycle also ends at an epoch's last batch."""
    start = batch_idx - batch_idx % every
    if num_batches == float("inf"):
        return Cycle((batch_idx + 1) % every == 0, every)
    length = min(every, int(num_batches) - start)
    return Cycle(batch_idx + 1 == start + length, length)


def step(optimiser) -> None:
    """One optimiser step, then its gradients cleared."""
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)


def unpack(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(source, target, mask or None)`` from a batch dict, with a clear error for anything else."""
    if not isinstance(batch, Mapping) or "source" not in batch or "target" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"Batches must be dicts with 'source' and 'target' (and optionally 'mask', "
            f"'source_label', 'target_label'); got {keys}."
        )
    source, target = batch["source"], batch["target"]
    if source.shape != target.shape:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    return source, target, batch.get("mask")


def nonzero_labels(label_map: Tensor) -> list[int]:
    """The label values present in ``label_map`` other than 0 (the background)."""
    return [int(v) for v in torch.unique(label_map).tolist() if v != 0]
