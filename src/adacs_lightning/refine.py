"""Registration-time refinement: a few steps of per-pair optimisation after the network's guess (docs/interop.md).

The network's displacement is the starting point; Adam then lowers the trained run's objective
for each pair — its similarity, its data weighting with AdaCS's score map ``Ŝ(target)`` (or
``Ŝ ≡ 1``), ``λ·mean‖∇u‖²`` on the displacement, an optional label term — plus a folding guard,
inside the field of view. One direction only; a run's velocity penalty (``smoothness_on=velocity``),
bidirectional training or a backbone's own extra loss are not part of it.
The network's weights never change. Pairs of a batch are optimised independently (a sum of
per-pair objectives, Adam elementwise, each pair stopping on its own), so refining a batch gives
what refining each pair alone gives.

The folding guard is a penalty on Jacobian determinants below ``fold_margin``:
``fold_weight · mean relu(fold_margin − det J)``. A diffeomorphic parameterisation (a velocity
integrated by scaling and squaring) would also prevent folding, but changes what is optimised away
from the displacement the network predicts (most backbones here predict it directly), and would cost
its integration steps at every iteration; the penalty keeps the displacement as the variable and is
zero wherever the network's field does not approach folding.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from .choices import REFINE_WEIGHTS
from .errors import AdaCSError
from .losses import DATA_WEIGHTINGS, displacement_data_term, gradient_energy, masked_mean
from .metrics import folding_percentage, jacobian_determinant
from .objective import BackboneObjective, label_dice_loss

Tensor = torch.Tensor


@dataclass
class Refinement:
    """What :meth:`Refiner.refine` returns, per pair ``(B,)`` unless stated.

    ``ddf``: the refined displacement ``(B, ndim, *spatial)`` in voxels (the network's where a pair's
    objective did not improve); ``objective_before`` / ``objective_after``: the objective at the
    network's field and at the returned one; ``steps``: iterations until the pair stalled;
    ``folding_before`` / ``folding_after``: % of voxels with ``det J ≤ 0`` inside the mask;
    ``seconds``: wall time of the whole batch (:meth:`record` gives each pair its share).
    """

    ddf: Tensor
    objective_before: Tensor
    objective_after: Tensor
    steps: Tensor
    folding_before: Tensor
    folding_after: Tensor
    seconds: float = 0.0

    def record(self, index: int = 0) -> dict[str, float]:
        """One pair's numbers as plain floats (for ``registration.json``)."""
        return {
            "objective_before": float(self.objective_before[index]),
            "objective_after": float(self.objective_after[index]),
            "steps": int(self.steps[index]),
            "folding_pct_before": float(self.folding_before[index]),
            "folding_pct_after": float(self.folding_after[index]),
            "seconds": self.seconds / len(self.steps),  # the pair's share of its batch's wall time
            "pairs_in_batch": len(self.steps),
        }


def per_pair_data_term(residual: Tensor, weight: Tensor | None, mask: Tensor | None, weighting: str) -> Tensor:
    """The data term of each pair ``(B,)``, as :func:`~adacs_lightning.losses.displacement_data_term` weights it."""
    return displacement_data_term(residual, weight, mask, weighting, per_sample=True)


@dataclass
class Descent:
    """Adam on a correction, each pair of the batch stopping on its own; what :func:`minimise_per_pair` returns.

    ``correction``: the best correction per pair; ``before`` / ``after``: the objective ``(B,)`` at the zero
    correction and at the best one; ``steps``: iterations each pair took.
    """

    correction: Tensor
    before: Tensor
    after: Tensor
    steps: Tensor


