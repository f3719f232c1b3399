"""Lets ``+group=option`` and ``group=option`` mean the same for every config group.

Hydra accepts ``+group=option`` only for a group absent from the defaults list and
``group=option`` only for one present in it. adacs-train lists every group in its
defaults (``experiment`` and ``debug`` as null), so ``+group=option`` is rewritten to
``group=option`` before Hydra parses the command line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..configs import default_groups

_GROUP_OVERRIDE = re.compile(r"^\+(?P<group>[A-Za-z_][\w-]*)=(?P<value>.*)$", re.DOTALL)


def normalise_overrides(overrides: Sequence[str], groups: Iterable[str] | None = None) -> list[str]:
    """``+group=option`` → ``group=option`` for the groups in the defaults list; others unchanged."""
    groups = set(default_groups() if groups is None else groups)
    normalised = []
    for override in overrides:
        match = _GROUP_OVERRIDE.match(override)
        if match and match["group"] in groups:
            override = f"{match['group']}={match['value']}"
        normalised.append(override)
    return normalised
