"""The backbone contract: ``(moving, fixed) -> displacement``, and the adapter that brings networks to it.

A backbone maps ``moving`` and ``fixed`` images ``(B, C, *spatial)`` (2D or 3D) to a
dense displacement field ``(B, ndim, *spatial)`` in voxels, channel ``i`` along
spatial axis ``i``, such that ``moving(x + ddf(x))`` matches ``fixed(x)`` (MONAI's
``Warp`` convention). :class:`Backbone` accepts networks that

* take the pair as two arguments ``net(moving, fixed)`` or one concatenated input
  ``net(torch.cat([moving, fixed], 1))`` (MONAI's ``LocalNet``, ``RegUNet``, ``GlobalNet``);
* return the displacement, a tuple whose last element is it (MONAI's ``VoxelMorph``
  returns ``(warped, ddf)``), or a mapping with key ``"ddf"`` and optionally ``"loss"``,
  an extra training loss the network carries (added to ``L_de``);
* predict a stationary velocity field instead (``output="velocity"``), integrated by
  scaling and squaring with MONAI's ``DVF2DDF``, at full or reduced resolution
  (``integration_downsize=2``: VoxelMorph's ``int_downsize``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..warping import integration_block

Tensor = torch.Tensor


@dataclass
class RegistrationOutput:
    """What a training step needs from a backbone call."""

    ddf: Tensor  # (B, ndim, *spatial), voxels
    extra_loss: Tensor | None = None  # scalar, the network's own training loss, if any
    # (B, ndim, *grid): the velocity before integration, on the integration grid (voxels of that
    # grid); None for a network that predicts the displacement directly.
    velocity: Tensor | None = None


def resize_field(field: Tensor, size: tuple[int, ...], factor: float) -> Tensor:
    """A displacement or velocity field ``(B, ndim, *spatial)`` resampled to ``size`` (corners aligned),
    its values multiplied by ``factor`` to convert them to the new grid's voxels."""
    mode = "bilinear" if field.ndim == 4 else "trilinear"
    return F.interpolate(field, size=tuple(size), mode=mode, align_corners=True) * factor


