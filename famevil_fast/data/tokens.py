"""Tokenised text for the datasets: CLIP BPE ids (B, 77), cached on disk by content when a cache is given.

The cache file name is a SHA-256 of the texts (in order) and the context length, so a changed caption file
can never be served stale ids; files are written atomically under ``<cache_dir>/tokens/``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

CONTEXT_LENGTH = 77
_FORMAT = "clip-bpe-v1"


def text_digest(texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> str:
    h = hashlib.sha256(f"{_FORMAT}|{context_length}|{len(texts)}".encode())
    for t in texts:
        h.update(b"\x00")
        h.update(t.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


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
            ids = np.load(path)
            if ids.shape == (len(texts), context_length):
                return torch.from_numpy(ids.astype(np.int64))
    ids = _tokenize(texts, context_length)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, ids.numpy().astype(np.int32))
        os.replace(tmp, path)
    return ids.to(torch.int64)
