"""Echo-like nuisances of the phantoms, applied to each frame independently and never to the labels.

Each is modelled on how an echocardiogram is formed:

* speckle: fully developed speckle is the magnitude of a complex Gaussian field, the
  interference of the tissue's scatterers seen through the point-spread function (Rayleigh,
  multiplicative). The scatterers belong to the tissue, so the ES pattern is the ED pattern
  carried by the motion, partly replaced by a fresh one (``speckle_correlation``: in-plane
  strain and out-of-plane motion bring other scatterers into the resolution cell; the
  Lagrangian speckle model of Maurice & Bertrand, IEEE TMI 1999; docs/data.md). 0 gives
  independent speckle in each frame. ``noise="rician"`` instead adds complex Gaussian noise
  and takes the magnitude, as in magnitude MRI;
* intensity drift: a smooth multiplicative gain field and a global gain change between
  frames (time-gain compensation, probe contact);
* acoustic shadow: everything distal to an occluder (a rib, a calcification) along a
  cone of beams loses most of its signal; the occluder is fixed to the probe, so by
  default the shadow darkens both frames at the same place while the heart moves;
* drop-out (target only): a patch of the lateral wall, where the beam runs parallel to
  the endocardium, returns almost no echo;
* a structure present in the target only (a papillary muscle or trabeculation moving
  into the imaged plane);
* a contrast change (target only, off by default): a smooth monotone remapping of the
  target's intensities, ``I ↦ I^γ`` with ``log γ`` uniform in ``±log(1 + contrast)``, as a
  change of gain, dynamic range or grey map between acquisitions (or MR sequences) does;
* the field of view: a sector from the probe apex at the top; outside it the image is 0.

Shapes are ``(1, *spatial)`` (channel first) unless stated; intensities lie in [0, 1]; every
function takes a ``torch.Generator`` and is deterministic given its state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..warping import warp_block
from .anatomy import BLOOD, MYOCARDIUM, blur, smooth_noise, uniform, voxel_grid

Tensor = torch.Tensor


@dataclass
class Nuisances:
    """Strengths of the nuisances; 0 (or ``noise="none"``, ``fov=False``) turns one off.

    Args:
        noise: ``"speckle"`` (multiplicative Rayleigh, echo), ``"rician"`` (MRI) or ``"none"``.
        noise_level: speckle: fraction of the signal that is speckle-modulated; rician: noise std.
        speckle_correlation: correlation of the target's speckle field with the source's carried by
            the motion, in [0, 1]: 1 tissue-bound speckle that only moves, 0 independent speckle.
        drift: amplitude of the smooth multiplicative gain change between the two frames.
        shadow_prob: probability of an acoustic shadow.
        shadow_frames: ``"both"``: the occluder (a rib) is fixed to the probe, so the same
            shadow darkens both frames while the heart moves under it; ``"target"``: the
            target alone is shadowed (a shadow from one acquisition only).
        shadow_attenuation: fraction of the signal lost inside the shadow.
        dropout_prob: probability that the target has a lateral-wall drop-out.
        dropout_attenuation: fraction of the signal lost at the drop-out's centre.
        extra_structure_prob: probability of a bright structure present in the target only.
        contrast: strength of a monotone intensity remapping of the target, ``I^γ`` with
            ``γ ∈ [1/(1+contrast), 1+contrast]`` (log-uniform); 0 turns it off.
        fov: mask both frames with an ultrasound sector and return the mask.
        sector_angle_deg: full opening angle of the sector.
        other_subject: how far the target's anatomy departs from the source's beyond the motion, in [0, 1]:
            0 the same heart (one subject's two frames); 1 an independent heart (shape, size, wall and
            texture of another subject), as inter-subject registration sees: differences no smooth
            deformation removes, with no voxel marked as lacking correspondence.
    """

    noise: Literal["speckle", "rician", "none"] = "speckle"
    noise_level: float = 0.5
    speckle_correlation: float = 0.5
    drift: float = 0.15
    shadow_prob: float = 0.5
    shadow_frames: Literal["both", "target"] = "both"
    shadow_attenuation: float = 0.85
    dropout_prob: float = 0.5
    dropout_attenuation: float = 0.8
    extra_structure_prob: float = 0.3
    contrast: float = 0.0
    fov: bool = True
    sector_angle_deg: float = 80.0
    other_subject: float = 0.0

    def __post_init__(self) -> None:
        if self.shadow_frames not in ("both", "target"):
            raise ValueError(f"shadow_frames must be 'both' or 'target', got {self.shadow_frames!r}")
        if self.noise not in ("speckle", "rician", "none"):
            raise ValueError(f"noise must be 'speckle', 'rician' or 'none', got {self.noise!r}")
        for name in (
            "shadow_prob",
            "dropout_prob",
            "extra_structure_prob",
            "shadow_attenuation",
            "dropout_attenuation",
            "speckle_correlation",
            "other_subject",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        for name in ("noise_level", "drift", "contrast"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if not 0 < self.sector_angle_deg <= 180:
            raise ValueError(f"sector_angle_deg must lie in (0, 180], got {self.sector_angle_deg}")


def _apex(shape: tuple[int, ...]) -> Tensor:
    """The probe apex, just above the top centre, as a ``(ndim, 1, …)`` column of voxel coordinates."""
    apex = torch.tensor([-0.02 * shape[0]] + [(n - 1) / 2 for n in shape[1:]])
    return apex.view(-1, *([1] * len(shape)))


def sector_geometry(shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Depth from the probe apex (top centre) and beam angle from the axis, per voxel ``(1, *shape)``."""
    rel = voxel_grid(shape) - _apex(shape)
    depth = rel.pow(2).sum(0, keepdim=True).sqrt()
    lateral = rel[1:].pow(2).sum(0, keepdim=True).sqrt()
    angle = torch.atan2(lateral, rel[:1])  # 0 along the central beam
    if len(shape) == 2:
        angle = angle * torch.sign(rel[1:2] + 1e-6)  # signed in 2D: left and right of the axis
    return depth, angle


