"""Cases that cannot be used: the error that names the file, and the list of skipped cases."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import AdaCSError

log = logging.getLogger("adacs_lightning")


class DataError(AdaCSError):
    """A data file that cannot be used: ``"<file>: <problem> <fix>"``."""

    def __init__(self, path: str | Path, problem: str, fix: str = "") -> None:
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem} {fix}".rstrip())


class SkippedCaseWarning(UserWarning):
    """Kept so that existing imports and warning filters still load; skipped cases are now logged, not warned."""


@dataclass(frozen=True)
class BadCase:
    """A case left out, with the file at fault, what is wrong and how to fix it."""

    case: str
    file: str
    problem: str
    fix: str

    @classmethod
    def from_error(cls, case: str, error: DataError) -> BadCase:
        return cls(case, error.path, error.problem, error.fix)

    def error(self) -> DataError:
        return DataError(self.file, self.problem, self.fix)


def skip_or_raise(case: str, error: DataError, strict: bool) -> BadCase:
    """Raise ``error`` when ``strict``; otherwise log it (a warning of the ``adacs_lightning`` logger, which no
    warnings filter hides) and return the record of the skipped case."""
    if strict:
        raise error
    log.warning("Skipping case %s: %s (set data.strict=true to stop instead)", case, error)
    return BadCase.from_error(case, error)


def describe(bad: list[BadCase], report: Path | None = None, shown: int = 3) -> str:
    """The first ``shown`` skipped cases with their file and problem, and where the whole list is."""
    listed = "; ".join(f"{b.case}: {b.file}: {b.problem}" for b in bad[:shown])
    more = f"; and {len(bad) - shown} more" if len(bad) > shown else ""
    where = f" (all of them in {report})" if report is not None else ""
    return f"{listed}{more}{where}"


def write_report(folder: str | Path | None, name: str, bad: list[BadCase]) -> Path | None:
    """Write the skipped cases to ``folder/name`` (JSON list, empty when none); returns the path."""
    if bad:
        log.warning("%d case(s) skipped; see %s", len(bad), Path(folder) / name if folder else "the messages above")
    if folder is None:
        return None
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(b) for b in bad], indent=2))
    return path
