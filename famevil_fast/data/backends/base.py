"""The decoding-backend interface: paths + a crop plan in, CLIP-normalised (n, 3, S, S) float32 out.

Every backend computes its crop boxes with :class:`~famevil_fast.data.transforms.CropPlan` from the true
image sizes and resamples with the same antialiased bilinear rule, so all backends agree within
interpolation tolerance. An image that is missing or cannot be decoded is reported in ``failures`` and
left out of ``pixels`` (``ok`` marks which inputs are present).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from famevil_fast.data.transforms import CropPlan, normalize


@dataclass
class Loaded:
    """Result of one :meth:`ImageBackend.load`: pixels of the decodable images and which ones they are."""

    pixels: torch.Tensor  # (n_ok, 3, S, S) float32, CLIP-normalised, on the backend's device
    ok: np.ndarray  # (n,) bool
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class ImageBackend(ABC):
    """Decodes image files under ``root`` into normalised S x S tensors on ``device``."""

    name: str = "?"

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        device: torch.device | str = "cpu",
        num_threads: int | None = None,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"{type(self).__name__}: image_size must be positive, got {image_size}")
        self.root = os.fspath(root)
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.num_threads = num_threads or default_threads()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=self.num_threads, thread_name_prefix=f"{self.name}-decode"
            )
        return self._pool

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    @abstractmethod
    def load(self, paths: Sequence[str], plan: CropPlan) -> Loaded:
        """Decode ``paths`` (relative to root), crop per ``plan``, resample to S x S, normalise."""

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={self.root!r}, image_size={self.image_size}, device={self.device})"
        )

    # shared helpers -----------------------------------------------------------------------------

    def _from_host(self, arrays: list[np.ndarray | None]) -> Loaded:
        """Stack per-image (S, S, 3) uint8 results (None = failed) and normalise them on the device."""
        ok = np.asarray([a is not None for a in arrays], dtype=bool)
        s = self.image_size
        good = [a for a in arrays if a is not None]
        host = torch.empty(
            (len(good), s, s, 3),
            dtype=torch.uint8,
            pin_memory=self.device.type == "cuda" and torch.cuda.is_available(),
        )
        if good:
            np.stack(good, out=host.numpy())
        pixels = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        return Loaded(normalize(pixels.contiguous()), ok)