def minimise_per_pair(
    objective: Callable[[Tensor], Tensor],
    shape: tuple[int, ...],
    device: torch.device,
    steps: int,
    lr: float,
    tolerance: float,
    patience: int,
) -> Descent:
    """Minimise ``objective(correction) → (B,)`` over a correction of ``shape`` (starting at 0) with Adam.

    The pairs' objectives are summed (Adam is elementwise, so each pair moves as if alone); a pair stops
    once its objective has not fallen by ``tolerance`` (relative) in ``patience`` steps and keeps its best
    correction, whatever Adam's momentum would still do.
    """
    correction = torch.zeros(shape, device=device, requires_grad=True)
    optimiser = torch.optim.Adam([correction], lr=lr)
    batch, per_pair = shape[0], (-1, *[1] * (len(shape) - 1))
    before = best = None
    best_correction = correction.detach().clone()
    since_gain = torch.zeros(batch, dtype=torch.long, device=device)
    taken = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    for iteration in range(steps + 1):
        last = iteration == steps
        with torch.set_grad_enabled(not last):
            value = objective(correction)
        with torch.no_grad():
            if before is None:  # the zero correction: the network's field
                before, best = value.detach().clone(), value.detach().clone()
            else:
                improved = active & (value < best * (1.0 - tolerance))
                best = torch.where(improved, value, best)
                best_correction = torch.where(improved.view(per_pair), correction.detach(), best_correction)
                since_gain = torch.where(improved, torch.zeros_like(since_gain), since_gain + active.long())
                active = active & (since_gain < patience)
        if last or not bool(active.any()):
            break
        optimiser.zero_grad(set_to_none=True)
        (value * active).sum().backward()
        optimiser.step()
        with torch.no_grad():
            taken += active.long()
            correction.data = torch.where(~active.view(per_pair), best_correction, correction.detach())
    return Descent(best_correction, before.detach(), best.detach(), taken)


