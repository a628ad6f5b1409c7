"""Tokenised text for the datasets: CLIP BPE ids (B, 77), cached on disk by content when a cache is given.

The cache file name is a SHA-256 of the texts (in order) and the context length, so a changed caption file
can never be served stale ids; files are written atomically under ``<cache_dir>/tokens/``. A token file
that cannot be read (truncated, corrupted) is re-tokenised and rewritten with a warning naming it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from famevil_fast.files import atomic_write

CONTEXT_LENGTH = 77
_FORMAT = "clip-bpe-v1"


def text_digest(texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> str:
    h = hashlib.sha256(f"{_FORMAT}|{context_length}|{len(texts)}".encode())
    for t in texts:
        h.update(b"\x00")
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def _read_ids(path: Path) -> np.ndarray:
    """The (N, L) integer ids in ``path``; ValueError (naming nothing) when the file is not such an array.
    Memory-mapped, so a file shorter than its header says fails here."""
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from e
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise ValueError(f"holds a {ids.dtype} array of shape {ids.shape}, not 2-D integer token ids")
    return ids


def unreadable_token_files(cache_dir: str | os.PathLike) -> list[Path]:
    """The files under ``<cache_dir>/tokens`` that are not readable token-id arrays (sorted)."""
    bad = []
    for path in sorted((Path(cache_dir) / "tokens").glob("*.npy")):
        if path.name.endswith(".tmp.npy"):  # being written
            continue
        try:
            _read_ids(path)
        except ValueError:
            bad.append(path)
    return bad


def _tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    from famevil_fast.text import tokenize

    return tokenize(texts, context_length=context_length)


def tokenize_texts(
    texts: Sequence[str], cache_dir: str | os.PathLike | None = None, context_length: int = CONTEXT_LENGTH
) -> torch.Tensor:
    """(N, context_length) int64 CLIP ids of ``texts``; read from / written to ``cache_dir`` when given."""
    texts = list(texts)
    if not texts:
        return torch.zeros((0, context_length), dtype=torch.int64)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "tokens" / f"{text_digest(texts, context_length)}.npy"
        if path.is_file():
            try:
                ids = _read_ids(path)
            except ValueError as e:
                warnings.warn(f"token cache: {path} is unreadable ({e}); re-tokenising it", stacklevel=2)
            else:
                if ids.shape == (len(texts), context_length):
                    return torch.from_numpy(np.array(ids, dtype=np.int64))
                warnings.warn(
                    f"token cache: {path} holds ids of shape {ids.shape}, expected "
                    f"{(len(texts), context_length)}; re-tokenising it",
                    stacklevel=2,
                )
    ids = _tokenize(texts, context_length)
    if path is not None:
        array = ids.numpy().astype(np.int32)
        try:
            atomic_write(path, lambda tmp: _save_npy(tmp, array))
        except OSError as e:
            raise OSError(f"token cache: cannot write {path}: {e}") from e
    return ids.to(torch.int64)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """``array`` in .npy format at exactly ``path`` (``np.save`` given a name would append ".npy")."""
    with open(path, "wb") as f:
        np.save(f, array)
