"""The phantom's heart: anatomy drawn at random, rendered at end-diastole, and its ED→ES motion.

A left ventricle in a short-axis-like view: a dark blood pool (label 1) inside a bright, textured
myocardium ring (label 2), in textured tissue. Positions and lengths are in voxels; images are
``(1, *spatial)`` in [0, 1]; every function takes a ``torch.Generator`` and is deterministic given
its state.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

BLOOD, MYOCARDIUM = 1, 2
LABEL_NAMES = {BLOOD: "blood_pool", MYOCARDIUM: "myocardium"}


def uniform(gen: torch.Generator, low: float, high: float) -> float:
    """One number drawn uniformly from ``[low, high)``."""
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


def voxel_grid(shape: tuple[int, ...]) -> Tensor:
    """Voxel coordinates ``(ndim, *shape)``."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def blur(image: Tensor, sigma: float) -> Tensor:
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
        [n * uniform(gen, 0.52, 0.6) if i == 0 else n * uniform(gen, 0.45, 0.55) for i, n in enumerate(shape)]
    )
    cavity_radius = size * uniform(gen, 0.14, 0.19)
    radii = torch.tensor([cavity_radius * uniform(gen, 0.85, 1.15) for _ in range(ndim)])
    wobble = smooth_noise(shape, 6, gen)
    wall = torch.tensor(uniform(gen, 0.35, 0.5))
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
    offset = (voxel_grid(shape) - heart["centre"].view(-1, *([1] * ndim))) / heart["radii"].view(-1, *([1] * ndim))
    rho = offset.pow(2).sum(0).sqrt().unsqueeze(0)  # elliptic radius, 1 on the endocardium
    rho = rho * (1.0 + 0.06 * heart["wobble"])
    label = torch.zeros((1, *shape), dtype=torch.long)
    label[rho < 1.0 + float(heart["wall"])] = MYOCARDIUM
    label[rho < 1.0] = BLOOD

    tissue = 0.32 + 0.06 * heart["tissue"]
    myocardium = 0.68 * (1.0 + 0.12 * heart["myocardium"])
    blood = torch.full((1, *shape), 0.06)
    image = torch.where(label == MYOCARDIUM, myocardium, torch.where(label == BLOOD, blood, tissue))
    return blur(image, 1.0).clamp(0, 1), label


def contraction_field(shape: tuple[int, ...], centre: Tensor, cavity_radius: Tensor, gen: torch.Generator) -> Tensor:
    """ED→ES pull-back displacement ``(ndim, *shape)`` in voxels.

    A radial contraction ``k·d·exp(-|d|²/2R²)`` about the cavity centre (``R`` the cavity
    radius, ``k`` in [0.2, 0.4]: the cavity shrinks and the wall thickens, as in systole),
    plus a random smooth field of about 1.5 voxels and a small translation.
    """
    ndim = len(shape)
    d = voxel_grid(shape) - centre.view(-1, *([1] * ndim))
    envelope = torch.exp(-d.pow(2).sum(0, keepdim=True) / (2 * cavity_radius**2))
    strength = uniform(gen, 0.2, 0.4)
    field = strength * d * envelope
    random = torch.cat([smooth_noise(shape, 4, gen) for _ in range(ndim)]) * 1.5 * uniform(gen, 0.5, 1.0)
    translation = torch.tensor([uniform(gen, -1.5, 1.5) for _ in range(ndim)]).view(-1, *([1] * ndim))
    return field + random + translation
