"""Where a registration can be trusted: per-pair quality figures, the flag rule, and the maps a result carries.

Everything is computed on the target's grid from the images scaled as the network saw them
(:func:`~adacs_lightning.evaluation.inference.scale_to_unit`), over the target's foreground
(:func:`~adacs_lightning.correspondence.foreground`: voxels where either image holds signal), so that
an empty background neither dilutes nor inflates a figure. No labels are needed.
"""

from __future__ import annotations

import torch
from monai.transforms import DivisiblePad

from ..correspondence import foreground
from ..metrics import jacobian_determinant

Tensor = torch.Tensor

#: The flag rule: a pair is ``review`` when any of these holds, else ``ok`` (docs/interop.md, *Quality flags*).
FLAG_RULE = {
    "folding_pct": (0.1, "more than 0.1 % of the foreground folds (det J ≤ 0)"),
    "det_jacobian_p1": (0.2, "the 1st percentile of det J is below 0.2 (strong local compression)"),
    "residual_ratio": (1.0, "the residual after registration is not below the residual before"),
    "score_low_share": (0.25, "Ŝ < 0.5 on more than a quarter of the foreground (much without correspondence)"),
}
#: The maps ``adacs-register --maps`` can write beside a result.
MAP_NAMES = ("score", "residual", "jacobian")


def quality_figures(ddf: Tensor, source: Tensor, target: Tensor, warped: Tensor, score: Tensor | None = None) -> dict:
    """The quality figures of one registered pair and its flag.

    Args:
        ddf: the displacement ``(ndim, *spatial)`` in voxels.
        source, target, warped: ``(*spatial)`` images on the target's grid, scaled as the network saw them
            (``warped`` is the source warped by ``ddf``).
        score: the run's score map Ŝ ``(*spatial)`` in [0, 1], or None (a run without a scorer).

    Returns a dict of floats: ``folding_pct`` (% of the foreground with det J ≤ 0), ``det_jacobian_min``,
    ``det_jacobian_p1`` (1st percentile), ``residual_before`` / ``residual_after`` (mean squared intensity
    difference over the foreground), with a score ``score_mean`` and ``score_low_share`` (the share with
    Ŝ < 0.5); and ``flag`` (``ok`` or ``review``) with ``flag_reasons`` (:data:`FLAG_RULE`).
    """
    inside = foreground(target[None, None], warped[None, None])[0, 0]
    if not bool(inside.any()):
        inside = torch.ones_like(inside)
    det = jacobian_determinant(ddf[None].float())[0][inside]
    p1 = torch.kthvalue(det.flatten(), max(1, int(0.01 * det.numel()))).values
    before = (source - target).pow(2)[inside].mean()
    after = (warped - target).pow(2)[inside].mean()
    figures = {
        "folding_pct": float(100.0 * (det <= 0).float().mean()),
        "det_jacobian_min": float(det.min()),
        "det_jacobian_p1": float(p1),
        "residual_before": float(before),
        "residual_after": float(after),
    }
    if score is not None:
        figures["score_mean"] = float(score[inside].mean())
        figures["score_low_share"] = float((score[inside] < 0.5).float().mean())
    reasons = flag_reasons(figures)
    return {**figures, "flag": "review" if reasons else "ok", "flag_reasons": "; ".join(reasons)}


def flag_reasons(figures: dict) -> list[str]:
    """The parts of :data:`FLAG_RULE` a pair's figures break (none: ``ok``)."""
    broken = {
        "folding_pct": figures["folding_pct"] > FLAG_RULE["folding_pct"][0],
        "det_jacobian_p1": figures["det_jacobian_p1"] < FLAG_RULE["det_jacobian_p1"][0],
        "residual_ratio": figures["residual_after"] >= FLAG_RULE["residual_ratio"][0] * figures["residual_before"],
        "score_low_share": figures.get("score_low_share", 0.0) > FLAG_RULE["score_low_share"][0],
    }
    return [FLAG_RULE[name][1] for name, fails in broken.items() if fails]


@torch.no_grad()
def score_on_grid(method, target: Tensor, warped: Tensor, divisible: int = 16) -> Tensor:
    """The run's score map Ŝ ``(*spatial)`` of ``target`` (and ``warped``, for a scorer that sees the pair).

    The images ``(*spatial)`` are zero-padded symmetrically to a multiple of ``divisible`` for the scorer's
    U-Net, as the network's input is, and the map cropped back.
    """
    pad = DivisiblePad(k=max(divisible, 1), mode="constant")
    padded = [torch.as_tensor(pad(image[None]))[None].float() for image in (target, warped)]
    device = next(method.parameters()).device
    scorer = method.scorer
    was_training = scorer.training
    scorer.eval()
    score = method.weight_map(padded[0].to(device), None, padded[1].to(device))
    scorer.train(was_training)
    crop = tuple(slice((p - n) // 2, (p - n) // 2 + n) for p, n in zip(padded[0].shape[2:], target.shape))
    return score[(0, 0, *crop)].float().cpu()


def warp_image(image: Tensor, ddf: Tensor) -> Tensor:
    """``image`` ``(*spatial)`` warped by ``ddf`` ``(ndim, *spatial)`` voxels (bilinear, border), on the same grid."""
    from ..warping import warp_block

    return warp_block("bilinear", "border")(image[None, None].float(), ddf[None].float())[0, 0]
