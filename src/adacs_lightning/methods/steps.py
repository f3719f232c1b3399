"""Manual optimisation's bookkeeping: batches in, accumulation cycles, optimiser steps (no method logic)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


def unpack(batch: Mapping[str, Any], channels: int | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(source, target, mask or None)`` from a batch dict of images with ``channels`` channels; a clear error otherwise."""
    if not isinstance(batch, Mapping) or "source" not in batch or "target" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise KeyError(
            f"Batches must be dicts with 'source' and 'target' (and optionally 'mask', "
            f"'source_label', 'target_label'); got {keys}."
        )
    source, target = batch["source"], batch["target"]
    if source.shape != target.shape:
        raise ValueError(f"source {tuple(source.shape)} and target {tuple(target.shape)} differ in shape")
    if channels is not None and source.shape[1] != channels:
        raise ValueError(
            f"The images have {source.shape[1]} channel(s), but the backbone and scorer were built for "
            f"{channels}: pass in_channels={source.shape[1]} to the method (or to the backbone's config) to match the data."
        )
    return source, target, batch.get("mask")


def frozen_forward_train(backbone: nn.Module, moving: Tensor, fixed: Tensor, bidirectional: bool):
    """The backbone's training outputs without gradients, in eval mode (a backbone that is not trained now)."""
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        outputs = backbone.forward_train(moving, fixed, bidirectional)
    backbone.train(was_training)
    return outputs


def non_finite(terms: Mapping[str, Tensor], reduce: Callable[[Tensor], Tensor] | None = None) -> list[str]:
    """The names of the terms that are NaN or infinite; ``reduce`` sums the flags over data-parallel ranks."""
    bad = (~torch.isfinite(torch.stack([t.detach().float() for t in terms.values()]))).float()
    if reduce is not None:
        bad = reduce(bad)
    return [name for name, flag in zip(terms, bad.tolist()) if flag]


def eval_labels_of(chosen: Any, datamodule: Any) -> list[int] | None:
    """The label values whose mean Dice is ``val/dice``: ``chosen``, else the datamodule's, else None (every label)."""
    labels = (
        chosen or getattr(datamodule, "eval_labels", None) or sorted(getattr(datamodule, "label_names", None) or {})
    )
    return [int(v) for v in labels] if labels else None
