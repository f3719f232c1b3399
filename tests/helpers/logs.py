"""Reading the product's log in tests: the skipped-case messages go there, not through warnings."""

from __future__ import annotations

import contextlib
import re


@contextlib.contextmanager
def skipped(caplog, match: str | None = None):
    """Collects the "Skipping case" messages of the block (a list of str); with ``match``, one must match it."""
    messages: list[str] = []
    with caplog.at_level("WARNING", logger="adacs_lightning"):
        start = len(caplog.records)
        yield messages
        messages += [r.getMessage() for r in caplog.records[start:] if r.getMessage().startswith("Skipping case")]
    assert messages, "no case was skipped"
    if match is not None:
        assert any(re.search(match, m) for m in messages), messages
