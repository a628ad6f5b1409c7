"""Atomic file writes: every file the package writes (weights, configs, reports, embeddings, training
checkpoints, dataset and cache manifests, token caches) reaches its final name whole or not at all, with the
permissions a plain write would have given it, and the rename is made durable (the directory synced).

Writers that create their file themselves with other permissions (``safetensors``' ``save_file`` makes its
files private, 0o600, whatever the umask) go through ``atomic_write`` too, which sets them right."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@functools.cache
def _umask() -> int:
    """The process's umask, read once (setting it to read it back is not thread-safe, so once only)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open`` or ``mkdir`` would give under the process's umask (0o644 / 0o755
    with the usual 022): temporary files and directories are created private (0o600 / 0o700), and what is
    renamed into place must not stay so."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path`` (parent folders made), flush it to
    disk and rename it into place with the permissions a plain write would give; the temporary file is
    removed if ``write`` fails."""
    atomic_write_together({path: write})


def atomic_write_together(writes: dict[str | os.PathLike, Callable[[Path], object]]) -> None:
    """``atomic_write`` for files that belong together (weights and their config): every file is written
    and flushed under a temporary name first, and only then are they renamed into place, one right after
    the other, so that an interrupted write leaves the old set (or, if it dies between two renames, a few
    microseconds' window, a mix of whole files). A target that is a directory is refused before anything
    is written. If any writer fails, nothing is renamed, and every temporary file, and every folder made
    for them, is removed."""
    paths = {Path(path): write for path, write in writes.items()}
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(f"cannot write {path}: it is a directory")
    staged: list[tuple[str, Path]] = []
    made: list[Path] = []  # folders this call created, outermost first
    done = False
    try:
        for path, write in paths.items():
            made += [d for d in reversed(path.parents) if not d.exists()]
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            staged.append((tmp, path))
            write(Path(tmp))
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, default_mode())
        for tmp, path in staged:
            os.replace(tmp, path)
        for folder in dict.fromkeys(path.parent for _, path in staged):
            fsync_directory(folder)  # the renames survive a power loss
        done = True
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if not done:
            for folder in reversed(made):
                with contextlib.suppress(OSError):  # not empty (another writer's files) or gone
                    folder.rmdir()


def fsync_directory(path: str | os.PathLike) -> None:
    """Make the renames and removals in the directory ``path`` durable (where a directory can be opened
    and synced; not on Windows, where this does nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def json_writer(obj: object, indent: int | None = None) -> Callable[[Path], object]:
    """A writer of ``obj`` as JSON (for ``atomic_write`` and ``atomic_write_together``)."""
    text = json.dumps(obj, indent=indent)
    return lambda tmp: tmp.write_text(text)


def safetensors_writer(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Callable[[Path], object]:
    """A writer of ``tensors`` (contiguous, on the CPU) as a safetensors file."""
    from safetensors.torch import save_file

    return lambda tmp: save_file(tensors, str(tmp), metadata=metadata)


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int | None = None) -> None:
    """``obj`` as JSON at ``path``, written atomically."""
    atomic_write(path, json_writer(obj, indent))


def atomic_save_safetensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """``tensors`` (contiguous, on the CPU) as a safetensors file at ``path``, written atomically with the
    permissions of a plain write."""
    atomic_write(path, safetensors_writer(tensors, metadata))
