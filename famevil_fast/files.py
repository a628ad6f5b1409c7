"""Atomic file writes: every file the package writes (weights, configs, reports, dataset and cache
manifests, token caches) reaches its final name whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (parent folders made), flush it to
    disk and rename it into place; the temporary file is removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int | None = None) -> None:
    """``obj`` as JSON at ``path``, written atomically."""
    text = json.dumps(obj, indent=indent)
    atomic_write(path, lambda tmp: tmp.write_text(text))
