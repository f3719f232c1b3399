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
    With a refiner, pairs are staged until ``settings.refine_batch`` of them or :data:`REFINE_BATCH_VOXELS`
    voxels are reached, and refined together.
    """
    catalog = FolderDataModule(str(csv), spatial_dims=model.backbone.spatial_dims).discover()
    failed = [{"case": b.case, "file": b.file, "problem": f"{b.problem} {b.fix}".strip()} for b in catalog.bad]
    rows = _Rows()
    units = list(catalog.units.values())
    limit = max(1, settings.refine_batch) if model.refiner is not None else 1
    with tqdm(total=len(units), desc="Registering", unit="pair", disable=not sys.stderr.isatty()) as progress:
        staged: list[tuple] = []
        for index, unit in enumerate(units):
            files = unit.files
            pair = _attempt(failed, [unit], lambda f=files: stage_pair(
                model, settings, Path(f["source"]), Path(f["target"]), _path(f.get("label_source")),
                _path(f.get("label_target")),
            ))  # fmt: skip
            if pair is None:
                progress.update()
            else:
                staged.append((unit, pair))
            voxels = sum(p.padded.fixed.numel() for _, p in staged)
            if staged and (len(staged) >= limit or voxels >= REFINE_BATCH_VOXELS or index == len(units) - 1):
                _finish_batch(model, settings, staged, out, failed, rows)
                progress.update(len(staged))
                staged = []
    order = {unit.id: index for index, unit in enumerate(units)}
    failed.sort(key=lambda row: order.get(row["case"], -1))  # the CSV's order; rows refused on discovery first
    reports = {}
    out.mkdir(parents=True, exist_ok=True)
    if rows.quality:  # every registered pair, labelled or not: sort by flag to see which to check first
        reports["quality"] = write_csv(rows.quality, out / "quality.csv")
    if rows.metrics:
        reports["metrics"] = write_csv(rows.metrics, out / "metrics.csv")
    reports["failed"] = write_csv(failed, out / "failed.csv", ["case", "file", "problem"])
    registered = len(units) - sum(1 for f in failed if f["case"] in catalog.units)
    return FolderResult(reports, registered, len(units) + len(catalog.bad), failed, time.perf_counter() - rows.start)


#: A refinement batch stops taking pairs once they hold this many voxels (on the network's grid): 8 pairs of
#: 128², a single 128³ volume.
REFINE_BATCH_VOXELS = 2**21


@dataclass
class _Rows:
    """The folder's summary rows as pairs finish, and when it started."""

    quality: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def add(self, case: str, record: dict) -> None:
        self.quality.append({"case": case, **record["quality"]})
        if "metrics" in record:
            network = {f"network_{k}": v for k, v in record.get("metrics_network", {}).items() if k in NETWORK_COLUMNS}
            self.metrics.append({"case": case, **record["metrics"], **network, "seconds": record["seconds"]})


def _finish_batch(model, settings: PairSettings, staged: list[tuple], out: Path, failed: list[dict], rows: _Rows):
    """Refine the staged pairs together, then write each. A batch whose refinement fails (memory, say) is
    refined pair by pair, so that only a pair that fails alone is listed in ``failed``."""
    try:
        fields = refine_staged(model, [pair for _, pair in staged])
    except PAIR_ERRORS as error:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        log.warning("refining %d pairs at once failed (%s): refining them one at a time", len(staged), error)
        fields = [_attempt(failed, [unit], lambda p=pair: refine_staged(model, [p])[0]) for unit, pair in staged]
    for (unit, pair), network_field in zip(staged, fields):
        if network_field is None:
            continue
        finished = _attempt(failed, [unit], lambda u=unit, p=pair, f=network_field: finish_pair(
            model, settings, p, f, out / u.id, _path(u.files.get("mask"))
        ))  # fmt: skip
        if finished is not None:
            rows.add(unit.id, finished.record)


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