def speckle_field(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """A complex Gaussian speckle field ``(2, *shape)`` (real, imaginary): white scatterers through the
    point-spread function (a Gaussian of 0.7 voxels, a grain of about one voxel)."""
    return torch.cat([blur(torch.randn((1, *shape), generator=gen), 0.7) for _ in range(2)])


def moved_speckle_field(field: Tensor, ddf: Tensor, correlation: float, gen: torch.Generator) -> Tensor:
    """The speckle field of the next frame: ``ρ·field∘(x + ddf) + √(1 − ρ²)·fresh``.

    ``field`` ``(2, *spatial)`` is carried by the tissue's pull-back displacement ``ddf`` (the same
    that maps the source frame onto the target); a fresh field of equal variance replaces the
    share of scatterers that left the resolution cell, so the two frames' fields correlate by
    ``ρ = correlation``.
    """
    carried = warp_block("bilinear", "border")(field[None], ddf[None])[0]
    # Interpolation between voxels smooths the carried field: restore its variance, so that the
    # mixture correlates with it by ρ and keeps the fresh field's statistics.
    carried = carried * (field.std() / carried.std().clamp_min(1e-12))
    if correlation >= 1.0:
        return carried
    fresh = speckle_field(tuple(field.shape[1:]), gen)
    return correlation * carried + math.sqrt(1.0 - correlation**2) * fresh


def apply_speckle(image: Tensor, field: Tensor, level: float) -> Tensor:
    """Multiplicative Rayleigh speckle of unit mean: ``image·(1 − level + level·|field|/mean|field|)``."""
    magnitude = field.pow(2).sum(0, keepdim=True).sqrt()
    return image * (1.0 - level + level * magnitude / magnitude.mean())


def rician(image: Tensor, level: float, gen: torch.Generator) -> Tensor:
    real = image + level * torch.randn(image.shape, generator=gen)
    imag = level * torch.randn(image.shape, generator=gen)
    return torch.sqrt(real**2 + imag**2)


def drift(image: Tensor, level: float, gen: torch.Generator) -> Tensor:
    gain = 1.0 + level * (0.5 * float(torch.randn((), generator=gen)) + smooth_noise(tuple(image.shape[1:]), 3, gen))
    return image * gain.clamp_min(0.0)


def shadow_factor(shape: tuple[int, ...], nuisance: Nuisances, gen: torch.Generator) -> Tensor:
    """Transmission ``(1, *shape)`` behind an occluder: a cone of beams from the probe apex,
    attenuated distal to the occluder's depth, with soft edges."""
    ndim = len(shape)
    half_sector = math.radians(nuisance.sector_angle_deg) / 2
    width = math.radians(uniform(gen, 6.0, 14.0))
    if ndim == 2:
        polar = uniform(gen, -half_sector + width, half_sector - width)
        beam = torch.tensor([math.cos(polar), math.sin(polar)])
    else:
        polar, azimuth = uniform(gen, 0.0, half_sector - width), uniform(gen, -math.pi, math.pi)
        beam = torch.tensor([math.cos(polar), math.sin(polar) * math.cos(azimuth), math.sin(polar) * math.sin(azimuth)])
    rel = voxel_grid(shape) - _apex(shape)
    depth = rel.pow(2).sum(0, keepdim=True).sqrt()
    cosine = (rel * beam.view(-1, *([1] * ndim))).sum(0, keepdim=True) / depth.clamp_min(1e-6)
    across = torch.arccos(cosine.clamp(-1.0, 1.0))  # angle between a voxel's beam and the shadow's axis
    occluder = float(depth.max()) * uniform(gen, 0.2, 0.45)
    edge = max(2.0, 0.02 * float(depth.max()))
    angular = torch.sigmoid((width - across) / (0.15 * width))
    distal = torch.sigmoid((depth - occluder) / edge)
    return 1.0 - nuisance.shadow_attenuation * angular * distal


def dropout(image: Tensor, label: Tensor, gen: torch.Generator, attenuation: float) -> tuple[Tensor, Tensor | None]:
    """Lose the echo over a patch of the lateral wall (beam parallel to the endocardium).

    Returns the image and the drop-out's profile ``(1, *spatial)`` in [0, 1] (None when there is no wall)."""
    coords = voxel_grid(tuple(image.shape[1:]))
    wall = label[0] == MYOCARDIUM
    if not bool(wall.any()):
        return image, None
    lateral_axis = coords[1]
    wall_lateral = lateral_axis[wall]
    centre_lateral = wall_lateral.mean()
    spread = (wall_lateral - centre_lateral).abs()
    candidates = torch.nonzero(wall & ((lateral_axis - centre_lateral).abs() > 0.6 * spread.max()))
    if candidates.numel() == 0:
        candidates = torch.nonzero(wall)
    pick = candidates[int(torch.randint(len(candidates), (), generator=gen))].float()
    radius = float(min(image.shape[1:])) * uniform(gen, 0.06, 0.1)
    dist2 = (coords - pick.view(-1, *([1] * (image.ndim - 1)))).pow(2).sum(0, keepdim=True)
    profile = torch.exp(-dist2 / (2 * radius**2))
    return image * (1.0 - attenuation * profile), profile


def extra_structure(image: Tensor, label: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """A small bright blob inside the blood pool (a papillary muscle or trabeculation), in this frame only.

    Returns the image and the blob's profile ``(1, *spatial)`` in [0, 1] (None when there is no cavity)."""
    cavity = torch.nonzero(label[0] == BLOOD)
    if cavity.numel() == 0:
        return image, None
    pick = cavity[int(torch.randint(len(cavity), (), generator=gen))].float()
    radius = float(min(image.shape[1:])) * uniform(gen, 0.025, 0.045)
    coords = voxel_grid(tuple(image.shape[1:]))
    dist2 = (coords - pick.view(-1, *([1] * (image.ndim - 1)))).pow(2).sum(0, keepdim=True)
    blob = torch.exp(-dist2 / (2 * radius**2))
    return image + (0.6 - image).clamp_min(0) * blob, blob


def contrast_change(image: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """``I ↦ I^γ`` with ``log γ`` uniform in ``[−log(1+strength), log(1+strength)]``: monotone, keeps 0 and 1."""
    log_gamma = uniform(gen, -1.0, 1.0) * math.log1p(strength)
    return image.clamp(0.0, 1.0).pow(math.exp(log_gamma))
