"""Per-case rows → CSV files and Markdown tables."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path, columns: Sequence[str] | None = None) -> Path:
    """Write ``rows`` (dicts) to ``path``; floats as written by ``repr``.

    ``columns`` is the header (written even without rows); by default the rows' keys in order of
    first appearance.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; ``|`` inside cells is escaped."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_mean_std(mean: float, std: float, scale: float = 1.0, digits: int = 2) -> str:
    """``"mean ± std"`` (each times ``scale``); ``–`` for NaN; the std left out when undefined."""
    if not math.isfinite(mean):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if math.isfinite(std) else text


def format_p(p: float) -> str:
    """A p-value in three significant digits, ``< 1e-4`` below that; ``–`` for NaN."""
    if not math.isfinite(p):
        return "–"
    return "< 1e-4" if p < 1e-4 else f"{p:.3g}"
