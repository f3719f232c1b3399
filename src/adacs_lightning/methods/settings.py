"""One default per setting, the paper's preset, and the checks every method's settings pass.

The Python classes take their defaults from here; ``conf/method/*.yaml`` writes the same values
out, with a comment each, so that ``adacs-train --cfg job`` and the saved config show them, and
tests/test_defaults.py fails when the two disagree. Values are those validated on the synthetic
benchmark's validation pairs (docs/results.md); where the paper differs, :data:`PAPER` has its value.
"""

from __future__ import annotations

from typing import Any

from ..calibration import CALIBRATIONS, DEAD_ZONE_HALF, DEAD_ZONE_K, TUKEY_C
from ..correspondence import SCORER_INPUTS, SCORER_TARGETS
from ..errors import ConfigError
from ..losses import DATA_WEIGHTINGS
from ..objective import SMOOTHNESS_TARGETS

#: λ of every method: the normalised data term's best on validation pairs (the paper: 0.01).
LAM = 0.05
#: Adam's learning rate of every network, for the short runs this project validates (the paper: 1e-4 over 30,000 steps).
LR = 1e-3
#: Epochs of the plain baseline before a weighting method starts (AdaCS's warm-up A, N_w; the paper: 20).
WARMUP_EPOCHS = 3

#: The paper's settings where they differ from the defaults: ``AdaCS.paper(net)``, ``AdaCS(net, **PAPER)``,
#: and ``experiment=paper``'s method block.
PAPER: dict[str, Any] = {
    "lam": 0.01,
    "data_weighting": "mean",
    "calibration": "fixed",
    "scorer_target": "residual",
    "warmup_epochs": 20,
    "lr": 1e-4,
}


def check_base_settings(lam, label_weight, warmup_epochs, lr, accumulate, smoothness_on) -> None:
    """Reject values no method can use, naming the setting and a usable value."""
    for name, value, usable in (
        ("lam", lam, LAM),
        ("label_weight", label_weight, 0.0),
        ("warmup_epochs", warmup_epochs, 20),
    ):
        if value < 0:
            raise ConfigError(name, f"must be non-negative, got {value}.", f"The default is {usable}.")
    if lr is not None and lr <= 0:
        raise ConfigError("lr", f"must be positive, got {lr}.", f"The default is {LR}.")
    if accumulate < 1:
        raise ConfigError(
            "accumulate_grad_batches", f"must be at least 1, got {accumulate}.", "Use 1 for no accumulation."
        )
    if smoothness_on not in SMOOTHNESS_TARGETS:
        raise ConfigError(
            "smoothness_on",
            f"must be one of {SMOOTHNESS_TARGETS}, got {smoothness_on!r}.",
            "The paper's is 'displacement'.",
        )


def check_adacs_settings(
    alpha, beta, scorer_lr, data_weighting, scorer_target, shift_radius, shift_patch, calibration, kappa
):
    """Reject values AdaCS cannot use, naming the setting and a usable value."""
    for name, value, paper in (("alpha", alpha, 0.02), ("beta", beta, 1.5)):
        if value < 0:
            raise ConfigError(name, f"must be non-negative, got {value}.", f"The paper uses {paper}.")
    if scorer_lr is not None and scorer_lr <= 0:
        raise ConfigError("scorer_lr", f"must be positive, got {scorer_lr}.", "Use null to share lr.")
    choices = (
        ("data_weighting", data_weighting, DATA_WEIGHTINGS, "The paper's is 'mean'."),
        ("scorer_target", scorer_target, SCORER_TARGETS, "The paper's is 'residual'."),
        ("calibration", calibration, CALIBRATIONS, "The paper's is 'fixed'."),
    )
    for name, value, allowed, fix in choices:
        if value not in allowed:
            raise ConfigError(name, f"must be one of {allowed}, got {value!r}.", fix)
    if shift_radius < 1 or shift_patch < 1 or shift_patch % 2 == 0:
        raise ConfigError(
            "shift_radius",
            f"and shift_patch must be a positive radius and an odd patch, got {shift_radius} and {shift_patch}.",
            "The default is shift_radius=2, shift_patch=3.",
        )
    if calibration != "fixed" and kappa == "auto":
        raise ConfigError(
            "kappa",
            f"is 'auto', another calibration of κ, but calibration={calibration!r} sets it.",
            "Give a number or null.",
        )


def check_robust_settings(calibration, tukey_c, dead_zone, scale_momentum, keep_inliers, scorer_input, scorer) -> None:
    """Reject robust-calibration and scorer-input settings AdaCS cannot use, naming the setting and a usable value."""
    if tukey_c <= 0:
        raise ConfigError("tukey_c", f"must be positive, got {tukey_c}.", f"Tukey's is {TUKEY_C}.")
    if len(dead_zone) != 2 or not 0 <= dead_zone[0] < dead_zone[1]:
        raise ConfigError(
            "dead_zone",
            f"must be [k, k_half] with 0 ≤ k < k_half (in units of σ̂), got {list(dead_zone)}.",
            f"The default is [{DEAD_ZONE_K:g}, {DEAD_ZONE_HALF:g}].",
        )
    if not 0 <= scale_momentum < 1:
        raise ConfigError("scale_momentum", f"must lie in [0, 1), got {scale_momentum}.", "0 fixes the scale.")
    if keep_inliers and calibration != "dead_zone":
        raise ConfigError(
            "keep_inliers",
            f"needs a dead zone to keep, but calibration is {calibration!r}.",
            "Use calibration=dead_zone.",
        )
    if scorer_input not in SCORER_INPUTS:
        raise ConfigError(
            "scorer_input", f"must be one of {SCORER_INPUTS}, got {scorer_input!r}.", "The paper's is 'target'."
        )
    sees = getattr(scorer, "scorer_input", None)
    if scorer is not None and sees is not None and sees != scorer_input:
        raise ConfigError(
            "scorer_input",
            f"is {scorer_input!r}, but the scorer given was built for {sees!r}.",
            f"Build the scorer with scorer_input={scorer_input!r} (the scorer configs follow method.scorer_input).",
        )
