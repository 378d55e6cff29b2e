"""Read an offline W&B run's ``.wandb`` file back (records as W&B wrote them), for tests.

The file is W&B's record log: a 7-byte header (``:W&B``, magic, version), then LevelDB-log framing (32 KiB blocks;
each chunk has a CRC, a little-endian length and a type: full / first / middle / last) around protobuf
``wandb_internal_pb2.Record`` messages. Only what the tests need is decoded: history rows and config updates.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any

_BLOCK = 32768
_HEADER = 7


def records(path: str, timeout: float = 30.0) -> list[Any]:
    """Every ``Record`` in the ``.wandb`` file at ``path``, once the run's final ``exit`` record is there (W&B's
    service process may still be writing the file when ``wandb.finish()`` returns); waits up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        out = _parse(path)
        if any(r.WhichOneof("record_type") == "exit" for r in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _parse(path: str) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B record log"
    out, pos, pending = [], _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 0:
            continue
        if kind == 1:
            payload = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            payload, pending = pending + chunk, b""
        record = pb.Record()
        record.ParseFromString(payload)
        out.append(record)
    return out


def run_file(root: str) -> str:
    """The one ``run-*.wandb`` file under ``root``."""
    files = glob.glob(os.path.join(str(root), "**", "offline-run-*", "run-*.wandb"), recursive=True)
    assert len(files) == 1, files
    return files[0]


def history(path: str) -> list[dict[str, Any]]:
    """History rows (one per W&B step) as ``{key: decoded JSON value}``; nested keys joined with ``/``."""
    rows = []
    for record in records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def config(path: str) -> dict[str, Any]:
    """The run config as the config-update records set it."""
    out: dict[str, Any] = {}
    for record in records(path):
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                out[key] = json.loads(item.value_json)
    return out
