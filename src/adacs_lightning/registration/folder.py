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
from .pair import PairSettings, register_pair

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
    """
    catalog = FolderDataModule(str(csv), spatial_dims=model.backbone.spatial_dims).discover()
    failed = [{"case": b.case, "file": b.file, "problem": f"{b.problem} {b.fix}".strip()} for b in catalog.bad]
    metrics, quality, start = [], [], time.perf_counter()
    units = list(catalog.units.values())
    for unit in tqdm(units, desc="Registering", unit="pair", disable=not sys.stderr.isatty()):
        files = unit.files
        try:
            record = register_pair(
                model,
                settings,
                Path(files["source"]),
                Path(files["target"]),
                out / unit.id,
                _path(files.get("label_source")),
                _path(files.get("label_target")),
                _path(files.get("mask")),
            ).record
        except (AdaCSError, ValueError, RuntimeError, OSError) as error:
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # a full disk fails every later row too: stop, with the console's paragraph
            # Anything one pair's files cause (a label map on another grid, a torn file): skip the row.
            failed.append({"case": unit.id, "file": files.get("source", ""), "problem": f"{error}"})
            log.warning("skipped %s: %s", unit.id, error)
            continue
        quality.append({"case": unit.id, **record["quality"]})
        if "metrics" in record:
            network = {f"network_{k}": v for k, v in record.get("metrics_network", {}).items() if k in NETWORK_COLUMNS}
            metrics.append({"case": unit.id, **record["metrics"], **network, "seconds": record["seconds"]})
    reports = {}
    out.mkdir(parents=True, exist_ok=True)
    if quality:  # every registered pair, labelled or not: sort by flag to see which to check first
        reports["quality"] = write_csv(quality, out / "quality.csv")
    if metrics:
        reports["metrics"] = write_csv(metrics, out / "metrics.csv")
    reports["failed"] = write_csv(failed, out / "failed.csv", ["case", "file", "problem"])
    registered = len(units) - sum(1 for f in failed if f["case"] in catalog.units)
    return FolderResult(reports, registered, len(units) + len(catalog.bad), failed, time.perf_counter() - start)


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)
