"""Reads an offline W&B run file (``run-*.wandb``) back into protobuf records, for assertions.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each
with a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7


def _payloads(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_run(run_dir: Path) -> dict:
    """Record types, config keys, history keys, metric summaries and artifact metadata of an offline run."""
    import json

    (run_file,) = run_dir.glob("run-*.wandb")
    kinds: set[str] = set()
    config: set[str] = set()
    history: set[str] = set()
    summaries: dict[str, set[str]] = {}
    artifacts: list[dict] = []
    for payload in _payloads(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        kinds.add(kind)
        if kind == "config":
            config |= {item.key or "/".join(item.nested_key) for item in record.config.update}
        elif kind == "history":
            history |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "metric":
            summary = record.metric.summary
            summaries[record.metric.name] = {field.name for field, value in summary.ListFields() if value}
        elif kind == "artifact":
            artifacts.append(json.loads(record.artifact.metadata or "{}"))
    return {
        "kinds": kinds,
        "config": config,
        "history": history,
        "summaries": summaries,
        "artifacts": artifacts,
    }
