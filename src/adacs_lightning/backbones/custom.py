"""Your own network from a config: ``adacs-train backbone=custom backbone.net._target_=pkg.MyNet``.

In Python no config is needed::

    model = AdaCS(my_net)                                # my_net(moving, fixed) -> displacement
    model = AdaCS(as_backbone(my_net, inputs="concat"))  # my_net(cat([moving, fixed], 1)) -> displacement
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from ..errors import ConfigError
from .adapter import Backbone, as_backbone

_UNSET = (None, "", "???")
_HOW = (
    "Set it to an importable class, e.g. backbone.net._target_=my_package.MyNet, and pass its arguments "
    "with +backbone.net.NAME=VALUE."
)


def custom_backbone(net: Mapping[str, Any] | nn.Module, **adapter_kwargs: Any) -> Backbone:
    """The network that the config ``net`` (``_target_`` + arguments) names, behind the adapter.

    Args:
        net: a Hydra config of any importable ``torch.nn.Module`` (or the module itself).
        adapter_kwargs: :class:`Backbone` settings (``inputs``, ``output``, ``integration_steps``,
            ``spatial_dims``, ``in_channels``).

    Raises:
        ConfigError: ``net._target_`` is unset, cannot be built, or builds no ``nn.Module``.
    """
    if isinstance(net, nn.Module):
        return as_backbone(net, **adapter_kwargs)
    target = net.get("_target_") if isinstance(net, Mapping) else None
    if target in _UNSET:
        raise ConfigError("net._target_", "names no network class.", _HOW)
    try:
        module = instantiate(net, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise ConfigError("net", f"could not build '{target}' ({type(cause).__name__}: {cause}).", _HOW) from cause
    if not isinstance(module, nn.Module):
        raise ConfigError("net._target_", f"'{target}' built a {type(module).__name__}, not a torch.nn.Module.", _HOW)
    return as_backbone(module, **adapter_kwargs)


__all__ = ["custom_backbone"]
