"""Files written whole or not at all: :func:`atomic_write` fills a temporary file beside the target and
renames it over the target, so a crash mid-write leaves the old file (or none), never a torn one. Used for
checkpoints, manifests and sidecars, journal state, worker records and benchmark results."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any], *, fsync: bool = False) -> Path:
    """``write(tmp)`` builds the file at a temporary path in the same directory, which then replaces
    ``path``; ``fsync``: the data reaches the disk before the rename (survives a power cut, not only a
    crash). The parent directory is created; a failed ``write`` leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``obj`` as JSON (``dumps``: keyword arguments of ``json.dumps``, e.g. ``indent=1``)."""
    text = json.dumps(obj, **dumps)
    return atomic_write(path, lambda tmp: tmp.write_text(text))
