"""Image files: existence checks, cheap size probing from file headers, and the skipped-image report.

A missing or undecodable image never stops a run and never becomes a wrong sample: the sample is dropped
and counted, and one :class:`SkippedImagesWarning` per report summarises how many were dropped and names a
few of them.
"""

from __future__ import annotations

import os
import struct
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

# Frames a warning is not attributed to: this package's, and torch's decorator wrappers (no_grad) around them.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_WRAPPER_FILES = (os.path.join("torch", "utils", "_contextlib.py"),)


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the calling function point at the first frame
    outside this package: the user's code that called into it (or the command line's entry point)."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None:
        name = frame.f_code.co_filename
        if not (name.startswith(_PACKAGE_DIR) or name.endswith(_WRAPPER_FILES)):
            break
        frame, level = frame.f_back, level + 1
    return level


class SkippedImagesWarning(UserWarning):
    """Some images were missing or could not be decoded; their samples were skipped."""


class SkippedImages:
    """Thread-safe tally of skipped images with a single summarising warning per :meth:`report`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()
        self._paths: list[str] = []
        self._reasons: dict[str, str] = {}

    def add(self, path: str, reason: str) -> None:
        with self._lock:
            if path not in self._reasons:
                self._paths.append(path)
            self._reasons[path] = reason

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def paths(self) -> list[str]:
        return list(self._paths)

    def report(self, total: int | None = None) -> None:
        """Emit one warning summarising everything added since the last report, then forget it; it points
        at the first caller outside this package."""
        with self._lock:
            paths, reasons = self._paths, self._reasons
            self._paths, self._reasons = [], {}
        if not paths:
            return
        out_of = f" of {total}" if total is not None else ""
        examples = "; ".join(f"{p} ({reasons[p]})" for p in paths[:3])
        more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
        warnings.warn(
            f"{self.what}: skipped {len(paths)}{out_of} images that are missing or cannot be decoded: "
            f"{examples}{more}",
            SkippedImagesWarning,
            stacklevel=caller_stacklevel(),
        )


def missing_files(root: str | os.PathLike, paths: Iterable[str], threads: int = 8) -> set[str]:
    """The subset of ``paths`` (relative to ``root``) that are not regular files."""
    unique = sorted(set(paths))
    base = os.fspath(root)
    if not unique:
        return set()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        exists = list(pool.map(lambda p: os.path.isfile(os.path.join(base, p)), unique, chunksize=256))
    return {p for p, ok in zip(unique, exists) if not ok}


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int]]:
    """(marker, offset) of each marker segment of a JPEG from its start, stepping over fill bytes and
    standalone markers (a thumbnail inside an APP1 segment is stepped over with it); stops at a byte that is
    not a marker or at the end of the data."""
    i, n = 2, len(data)
    while i + 3 < n:
        if data[i] != 0xFF:
            return
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        yield marker, i
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        i += 2 + length


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    for marker, i in _jpeg_segments(data):
        if i + 9 >= len(data):
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return height, width
    return None


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of a JPEG's first start-of-scan marker; None when there is none."""
    return next((i for marker, i in _jpeg_segments(data) if marker == 0xDA), None)


def jpeg_truncated(data: bytes) -> bool:
    """True for a JPEG whose data stops before its end-of-image marker: no start of scan, or no FF D9 after
    it. Entropy-coded data cannot hold FF D9 (every FF byte there is followed by 00 or a restart marker),
    so the search cannot end early inside a scan. Not a JPEG: False."""
    if data[:2] != b"\xff\xd8":
        return False
    sos = _jpeg_scan_start(data)
    return sos is None or data.find(b"\xff\xd9", sos) < 0


def size_from_bytes(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) read from a PNG or JPEG header without decoding; None when not recognised."""
    head = bytes(data[:2])
    if bytes(data[:8]) == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        width, height = struct.unpack(">II", bytes(data[16:24]))
        return height, width
    if head == b"\xff\xd8":
        return _jpeg_size(bytes(data[: 1 << 16]) if len(data) > 1 << 16 else bytes(data))
    return None


def probe_size(data: bytes, path: str = "") -> tuple[int, int]:
    """(height, width) of an encoded image: header parse, else PIL's lazy open; OSError if unreadable."""
    size = size_from_bytes(data)
    if size is not None and size[0] > 0 and size[1] > 0:
        return size
    import io

    with Image.open(io.BytesIO(data)) as im:
        return im.height, im.width


def read_bytes(root: str, paths: Sequence[str], pool: ThreadPoolExecutor | None = None) -> list[bytes | None]:
    """File contents (None where unreadable), read on ``pool`` when given."""

    def one(p: str) -> bytes | None:
        try:
            with open(os.path.join(root, p), "rb") as f:
                return f.read()
        except OSError:
            return None

    if pool is None or len(paths) < 4:
        return [one(p) for p in paths]
    return list(pool.map(one, paths))
