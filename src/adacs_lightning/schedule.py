"""The training schedule of AdaCS (docs/method.md, *Schedule*; the paper's Algorithm 1)."""

from __future__ import annotations

import enum


class Phase(str, enum.Enum):
    """Which networks a training step updates."""

    WARMUP_BACKBONE = "warmup_backbone"  # warm-up A: f_θ alone with Ŝ ≡ 1 (the plain baseline)
    WARMUP_SCORER = "warmup_scorer"  # warm-up B: g_φ alone, f_θ frozen
    JOINT = "joint"  # both, every step

    @property
    def index(self) -> int:
        return list(Phase).index(self)


def phase_at(epoch: int, warmup_epochs: int, scoring: bool = True) -> Phase:
    """The phase of epoch ``epoch`` (from 0): A for ``[0, N_w)``, B for ``[N_w, 2N_w)``, joint after.

    Without scoring (the baseline method) every epoch is warm-up A.
    """
    if epoch < 0 or warmup_epochs < 0:
        raise ValueError(f"epoch and warmup_epochs must be non-negative, got {epoch} and {warmup_epochs}")
    if not scoring or epoch < warmup_epochs:
        return Phase.WARMUP_BACKBONE
    if epoch < 2 * warmup_epochs:
        return Phase.WARMUP_SCORER
    return Phase.JOINT
