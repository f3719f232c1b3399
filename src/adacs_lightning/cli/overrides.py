"""Lets two spellings of one setting mean the same config node.

Hydra accepts ``+group=option`` only for a group absent from the defaults list and
``group=option`` only for one present in it. adacs-train lists every group in its
defaults (``experiment`` and ``debug`` as null), so ``+group=option`` is rewritten to
``group=option`` before Hydra parses the command line.

Every method's ``similarity`` is the ``similarity`` group's node, so ``method.similarity=lncc``
(and ``method.similarity.window=5``) is rewritten to ``similarity=lncc`` (``similarity.window=5``):
the saved config then names the similarity that was trained, whichever spelling was used.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..configs import default_groups

_GROUP_OVERRIDE = re.compile(r"^\+(?P<group>[A-Za-z_][\w-]*)=(?P<value>.*)$", re.DOTALL)
_METHOD_SIMILARITY = re.compile(r"^(?P<prefix>\+{0,2})method\.similarity(?P<rest>[.=].*)$", re.DOTALL)


def normalise_overrides(overrides: Sequence[str], groups: Iterable[str] | None = None) -> list[str]:
    """``+group=option`` → ``group=option`` for the groups in the defaults list; others unchanged."""
    groups = set(default_groups() if groups is None else groups)
    normalised = []
    for override in overrides:
        spelled = _METHOD_SIMILARITY.match(override)
        if spelled:
            override = f"similarity{spelled['rest']}"
        match = _GROUP_OVERRIDE.match(override)
        if match and match["group"] in groups:
            override = f"{match['group']}={match['value']}"
        normalised.append(override)
    return normalised
