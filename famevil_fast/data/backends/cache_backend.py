"""Cache backend: images come pre-decoded from an :class:`~famevil_fast.data.cache.ImageCache`.

No decoding happens at train time. With the "torch" resampler (the default on a CUDA device) the uint8
images of a batch are gathered into pinned
memory, copied once, and cropped, resized, flipped and normalised there by
:func:`~famevil_fast.data.transforms.resample_batch`; with "pil" (the CPU default) PIL resamples each image
on the thread pool.

Given the data ``root`` of the dataset, the backend checks that the cache was built from it (or from a
directory above or below it, whose keys it maps). A cache built from any other root (the dataset moved, or
another dataset) is used with a warning naming both roots: its images are served under the same relative
file names (:meth:`~famevil_fast.data.cache.ImageCache.key_mapping`). A cache built with a ``max_side``
smaller than the image size is upsampled; the backend warns once when it is created.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from famevil_fast.data.backends.base import ImageBackend, Loaded
from famevil_fast.data.cache import ImageCache
from famevil_fast.data.transforms import CropPlan, normalize, pil_resample, resample_batch


class CacheBackend(ImageBackend):
    name = "cache"

    def __init__(
        self,
        cache: ImageCache | str | os.PathLike,
        image_size: int,
        device: torch.device | str = "cpu",
        num_threads: int | None = None,
        verify: bool = True,
        resampler: str | None = None,
        root: str | os.PathLike | None = None,
    ) -> None:
        if resampler not in (None, "pil", "torch"):
            raise ValueError(f"CacheBackend: resampler must be 'pil', 'torch' or None, got {resampler!r}")
        self.cache = cache if isinstance(cache, ImageCache) else ImageCache(cache, verify=verify)
        super().__init__(self.cache.path, image_size, device, num_threads)
        self.resampler = resampler or ("torch" if self.device.type == "cuda" else "pil")
        self.data_root = None if root is None else os.fspath(root)
        self.cache_key = self.cache.key_function(root)  # dataset path -> cache key (None: outside its root)
        max_side = self.cache.max_side
        if max_side is not None and max_side < self.image_size:
            warnings.warn(
                f"image cache {self.cache.path} was built with --max-side {max_side}, smaller than the image "
                f"size {self.image_size}: its images are upsampled (rebuild it with --max-side >= "
                f"{self.image_size} or without --max-side)",
                UserWarning,
                stacklevel=2,
            )

    def _resample_cpu(self, key: str, box: np.ndarray, flip: bool) -> np.ndarray:
        arr = self.cache.get(key)
        image = Image.frombuffer("RGB", (arr.shape[1], arr.shape[0]), arr, "raw", "RGB", 0, 1)
        return np.asarray(pil_resample(image, box, flip, self.image_size))

    def load(self, paths: Sequence[str], plan: CropPlan) -> Loaded:
        mapped = [self.cache_key(p) for p in paths]
        entries = [None if k is None else self.cache.entry(k) for k in mapped]
        ok = np.asarray([e is not None for e in entries], dtype=bool)
        outside = "outside the data root the cache was built from"
        failures = [
            (p, outside if k is None else self.cache.reason_missing(k))
            for p, k, e in zip(paths, mapped, entries)
            if e is None
        ]
        s = self.image_size
        if not ok.any():  # nothing to gather or crop
            if paths and self.data_root is None:
                self._explain_misses(paths)
            return Loaded(torch.empty((0, 3, s, s), device=self.device), ok, failures)
        idx = np.flatnonzero(ok)
        keys = [mapped[i] for i in idx]
        sizes = np.asarray([[entries[i].height, entries[i].width] for i in idx], dtype=np.int64).reshape(
            -1, 2
        )
        boxes, flips = plan.subset(idx).boxes(sizes, self.image_size)
        if self.resampler == "torch":
            pixels = self._load_device(keys, sizes, boxes, flips)
        else:
            arrays = list(self.pool.map(lambda a: self._resample_cpu(*a), zip(keys, boxes, flips)))
            pixels = self._from_host(arrays).pixels
        return Loaded(pixels, ok, failures)

    def _explain_misses(self, paths: Sequence[str]) -> None:
        """A batch found none of its images: when they are in the cache under a dataset directory, the data
        root was given as that directory, which this backend cannot map without ``root``: say so."""
        for sub in ("FashionGen", "FashionIQ", "Fashion200k"):
            if any(f"{sub}/{p}" in self.cache or f"{sub}/{p}" in self.cache.failed for p in paths):
                raise ValueError(
                    f"image cache {self.cache.path}: its keys are relative to the data root "
                    f"{self.cache.root} (it holds {sub}/{paths[0]}), but the dataset's image paths are "
                    f"relative to its {sub}/ directory ({paths[0]}); use the data root {self.cache.root}"
                )

    def _load_device(
        self, keys: list[str], sizes: np.ndarray, boxes: np.ndarray, flips: np.ndarray
    ) -> torch.Tensor:
        if not keys:
            s = self.image_size
            return torch.empty((0, 3, s, s), device=self.device)
        return self.crop_on_device(self.gather(keys, sizes), sizes, boxes, flips)

    def gather(self, keys: list[str], sizes: np.ndarray) -> torch.Tensor:
        """The batch's uint8 images, zero-padded to the largest, in one (B, H, W, 3) host tensor (pinned
        when the device is a GPU), filled by the thread pool."""
        h, w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        host = torch.empty((len(keys), h, w, 3), dtype=torch.uint8, pin_memory=pin)
        dst = host.numpy()
        uniform = bool((sizes[:, 0] == h).all() and (sizes[:, 1] == w).all())
        if not uniform:
            dst[...] = 0

        def copy(span: range) -> None:
            for k in span:
                arr = self.cache.get(keys[k])
                dst[k, : arr.shape[0], : arr.shape[1]] = arr

        # one contiguous span of the batch per thread: a task per image costs the pool more than the copy
        # (2 cores, 256 x 256 px: 16,000 images/s in spans against 11,000-13,000 one by one)
        step = -(-len(keys) // self.num_threads)
        list(self.pool.map(copy, [range(i, min(i + step, len(keys))) for i in range(0, len(keys), step)]))
        return host

    def crop_on_device(
        self, host: torch.Tensor, sizes: np.ndarray, boxes: np.ndarray, flips: np.ndarray
    ) -> torch.Tensor:
        """Copy a gathered batch to the device and crop, resize, flip and normalise it there."""
        batch = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        pixels = resample_batch(
            batch, torch.from_numpy(sizes), torch.from_numpy(boxes), torch.from_numpy(flips), self.image_size
        )
        return normalize(pixels)
