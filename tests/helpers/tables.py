"""The CSV files adacs-eval writes (evaluation.tables.write_csv), read back for checks."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV written by ``write_csv``, numbers parsed back to float (empty cells to NaN)."""
    with Path(path).open(newline="") as handle:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _parse(value: str) -> Any:
    if value == "":
        return math.nan
    try:
        return float(value)
    except ValueError:
        return value
