"""Cardiac-like phantoms deformed from end-diastole (ED) to end-systole (ES), with echo-like nuisances.

A phantom is a left ventricle seen in a long-axis-free, short-axis-like view: a dark
blood pool (label 1) inside a bright, textured myocardium ring (label 2), in textured
tissue (:mod:`.anatomy`). ES is ED pulled back through a smooth contraction field plus a
random smooth field, so an exact correspondence exists and the label maps measure how well
it is recovered. Nuisances (:mod:`.nuisances`: speckle or Rician noise, intensity drift, an
acoustic shadow, a drop-out, a target-only structure, a contrast change, the sector's field
of view) are applied to each frame independently afterwards and never to the labels.

Each pair also carries where the target has no counterpart in the source (``nocorr``): the
half-maximum footprint of every target-only change (a drop-out, an extra structure, a shadow
with ``shadow_frames="target"``), inside the field of view. A shadow on both frames and the
speckle leave every voxel a counterpart, so they are not in it.

Every function takes a ``torch.Generator`` and is deterministic given its state.
Shapes are ``(1, *spatial)`` (channel first) unless stated; intensities lie in [0, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..warping import warp_block
from .anatomy import BLOOD, LABEL_NAMES, MYOCARDIUM, another_subject, contraction_field, render, subject, uniform
from .nuisances import (
    Nuisances,
    apply_speckle,
    contrast_change,
    drift,
    dropout,
    extra_structure,
    moved_speckle_field,
    rician,
    sector_geometry,
    shadow_factor,
    speckle_field,
)

__all__ = [
    "BLOOD",
    "LABEL_NAMES",
    "MYOCARDIUM",
    "Nuisances",
    "PhantomPair",
    "apply_speckle",
    "make_pair",
    "moved_speckle_field",
    "speckle_field",
]

Tensor = torch.Tensor

#: A target-only change removes correspondence where it reaches half its peak effect.
HALF_MAXIMUM = 0.5


@dataclass
class PhantomPair:
    """One ED→ES pair: ``source`` is ED, ``target`` is ES."""

    source: Tensor  # (1, *spatial) float in [0, 1]
    target: Tensor
    source_label: Tensor  # (1, *spatial) int64: 0 background, 1 blood pool, 2 myocardium
    target_label: Tensor
    mask: Tensor | None  # (1, *spatial) float {0, 1}, the field of view
    ddf: Tensor  # (ndim, *spatial) voxels, the true displacement: target(x) = clean source(x + ddf(x))
    nocorr: Tensor | None = None  # (1, *spatial) float {0, 1}: target voxels without a counterpart in the source


def make_pair(shape: tuple[int, ...], nuisance: Nuisances, gen: torch.Generator) -> PhantomPair:
    """One ED→ES phantom pair of spatial ``shape`` (2D or 3D)."""
    if len(shape) not in (2, 3):
        raise ValueError(f"phantoms are 2D or 3D, got shape {shape}")
    heart = subject(shape, gen)
    ed_image, ed_label = render(heart)
    ddf = contraction_field(shape, heart["centre"], heart["cavity_radius"], gen)
    warp_image = warp_block("bilinear", "border")
    warp_label = warp_block("nearest", "border")
    # The target's heart: the same (a cardiac pair), or another subject's, before the motion.
    es_image, es_label = (
        (ed_image, ed_label)
        if nuisance.other_subject == 0
        else render(another_subject(heart, nuisance.other_subject, gen))
    )
    es_image = warp_image(es_image[None], ddf[None])[0]
    es_label = warp_label(es_label[None].float(), ddf[None])[0].round().long()

    speckle = nuisance.noise == "speckle" and nuisance.noise_level > 0
    fields = []
    if speckle:  # the ED scatterers, and the ES ones: carried by the motion, partly renewed
        fields.append(speckle_field(shape, gen))
        fields.append(moved_speckle_field(fields[0], ddf, nuisance.speckle_correlation, gen))
    frames = []
    shadow = None
    # Profiles in [0, 1] of the target-only changes: where each reaches half its peak, correspondence is lost.
    target_only: list[Tensor | None] = []
    for is_target, (image, label) in enumerate(((ed_image, ed_label), (es_image, es_label))):
        image = drift(image, nuisance.drift, gen) if nuisance.drift > 0 else image
        if is_target:
            if uniform(gen, 0, 1) < nuisance.shadow_prob:
                shadow = shadow_factor(shape, nuisance, gen)
                image = image * shadow
                if nuisance.shadow_frames == "target" and nuisance.shadow_attenuation > 0:
                    target_only.append((1.0 - shadow) / nuisance.shadow_attenuation)
            if uniform(gen, 0, 1) < nuisance.dropout_prob:
                image, profile = dropout(image, label, gen, nuisance.dropout_attenuation)
                target_only.append(profile if nuisance.dropout_attenuation > 0 else None)
            if uniform(gen, 0, 1) < nuisance.extra_structure_prob:
                image, profile = extra_structure(image, label, gen)
                target_only.append(profile)
        if speckle:
            image = apply_speckle(image, fields[is_target], nuisance.noise_level)
        elif nuisance.noise == "rician" and nuisance.noise_level > 0:
            image = rician(image, nuisance.noise_level, gen)
        frames.append(image)
    if shadow is not None and nuisance.shadow_frames == "both":
        frames[0] = frames[0] * shadow  # the occluder is fixed to the probe: it shadows both frames
    if nuisance.contrast > 0:
        frames[1] = contrast_change(frames[1], nuisance.contrast, gen)

    mask = None
    depth, angle = sector_geometry(shape)
    nocorr = torch.zeros((1, *shape))
    for profile in target_only:
        if profile is not None:
            nocorr = torch.maximum(nocorr, (profile >= HALF_MAXIMUM).float())
    if nuisance.fov:
        half = math.radians(nuisance.sector_angle_deg) / 2
        mask = ((angle.abs() <= half) & (depth <= 1.02 * shape[0])).float()
        frames = [f * mask for f in frames]
        nocorr = nocorr * mask
    source, target = (f.clamp(0.0, 1.0) for f in frames)
    return PhantomPair(source, target, ed_label, es_label, mask, ddf, nocorr)