class Refiner:
    """Per-pair optimisation of a displacement with a trained run's objective.

    Args:
        objective: the run's :class:`~adacs_lightning.objective.BackboneObjective` (similarity, ``λ`` on
            ``mean‖∇u‖²`` of the displacement, label weight); training and refinement share it.
        scorer: a network ``target → Ŝ`` in [0, 1] that weights the data term (AdaCS's scorer), or None (``Ŝ ≡ 1``).
            A scorer built with ``scorer_input="pair"`` sees the target and the source warped by the network's field.
        weighting: how the map weights the data term (the run's ``data_weighting``: ``normalised``, ``mean``, ``scalar``).
        steps: the most Adam iterations per pair (0 returns the network's field unchanged).
        lr: Adam's learning rate, in voxels (of displacement) per step.
        grid: control-point spacing in voxels: 1 optimises every voxel's displacement, ``k > 1`` (default 4)
            a correction on a grid ``k`` times coarser, interpolated (fewer unknowns, smoother updates;
            ``benchmarks/refine.py`` compares them per second).
        fold_weight, fold_margin: the folding guard ``fold_weight · mean relu(fold_margin − det J)``.
        tolerance, patience: a pair stops once its objective has not fallen by ``tolerance`` (relative) in
            ``patience`` steps.
        scorer_input: what the scorer sees, ``"target"`` or ``"pair"`` (the run's setting); None reads the scorer's own.

    The label term (with labels given) is the objective's, weighted by its ``label_weight``.

    Example::

        >>> import torch
        >>> from adacs_lightning.objective import BackboneObjective
        >>> from adacs_lightning.refine import Refiner
        >>> from adacs_lightning.similarity import SquaredError
        >>> moving, fixed = torch.rand(2, 1, 1, 32, 32).unbind(0)
        >>> refiner = Refiner(BackboneObjective(SquaredError(), lam=0.05), steps=5)
        >>> result = refiner.refine(moving, fixed, torch.zeros(1, 2, 32, 32))
        >>> result.ddf.shape, bool(result.objective_after[0] <= result.objective_before[0])
        (torch.Size([1, 2, 32, 32]), True)
    """

    def __init__(
        self,
        objective: BackboneObjective,
        *,
        scorer: nn.Module | None = None,
        weighting: str = "normalised",
        steps: int = 50,
        lr: float = 0.1,
        grid: int = 4,
        fold_weight: float = 1.0,
        fold_margin: float = 0.1,
        tolerance: float = 1e-4,
        patience: int = 10,
        scorer_input: str | None = None,
    ) -> None:
        if not isinstance(objective, BackboneObjective):
            raise TypeError(
                f"Refiner takes a BackboneObjective, got {type(objective).__name__}: "
                "wrap a similarity as BackboneObjective(similarity, lam)."
            )
        if steps < 0 or lr <= 0 or grid < 1 or patience < 1:
            raise ValueError(f"need steps ≥ 0, lr > 0, grid ≥ 1, patience ≥ 1; got {steps}, {lr}, {grid}, {patience}")
        if weighting not in DATA_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {DATA_WEIGHTINGS}, got {weighting!r}")
        self.objective, self.scorer, self.weighting = objective, scorer, weighting
        self.scorer_input = scorer_input or getattr(scorer, "scorer_input", "target")
        self.steps, self.lr, self.grid = int(steps), float(lr), int(grid)
        self.fold_weight, self.fold_margin = float(fold_weight), float(fold_margin)
        self.tolerance, self.patience = float(tolerance), int(patience)
        self.pair_dice = DiceLoss(include_background=False, reduction="none")

    @classmethod
    def from_module(cls, module: nn.Module, weights: str | None = None, **settings) -> Refiner:
        """The refinement of a trained method (:class:`~adacs_lightning.methods.RegistrationModule`): its objective,
        its data weighting and, with ``weights="score"``, its scorer.

        ``weights`` None: ``"score"`` where the method has a scorer (AdaCS), else ``"none"`` (``Ŝ ≡ 1``). This is
        the one place that rule lives; ``"score"`` for a method without a scorer is an error.
        """
        if weights is not None and weights not in REFINE_WEIGHTS:
            raise ValueError(f"weights must be one of {REFINE_WEIGHTS}, got {weights!r}")
        scorer = getattr(module, "scorer", None)
        weights = weights or ("score" if scorer is not None else "none")
        if weights == "score" and scorer is None:
            name = getattr(module, "method_name", type(module).__name__)
            raise AdaCSError(
                f"Score-weighted refinement needs a run with a scorer (AdaCS); this run trained {name}, which has "
                "none. Refine it with weights 'none' (--refine-weights none), or leave the weights to the default."
            )
        hparams = getattr(module, "hparams", {})
        weighting = str(hparams.get("data_weighting", "mean")) if weights == "score" else "mean"
        return cls(
            module.objective,
            scorer=scorer if weights == "score" else None,
            weighting=weighting,
            scorer_input=str(hparams.get("scorer_input", "target")),
            **settings,
        )

    @property
    def weights(self) -> str:
        """``"score"`` when the data term is weighted by the scorer's map, else ``"none"``."""
        return "score" if self.scorer is not None else "none"

    @property
    def label_weight(self) -> float:
        return self.objective.label_weight

    # ------------------------------------------------------------------ the objective
    def weight_map(self, fixed: Tensor, warped: Tensor | None = None) -> Tensor | None:
        """``Ŝ(fixed)`` ``(B, 1, *spatial)`` (a pair scorer: ``Ŝ(fixed, warped)``), no gradient; None without a scorer."""
        if self.scorer is None:
            return None
        inputs = fixed
        if self.scorer_input == "pair":
            if warped is None:
                raise ValueError("this scorer sees the pair (scorer_input='pair'): pass the warped source")
            inputs = torch.cat([fixed, warped], dim=1)
        was_training = self.scorer.training
        with torch.no_grad():
            weight = self.scorer.eval()(inputs).detach()
        self.scorer.train(was_training)
        return weight

    def objective_per_pair(
        self,
        moving: Tensor,
        fixed: Tensor,
        ddf: Tensor,
        weight: Tensor | None = None,
        mask: Tensor | None = None,
        labels: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The objective of each pair ``(B,)`` at displacement ``ddf``: data + λ·smoothness + folding guard [+ labels]."""
        objective = self.objective
        total = per_pair_data_term(objective.residual(moving, fixed, ddf, mask), weight, mask, self.weighting)
        total = total + objective.lam * gradient_energy(ddf, mask, per_sample=True)
        if self.fold_weight > 0:
            total = total + self.fold_weight * self._fold_guard(ddf, mask)
        if labels is not None and objective.label_weight > 0:
            term = label_dice_loss(self.pair_dice, objective.warp, *labels, ddf, per_sample=True)
            total = total + objective.label_weight * term
        return total

    def _fold_guard(self, ddf: Tensor, mask: Tensor | None) -> Tensor:
        """``mean relu(margin − det J)`` per pair ``(B,)``. Where every voxel's det J is finite and at least the margin
        it is exactly 0 with a zero gradient: the term then leaves the graph, and the backward pass skips the
        determinant (a third of a 3D step)."""
        det = jacobian_determinant(ddf)
        settled = det.detach()
        if not bool((settled < self.fold_margin).any()) and bool(torch.isfinite(settled).all()):
            return ddf.new_zeros(ddf.shape[0])
        return masked_mean(F.relu(self.fold_margin - det).unsqueeze(1), mask, per_sample=True)

    # ------------------------------------------------------------------ optimisation
    def _field(self, start: Tensor, correction: Tensor) -> Tensor:
        if self.grid == 1:
            return start + correction
        mode = "bilinear" if start.ndim == 4 else "trilinear"
        return start + F.interpolate(correction, size=tuple(start.shape[2:]), mode=mode, align_corners=True)

    def refine(
        self,
        moving: Tensor,
        fixed: Tensor,
        ddf: Tensor,
        mask: Tensor | None = None,
        moving_label: Tensor | None = None,
        fixed_label: Tensor | None = None,
    ) -> Refinement:
        """Refine ``ddf`` ``(B, ndim, *spatial)`` (voxels) for ``moving``/``fixed`` ``(B, C, *spatial)`` in [0, 1].

        ``mask`` ``(B, 1, *spatial)`` limits every term to the field of view (e.g. the image inside its
        padding); labels ``(B, 1, *spatial)`` enable the label term.
        """
        start_time = time.perf_counter()
        start = ddf.detach().float()
        moving, fixed = moving.float(), fixed.float()
        with torch.no_grad():
            weight = self.weight_map(fixed, self.objective.warp(moving, start))
        labels = (moving_label, fixed_label) if moving_label is not None and fixed_label is not None else None
        coarse = tuple(max(2, -(-n // self.grid)) for n in start.shape[2:]) if self.grid > 1 else start.shape[2:]

        def objective(correction: Tensor) -> Tensor:
            return self.objective_per_pair(moving, fixed, self._field(start, correction), weight, mask, labels)

        descent = minimise_per_pair(
            objective, (*start.shape[:2], *coarse), start.device, self.steps, self.lr, self.tolerance, self.patience
        )
        refined = self._field(start, descent.correction).detach()
        return Refinement(
            ddf=refined.to(ddf.dtype),
            objective_before=descent.before,
            objective_after=descent.after,
            steps=descent.steps,
            folding_before=folding_percentage(start, mask),
            folding_after=folding_percentage(refined, mask),
            seconds=time.perf_counter() - start_time,
        )


def register_refined(
    module: nn.Module,
    moving: Tensor,
    fixed: Tensor,
    steps: int = 50,
    weights: str | None = None,
    mask: Tensor | None = None,
    **settings,
) -> Refinement:
    """One call on a trained method: its backbone's displacement for ``(moving, fixed)``, refined with its objective.

    ``weights``: ``"score"`` (AdaCS's default), ``"none"`` (``Ŝ ≡ 1``); other ``settings`` go to :class:`Refiner`.
    For a backbone alone, build the objective yourself:
    ``Refiner(BackboneObjective(SquaredError(), lam=0.05)).refine(moving, fixed, backbone(moving, fixed))``.
    """
    refiner = Refiner.from_module(module, weights, steps=steps, **settings)
    was_training = module.backbone.training
    with torch.no_grad():
        ddf = module.backbone.eval()(moving, fixed)
    module.backbone.train(was_training)
    return refiner.refine(moving, fixed, ddf, mask)


__all__ = [
    "REFINE_WEIGHTS",
    "Refinement",
    "Refiner",
    "minimise_per_pair",
    "per_pair_data_term",
    "register_refined",
]
