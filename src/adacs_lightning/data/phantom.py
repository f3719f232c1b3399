"""Cardiac-like phantoms deformed from end-diastole (ED) to end-systole (ES), with echo-like nuisances.

A phantom is a left ventricle seen in a long-axis-free, short-axis-like view: a dark
blood pool (label 1) inside a bright, textured myocardium ring (label 2), in textured
tissue. ES is ED pulled back through a smooth contraction field plus a random smooth
field, so an exact correspondence exists and the label maps measure how well it is
recovered. Nuisances are applied to each frame independently afterwards and never to
the labels. Each is modelled on how an echocardiogram is formed:

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
from typing import Literal

import torch
import torch.nn.functional as F

from ..warping import warp_block

Tensor = torch.Tensor

BLOOD, MYOCARDIUM = 1, 2
LABEL_NAMES = {BLOOD: "blood_pool", MYOCARDIUM: "myocardium"}


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


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def smooth_noise(shape: tuple[int, ...], control_points: int, gen: torch.Generator) -> Tensor:
    """A smooth random field ``(1, *shape)`` with zero mean and unit std (about).

    Gaussian noise on a coarse grid of ``control_points`` per axis, interpolated
    (bicubic in 2D, trilinear in 3D): the correlation length is about
    ``size / control_points`` voxels.
    """
    coarse = torch.randn((1, 1) + (control_points,) * len(shape), generator=gen)
    mode = "bicubic" if len(shape) == 2 else "trilinear"
    field = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)[0]
    return (field - field.mean()) / field.std().clamp_min(1e-6)


def _grid(shape: tuple[int, ...]) -> Tensor:
    """Voxel coordinates ``(ndim, *shape)``."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def _blur(image: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(C, *spatial)`` with std ``sigma`` voxels (the imaging PSF)."""
    radius = max(int(math.ceil(3 * sigma)), 1)
    offsets = torch.arange(-radius, radius + 1, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    ndim = image.ndim - 1
    out = image.unsqueeze(0)
    conv = F.conv2d if ndim == 2 else F.conv3d
    for axis in range(ndim):
        shape = [1, 1] + [1] * ndim
        shape[2 + axis] = kernel.numel()
        padding = [0] * ndim
        padding[axis] = radius
        out = conv(F.pad(out, _pad_spec(padding), mode="replicate"), kernel.view(shape))
    return out[0]


def _pad_spec(padding: list[int]) -> list[int]:
    spec: list[int] = []
    for p in reversed(padding):
        spec += [p, p]
    return spec


def subject(shape: tuple[int, ...], gen: torch.Generator) -> dict[str, Tensor]:
    """One heart's anatomy as numbers and fields: centre ``(ndim,)`` and semi-axes ``(ndim,)`` in voxels, the
    border's wobble, the wall's thickness (a fraction of the cavity radius) and the tissue textures."""
    ndim, size = len(shape), float(min(shape))
    centre = torch.tensor(
        [n * _uniform(gen, 0.52, 0.6) if i == 0 else n * _uniform(gen, 0.45, 0.55) for i, n in enumerate(shape)]
    )
    cavity_radius = size * _uniform(gen, 0.14, 0.19)
    radii = torch.tensor([cavity_radius * _uniform(gen, 0.85, 1.15) for _ in range(ndim)])
    wobble = smooth_noise(shape, 6, gen)
    wall = torch.tensor(_uniform(gen, 0.35, 0.5))
    tissue, myocardium = smooth_noise(shape, 12, gen), smooth_noise(shape, 16, gen)
    return dict(centre=centre, radii=radii, cavity_radius=torch.tensor(cavity_radius), wobble=wobble, wall=wall,
                tissue=tissue, myocardium=myocardium)  # fmt: skip


def another_subject(first: dict[str, Tensor], change: float, gen: torch.Generator) -> dict[str, Tensor]:
    """A second heart ``change`` of the way from ``first`` to an independent draw (1: unrelated, as two subjects).

    Numbers are interpolated; the random fields are mixed as ``√(1 − c²)·first + c·fresh``, so their variance stays.
    """
    fresh = subject(tuple(first["wobble"].shape[1:]), gen)
    mixed = {k: (1.0 - change) * first[k] + change * fresh[k] for k in ("centre", "radii", "cavity_radius", "wall")}
    for k in ("wobble", "tissue", "myocardium"):
        mixed[k] = math.sqrt(1.0 - change**2) * first[k] + change * fresh[k]
    return mixed


def render(heart: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The ED frame of a heart from :func:`subject`: ``(image (1, *shape) in [0, 1], label (1, *shape))``.

    An elliptic blood pool with wobbly borders inside a myocardium ring about 40 % as
    thick as the cavity radius, centred near the middle of the field of view.
    """
    shape = tuple(heart["wobble"].shape[1:])
    ndim = len(shape)
    offset = (_grid(shape) - heart["centre"].view(-1, *([1] * ndim))) / heart["radii"].view(-1, *([1] * ndim))
    rho = offset.pow(2).sum(0).sqrt().unsqueeze(0)  # elliptic radius, 1 on the endocardium
    rho = rho * (1.0 + 0.06 * heart["wobble"])
    label = torch.zeros((1, *shape), dtype=torch.long)
    label[rho < 1.0 + float(heart["wall"])] = MYOCARDIUM
    label[rho < 1.0] = BLOOD

    tissue = 0.32 + 0.06 * heart["tissue"]
    myocardium = 0.68 * (1.0 + 0.12 * heart["myocardium"])
    blood = torch.full((1, *shape), 0.06)
    image = torch.where(label == MYOCARDIUM, myocardium, torch.where(label == BLOOD, blood, tissue))
    return _blur(image, 1.0).clamp(0, 1), label


def contraction_field(shape: tuple[int, ...], centre: Tensor, cavity_radius: Tensor, gen: torch.Generator) -> Tensor:
    """ED→ES pull-back displacement ``(ndim, *shape)`` in voxels.

    A radial contraction ``k·d·exp(-|d|²/2R²)`` about the cavity centre (``R`` the cavity
    radius, ``k`` in [0.2, 0.4]: the cavity shrinks and the wall thickens, as in systole),
    plus a random smooth field of about 1.5 voxels and a small translation.
    """
    ndim = len(shape)
    d = _grid(shape) - centre.view(-1, *([1] * ndim))
    envelope = torch.exp(-d.pow(2).sum(0, keepdim=True) / (2 * cavity_radius**2))
    strength = _uniform(gen, 0.2, 0.4)
    field = strength * d * envelope
    random = torch.cat([smooth_noise(shape, 4, gen) for _ in range(ndim)]) * 1.5 * _uniform(gen, 0.5, 1.0)
    translation = torch.tensor([_uniform(gen, -1.5, 1.5) for _ in range(ndim)]).view(-1, *([1] * ndim))
    return field + random + translation


def _apex(shape: tuple[int, ...]) -> Tensor:
    """The probe apex, just above the top centre, as a ``(ndim, 1, …)`` column of voxel coordinates."""
    apex = torch.tensor([-0.02 * shape[0]] + [(n - 1) / 2 for n in shape[1:]])
    return apex.view(-1, *([1] * len(shape)))


def sector_geometry(shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Depth from the probe apex (top centre) and beam angle from the axis, per voxel ``(1, *shape)``."""
    rel = _grid(shape) - _apex(shape)
    depth = rel.pow(2).sum(0, keepdim=True).sqrt()
    lateral = rel[1:].pow(2).sum(0, keepdim=True).sqrt()
    angle = torch.atan2(lateral, rel[:1])  # 0 along the central beam
    if len(shape) == 2:
        angle = angle * torch.sign(rel[1:2] + 1e-6)  # signed in 2D: left and right of the axis
    return depth, angle


def speckle_field(shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
    """A complex Gaussian speckle field ``(2, *shape)`` (real, imaginary): white scatterers through the
    point-spread function (a Gaussian of 0.7 voxels, a grain of about one voxel)."""
    return torch.cat([_blur(torch.randn((1, *shape), generator=gen), 0.7) for _ in range(2)])


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


def _rician(image: Tensor, level: float, gen: torch.Generator) -> Tensor:
    real = image + level * torch.randn(image.shape, generator=gen)
    imag = level * torch.randn(image.shape, generator=gen)
    return torch.sqrt(real**2 + imag**2)


def _drift(image: Tensor, level: float, gen: torch.Generator) -> Tensor:
    gain = 1.0 + level * (0.5 * float(torch.randn((), generator=gen)) + smooth_noise(tuple(image.shape[1:]), 3, gen))
    return image * gain.clamp_min(0.0)


def _shadow_factor(shape: tuple[int, ...], nuisance: Nuisances, gen: torch.Generator) -> Tensor:
    """Transmission ``(1, *shape)`` behind an occluder: a cone of beams from the probe apex,
    attenuated distal to the occluder's depth, with soft edges."""
    ndim = len(shape)
    half_sector = math.radians(nuisance.sector_angle_deg) / 2
    width = math.radians(_uniform(gen, 6.0, 14.0))
    if ndim == 2:
        polar = _uniform(gen, -half_sector + width, half_sector - width)
        beam = torch.tensor([math.cos(polar), math.sin(polar)])
    else:
        polar, azimuth = _uniform(gen, 0.0, half_sector - width), _uniform(gen, -math.pi, math.pi)
        beam = torch.tensor([math.cos(polar), math.sin(polar) * math.cos(azimuth), math.sin(polar) * math.sin(azimuth)])
    rel = _grid(shape) - _apex(shape)
    depth = rel.pow(2).sum(0, keepdim=True).sqrt()
    cosine = (rel * beam.view(-1, *([1] * ndim))).sum(0, keepdim=True) / depth.clamp_min(1e-6)
    across = torch.arccos(cosine.clamp(-1.0, 1.0))  # angle between a voxel's beam and the shadow's axis
    occluder = float(depth.max()) * _uniform(gen, 0.2, 0.45)
    edge = max(2.0, 0.02 * float(depth.max()))
    angular = torch.sigmoid((width - across) / (0.15 * width))
    distal = torch.sigmoid((depth - occluder) / edge)
    return 1.0 - nuisance.shadow_attenuation * angular * distal


#: A target-only change removes correspondence where it reaches half its peak effect.
HALF_MAXIMUM = 0.5


def _dropout(image: Tensor, label: Tensor, gen: torch.Generator, attenuation: float) -> tuple[Tensor, Tensor | None]:
    """Lose the echo over a patch of the lateral wall (beam parallel to the endocardium).

    Returns the image and the drop-out's profile ``(1, *spatial)`` in [0, 1] (None when there is no wall)."""
    coords = _grid(tuple(image.shape[1:]))
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
    radius = float(min(image.shape[1:])) * _uniform(gen, 0.06, 0.1)
    dist2 = (coords - pick.view(-1, *([1] * (image.ndim - 1)))).pow(2).sum(0, keepdim=True)
    profile = torch.exp(-dist2 / (2 * radius**2))
    return image * (1.0 - attenuation * profile), profile


def _extra_structure(image: Tensor, label: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """A small bright blob inside the blood pool (a papillary muscle or trabeculation), in this frame only.

    Returns the image and the blob's profile ``(1, *spatial)`` in [0, 1] (None when there is no cavity)."""
    cavity = torch.nonzero(label[0] == BLOOD)
    if cavity.numel() == 0:
        return image, None
    pick = cavity[int(torch.randint(len(cavity), (), generator=gen))].float()
    radius = float(min(image.shape[1:])) * _uniform(gen, 0.025, 0.045)
    coords = _grid(tuple(image.shape[1:]))
    dist2 = (coords - pick.view(-1, *([1] * (image.ndim - 1)))).pow(2).sum(0, keepdim=True)
    blob = torch.exp(-dist2 / (2 * radius**2))
    return image + (0.6 - image).clamp_min(0) * blob, blob


def _contrast_change(image: Tensor, strength: float, gen: torch.Generator) -> Tensor:
    """``I ↦ I^γ`` with ``log γ`` uniform in ``[−log(1+strength), log(1+strength)]``: monotone, keeps 0 and 1."""
    log_gamma = _uniform(gen, -1.0, 1.0) * math.log1p(strength)
    return image.clamp(0.0, 1.0).pow(math.exp(log_gamma))


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
        image = _drift(image, nuisance.drift, gen) if nuisance.drift > 0 else image
        if is_target:
            if _uniform(gen, 0, 1) < nuisance.shadow_prob:
                shadow = _shadow_factor(shape, nuisance, gen)
                image = image * shadow
                if nuisance.shadow_frames == "target" and nuisance.shadow_attenuation > 0:
                    target_only.append((1.0 - shadow) / nuisance.shadow_attenuation)
            if _uniform(gen, 0, 1) < nuisance.dropout_prob:
                image, profile = _dropout(image, label, gen, nuisance.dropout_attenuation)
                target_only.append(profile if nuisance.dropout_attenuation > 0 else None)
            if _uniform(gen, 0, 1) < nuisance.extra_structure_prob:
                image, profile = _extra_structure(image, label, gen)
                target_only.append(profile)
        if speckle:
            image = apply_speckle(image, fields[is_target], nuisance.noise_level)
        elif nuisance.noise == "rician" and nuisance.noise_level > 0:
            image = _rician(image, nuisance.noise_level, gen)
        frames.append(image)
    if shadow is not None and nuisance.shadow_frames == "both":
        frames[0] = frames[0] * shadow  # the occluder is fixed to the probe: it shadows both frames
    if nuisance.contrast > 0:
        frames[1] = _contrast_change(frames[1], nuisance.contrast, gen)

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