def infer_image_geometry(net: nn.Module) -> tuple[int, int] | None:
    """``(spatial_dims, channels of the first layer's input)`` from the first convolution, or None."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            return 2, module.in_channels
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            return 3, module.in_channels
    return None


def _positional_arity(net: nn.Module) -> int:
    """How many positional arguments ``net.forward`` requires."""
    try:
        params = inspect.signature(net.forward).parameters.values()
    except (TypeError, ValueError):
        return 2
    required = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    variadic = any(p.kind == p.VAR_POSITIONAL for p in params)
    return 2 if variadic else len(required)


class Backbone(nn.Module):
    """Wraps any registration network so that it satisfies the backbone contract.

    Args:
        net: the registration network.
        inputs: ``"pair"`` for ``net(moving, fixed)``, ``"concat"`` for
            ``net(cat([moving, fixed], dim=1))``, ``"auto"`` to read it from the signature
            of ``net.forward`` (one required argument means concatenated).
        output: ``"ddf"`` if the network predicts the displacement, ``"velocity"`` if it
            predicts a stationary velocity field to integrate.
        integration_steps: scaling-and-squaring steps for ``output="velocity"``.
        integration_downsize: integrate on a grid this many times coarser (1: full resolution;
            2: VoxelMorph's ``int_downsize=2``): the velocity is resampled down (values divided by
            it), integrated, and the displacement resampled back (values multiplied by it).
            Spatial sizes must divide by it.
        spatial_dims: 2 or 3; read from the network's first convolution when omitted.
        in_channels: image channels; read from the first convolution when omitted (half its
            input channels when even, as for a concatenated pair; 1 if unknown).

    ``forward(moving, fixed)`` returns the displacement alone: this module is what a
    trained model exports for inference.
    """

    def __init__(
        self,
        net: nn.Module,
        inputs: Literal["auto", "pair", "concat"] = "auto",
        output: Literal["ddf", "velocity"] = "ddf",
        integration_steps: int = 7,
        integration_downsize: int = 1,
        spatial_dims: int | None = None,
        in_channels: int | None = None,
    ) -> None:
        super().__init__()
        if inputs not in ("auto", "pair", "concat"):
            raise ValueError(f"inputs must be 'auto', 'pair' or 'concat', got {inputs!r}")
        if output not in ("ddf", "velocity"):
            raise ValueError(f"output must be 'ddf' or 'velocity', got {output!r}")
        if integration_downsize < 1:
            raise ValueError(f"integration_downsize must be at least 1, got {integration_downsize}")
        self.net = net
        self.concat_inputs = inputs == "concat" or (inputs == "auto" and _positional_arity(net) == 1)
        self.output = output
        self.integrate = integration_block(integration_steps) if output == "velocity" else None
        self.integration_downsize = int(integration_downsize)

        geometry = infer_image_geometry(net)
        if spatial_dims is None:
            if geometry is None:
                raise ValueError(
                    f"Cannot tell whether {type(net).__name__} registers 2D or 3D images (it has no "
                    "convolution to read it from): pass spatial_dims=2 or spatial_dims=3."
                )
            spatial_dims = geometry[0]
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels is None:
            # Networks nearly always see the pair concatenated, inside or outside: an even first
            # layer is read as 2·C channels. A network that encodes each image separately with
            # C = 2, 4, … channels must say so with in_channels.
            first = geometry[1] if geometry is not None else 2
            in_channels = first // 2 if self.concat_inputs or first % 2 == 0 else first
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)

    @property
    def name(self) -> str:
        return type(self.net).__name__

    def _call(self, moving: Tensor, fixed: Tensor) -> tuple[Tensor, Tensor | None]:
        """Run the wrapped network once; returns ``(field, extra loss or None)``."""
        raw = self.net(torch.cat([moving, fixed], dim=1)) if self.concat_inputs else self.net(moving, fixed)
        extra = None
        if isinstance(raw, Mapping):
            if "ddf" not in raw:
                raise TypeError(
                    f"{self.name} returned a mapping without the key 'ddf' (keys: {sorted(raw)}); "
                    "the backbone contract needs the displacement under 'ddf'."
                )
            field, extra = raw["ddf"], raw.get("loss")
        elif isinstance(raw, (tuple, list)):
            field = raw[-1]
        else:
            field = raw
        self._check_field(field, moving)
        return field, extra

    def _check_field(self, field: object, moving: Tensor) -> None:
        expected = (moving.shape[0], self.spatial_dims, *moving.shape[2:])
        if not isinstance(field, Tensor) or tuple(field.shape) != expected:
            got = tuple(field.shape) if isinstance(field, Tensor) else type(field).__name__
            raise ValueError(
                f"{self.name} returned a displacement of shape {got}, but the backbone contract needs "
                f"(batch, ndim, *spatial) = {expected} for inputs of shape {tuple(moving.shape)}. "
                "Check the network's out_channels (it must equal the number of spatial dimensions) "
                "and that it keeps the input's spatial size."
            )

    def _integration_grid(self, field: Tensor) -> Tensor:
        """The velocity on the grid it is integrated on (in that grid's voxels)."""
        k = self.integration_downsize
        if k == 1:
            return field
        full = field.shape[2:]
        if any(s % k for s in full):
            raise ValueError(
                f"{self.name} integrates its velocity on a grid {k}× coarser, so spatial sizes must divide by {k}; "
                f"got {tuple(full)}."
            )
        return resize_field(field, tuple(s // k for s in full), 1.0 / k)

    def _integrated(self, velocity: Tensor, size: tuple[int, ...]) -> Tensor:
        """Scaling and squaring of a velocity on its integration grid; the displacement at ``size``."""
        ddf = self.integrate(velocity)
        return ddf if tuple(ddf.shape[2:]) == size else resize_field(ddf, size, float(self.integration_downsize))

    def _output(self, field: Tensor, extra: Tensor | None) -> RegistrationOutput:
        if self.integrate is None:
            return RegistrationOutput(field, extra)
        velocity = self._integration_grid(field)
        return RegistrationOutput(self._integrated(velocity, tuple(field.shape[2:])), extra, velocity)

    def forward(self, moving: Tensor, fixed: Tensor) -> Tensor:
        """Displacement ``(B, ndim, *spatial)`` in voxels that warps ``moving`` onto ``fixed``."""
        self._check_pair(moving, fixed)
        field, _ = self._call(moving, fixed)
        return self._output(field, None).ddf

    def forward_train(
        self, moving: Tensor, fixed: Tensor, bidirectional: bool = False
    ) -> tuple[RegistrationOutput, RegistrationOutput | None]:
        """The output that warps ``moving`` onto ``fixed`` and, if ``bidirectional``, the one the other way.

        The second displacement warps ``fixed`` onto ``moving``: for a velocity network it
        integrates the negated velocity (VoxelMorph's bidirectional mode, one network call);
        otherwise it is a second call with the images swapped.
        """
        self._check_pair(moving, fixed)
        field, extra = self._call(moving, fixed)
        to_fixed = self._output(field, extra)
        if not bidirectional:
            return to_fixed, None
        if to_fixed.velocity is not None:
            size = tuple(field.shape[2:])
            return to_fixed, RegistrationOutput(self._integrated(-to_fixed.velocity, size), None, -to_fixed.velocity)
        reverse_field, reverse_extra = self._call(fixed, moving)
        return to_fixed, self._output(reverse_field, reverse_extra)

    def _check_pair(self, moving: Tensor, fixed: Tensor) -> None:
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} images must have the same shape"
            )
        if moving.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"{self.name} is set up for {self.spatial_dims}D images (batch, channel, "
                f"{', '.join('xyz'[: self.spatial_dims])}), but got {moving.ndim - 2}D images of shape "
                f"{tuple(moving.shape)}. "
                "Use a backbone and data config with matching spatial_dims."
            )


def as_backbone(net: nn.Module, **adapter_kwargs) -> Backbone:
    """``net`` itself if it already is a :class:`Backbone`, else ``Backbone(net, **adapter_kwargs)``."""
    if isinstance(net, Backbone):
        if adapter_kwargs:
            raise ValueError("net is already a Backbone; pass adapter settings when building it instead")
        return net
    if not isinstance(net, nn.Module):
        raise TypeError(f"a backbone must be a torch.nn.Module, got {type(net).__name__}")
    return Backbone(net, **adapter_kwargs)
