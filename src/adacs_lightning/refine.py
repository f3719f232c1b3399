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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import nn

from .choices import REFINE_WEIGHTS
from .losses import DATA_WEIGHTINGS, displacement_data_term, gradient_energy, masked_mean
from .methods.settings import LAM
from .metrics import folding_percentage, jacobian_determinant
from .objective import warped_residual
from .similarity import Similarity
from .warping import warp_block

Tensor = torch.Tensor


@dataclass
class Refinement:
    """What :meth:`Refiner.refine` returns, per pair ``(B,)`` unless stated.

    ``ddf``: the refined displacement ``(B, ndim, *spatial)`` in voxels (the network's where a pair's
    objective did not improve); ``objective_before`` / ``objective_after``: the objective at the
    network's field and at the returned one; ``steps``: iterations until the pair stalled;
    ``folding_before`` / ``folding_after``: % of voxels with ``det J ≤ 0`` inside the mask;
    ``seconds``: wall time of the whole batch.
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
            "seconds": self.seconds,
        }


def per_pair_data_term(residual: Tensor, weight: Tensor | None, mask: Tensor | None, weighting: str) -> Tensor:
    """The data term of each pair ``(B,)``, as :func:`~adacs_lightning.losses.displacement_data_term` weights it."""
    return displacement_data_term(residual, weight, mask, weighting, per_sample=True)


class Refiner:
    """Per-pair optimisation of a displacement with a trained run's objective.

    Args:
        similarity: the run's dissimilarity map ``r``.
        lam: the run's ``λ`` on ``mean‖∇u‖²``.
        scorer: a network ``target → Ŝ`` in [0, 1] that weights the data term (AdaCS's scorer), or None (``Ŝ ≡ 1``).
            A scorer built with ``scorer_input="pair"`` sees the target and the source warped by the network's field.
        weighting: how the map weights the data term (the run's ``data_weighting``: ``normalised``, ``mean``, ``scalar``).
        steps: the most Adam iterations per pair (0 returns the network's field unchanged).
        lr: Adam's learning rate, in voxels (of displacement) per step.
        grid: control-point spacing in voxels: 1 optimises every voxel's displacement, ``k > 1`` (default 4)
            a correction on a grid ``k`` times coarser, interpolated (fewer unknowns, smoother updates;
            ``benchmarks/refine.py`` compares them per second).
        fold_weight, fold_margin: the folding guard ``fold_weight · mean relu(fold_margin − det J)``.
        label_weight: weight of a Dice loss between warped source labels and target labels (with labels given).
        tolerance, patience: a pair stops once its objective has not fallen by ``tolerance`` (relative) in
            ``patience`` steps.
        scorer_input: what the scorer sees, ``"target"`` or ``"pair"`` (the run's setting); None reads the scorer's own.
    """

    def __init__(
        self,
        similarity: Similarity,
        lam: float,
        *,
        scorer: nn.Module | None = None,
        weighting: str = "normalised",
        steps: int = 50,
        lr: float = 0.1,
        grid: int = 4,
        fold_weight: float = 1.0,
        fold_margin: float = 0.1,
        label_weight: float = 0.0,
        tolerance: float = 1e-4,
        patience: int = 10,
        scorer_input: str | None = None,
    ) -> None:
        if steps < 0 or lr <= 0 or grid < 1 or patience < 1:
            raise ValueError(f"need steps ≥ 0, lr > 0, grid ≥ 1, patience ≥ 1; got {steps}, {lr}, {grid}, {patience}")
        if weighting not in DATA_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {DATA_WEIGHTINGS}, got {weighting!r}")
        self.similarity, self.lam, self.scorer, self.weighting = similarity, float(lam), scorer, weighting
        self.scorer_input = scorer_input or getattr(scorer, "scorer_input", "target")
        self.steps, self.lr, self.grid = int(steps), float(lr), int(grid)
        self.fold_weight, self.fold_margin, self.label_weight = (
            float(fold_weight),
            float(fold_margin),
            float(label_weight),
        )
        self.tolerance, self.patience = float(tolerance), int(patience)
        self.warp = warp_block("bilinear", "border")
        self.dice = DiceLoss(include_background=False, reduction="none")

    @classmethod
    def from_module(cls, module: nn.Module, weights: str = "score", **settings) -> Refiner:
        """The objective of a trained method (:class:`~adacs_lightning.methods.RegistrationModule`): its similarity,
        λ, data weighting and label weight, and with ``weights="score"`` its scorer (AdaCS runs only)."""
        if weights not in REFINE_WEIGHTS:
            raise ValueError(f"weights must be one of {REFINE_WEIGHTS}, got {weights!r}")
        hparams = module.hparams
        scorer = getattr(module, "scorer", None) if weights == "score" else None
        if weights == "score" and scorer is None:
            raise ValueError("weights='score' needs a run with a scorer (AdaCS); use weights='none'")
        settings.setdefault("label_weight", float(hparams.get("label_weight", 0.0)))
        return cls(
            module.similarity,
            float(hparams.get("lam", LAM)),
            scorer=scorer,
            weighting=str(hparams.get("data_weighting", "mean")) if scorer is not None else "mean",
            scorer_input=str(hparams.get("scorer_input", "target")),
            **settings,
        )

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

    def objective(
        self,
        moving: Tensor,
        fixed: Tensor,
        ddf: Tensor,
        weight: Tensor | None = None,
        mask: Tensor | None = None,
        labels: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """The objective of each pair ``(B,)`` at displacement ``ddf``: data + λ·smoothness + folding guard [+ labels]."""
        residual = warped_residual(self.similarity, self.warp, moving, fixed, ddf, mask)
        total = per_pair_data_term(residual, weight, mask, self.weighting)
        total = total + self.lam * gradient_energy(ddf, mask, per_sample=True)
        if self.fold_weight > 0:
            shortfall = F.relu(self.fold_margin - jacobian_determinant(ddf)).unsqueeze(1)
            total = total + self.fold_weight * masked_mean(shortfall, mask, per_sample=True)
        if labels is not None and self.label_weight > 0:
            total = total + self.label_weight * self._label_term(ddf, *labels)
        return total

    def _label_term(self, ddf: Tensor, moving_label: Tensor, fixed_label: Tensor) -> Tensor:
        """Dice loss of each pair ``(B,)`` over the labels present in it, renumbered 0…K−1 (label values may be large)."""
        terms = []
        for i in range(ddf.shape[0]):
            values = torch.unique(torch.cat([moving_label[i].flatten(), fixed_label[i].flatten()]))
            moving, fixed = (torch.searchsorted(values, lab[i : i + 1].long()) for lab in (moving_label, fixed_label))
            warped = self.warp(one_hot(moving, len(values)).float(), ddf[i : i + 1])
            terms.append(self.dice(warped, one_hot(fixed, len(values)).float()).mean())
        return torch.stack(terms)

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
            weight = self.weight_map(fixed, self.warp(moving, start))
        labels = (moving_label, fixed_label) if moving_label is not None and fixed_label is not None else None
        coarse = tuple(max(2, -(-n // self.grid)) for n in start.shape[2:]) if self.grid > 1 else start.shape[2:]
        correction = torch.zeros((*start.shape[:2], *coarse), device=start.device, requires_grad=True)
        optimiser = torch.optim.Adam([correction], lr=self.lr)
        batch = start.shape[0]
        before = best = None
        best_correction = correction.detach().clone()
        since_gain = torch.zeros(batch, dtype=torch.long, device=start.device)
        steps = torch.zeros(batch, dtype=torch.long, device=start.device)
        active = torch.ones(batch, dtype=torch.bool, device=start.device)
        for iteration in range(self.steps + 1):
            last = iteration == self.steps
            with torch.set_grad_enabled(not last):
                value = self.objective(moving, fixed, self._field(start, correction), weight, mask, labels)
            with torch.no_grad():
                if before is None:  # the network's field
                    before, best = value.detach().clone(), value.detach().clone()
                else:
                    improved = active & (value < best * (1.0 - self.tolerance))
                    best = torch.where(improved, value, best)
                    keep = improved.view(-1, *[1] * (correction.ndim - 1))
                    best_correction = torch.where(keep, correction.detach(), best_correction)
                    since_gain = torch.where(improved, torch.zeros_like(since_gain), since_gain + active.long())
                    active = active & (since_gain < self.patience)
            if last or not bool(active.any()):
                break
            optimiser.zero_grad(set_to_none=True)
            (value * active).sum().backward()
            optimiser.step()
            with torch.no_grad():
                steps += active.long()
                # A pair that stopped keeps its best correction, whatever Adam's momentum would still do.
                frozen = ~active.view(-1, *[1] * (correction.ndim - 1))
                correction.data = torch.where(frozen, best_correction, correction.detach())
        refined = self._field(start, best_correction).detach()
        return Refinement(
            ddf=refined.to(ddf.dtype),
            objective_before=before.detach(),
            objective_after=best.detach(),
            steps=steps,
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
    ``Refiner(SquaredError(), lam=0.05).refine(moving, fixed, backbone(moving, fixed))``.
    """
    weights = weights or ("score" if getattr(module, "scorer", None) is not None else "none")
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
    "per_pair_data_term",
    "register_refined",
]
