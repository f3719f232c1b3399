"""Register every pair of a CSV in one process: one sub-folder per pair, and the folder's summary tables."""

from __future__ import annotations

import errno
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..data.folder import FolderDataModule
from ..errors import AdaCSError
from ..evaluation.tables import write_csv
from .model import RegistrationModel
from .pair import PairSettings, finish_pair, refine_staged, stage_pair

log = logging.getLogger(__name__)

#: Metrics of the network alone that metrics.csv keeps beside the refined ones (network_<name>).
NETWORK_COLUMNS = ("dice", "hd95", "asd", "folding_pct")


@dataclass
class FolderResult:
    """What :func:`register_folder` wrote: ``reports`` (``quality``, ``metrics``, ``failed`` → CSV paths),
    the pairs registered and listed, the rows skipped with why, and the wall time."""

    reports: dict[str, Path]
    registered: int
    listed: int
    failed: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def register_folder(model: RegistrationModel, settings: PairSettings, csv: Path, out: Path) -> FolderResult:
    """Every row of ``csv`` (as ``data=folder`` reads it), with a progress bar; a bad row is reported and skipped.

    Writes ``<out>/<case>/…`` per row, ``quality.csv`` (every registered pair), ``metrics.csv`` (one row per
    labelled pair) and ``failed.csv`` (the rows that could not be registered, and why). A full disk stops it.
    With a refiner, ``settings.refine_batch`` pairs are staged at a time and refined together.
    """
    catalog = FolderDataModule(str(csv), spatial_dims=model.backbone.spatial_dims).discover()
    failed = [{"case": b.case, "file": b.file, "problem": f"{b.problem} {b.fix}".strip()} for b in catalog.bad]
    metrics, quality, start = [], [], time.perf_counter()
    units = list(catalog.units.values())
    batch = max(1, settings.refine_batch) if model.refiner is not None else 1
    progress = tqdm(total=len(units), desc="Registering", unit="pair", disable=not sys.stderr.isatty())
    for first in range(0, len(units), batch):
        staged = []
        for unit in units[first : first + batch]:
            files = unit.files
            pair = _attempt(failed, [unit], lambda f=files: stage_pair(
                model, settings, Path(f["source"]), Path(f["target"]), _path(f.get("label_source")),
                _path(f.get("label_target")),
            ))  # fmt: skip
            if pair is not None:
                staged.append((unit, pair))
            else:
                progress.update()
        fields = _attempt(failed, [u for u, _ in staged], lambda s=staged: refine_staged(model, [p for _, p in s]))
        for (unit, pair), network_field in zip(staged, fields or []):
            finished = _attempt(failed, [unit], lambda u=unit, p=pair, f=network_field: finish_pair(
                model, settings, p, f, out / u.id, _path(u.files.get("mask"))
            ))  # fmt: skip
            progress.update()
            if finished is None:
                continue
            record = finished.record
            quality.append({"case": unit.id, **record["quality"]})
            if "metrics" in record:
                network = {
                    f"network_{k}": v for k, v in record.get("metrics_network", {}).items() if k in NETWORK_COLUMNS
                }
                metrics.append({"case": unit.id, **record["metrics"], **network, "seconds": record["seconds"]})
        if fields is None:
            progress.update(len(staged))
    progress.close()
    reports = {}
    out.mkdir(parents=True, exist_ok=True)
    if quality:  # every registered pair, labelled or not: sort by flag to see which to check first
        reports["quality"] = write_csv(quality, out / "quality.csv")
    if metrics:
        reports["metrics"] = write_csv(metrics, out / "metrics.csv")
    reports["failed"] = write_csv(failed, out / "failed.csv", ["case", "file", "problem"])
    registered = len(units) - sum(1 for f in failed if f["case"] in catalog.units)
    return FolderResult(reports, registered, len(units) + len(catalog.bad), failed, time.perf_counter() - start)


#: What one pair's files can cause (a label map on another grid, a torn file): the row is skipped.
PAIR_ERRORS = (AdaCSError, ValueError, RuntimeError, OSError)


def _attempt(failed: list[dict], units: list, step):
    """``step()`` for ``units`` (one row, or a batch's refinement), or None with each row listed in ``failed``."""
    try:
        return step()
    except PAIR_ERRORS as error:
        _fail(failed, units, error)
        return None


def _fail(failed: list[dict], units: list, error: Exception) -> None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise error  # with the console's paragraph
    for unit in units:
        failed.append({"case": unit.id, "file": unit.files.get("source", ""), "problem": f"{error}"})
        log.warning("skipped %s: %s", unit.id, error)


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)
