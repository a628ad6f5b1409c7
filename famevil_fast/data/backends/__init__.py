"""Decoding backends behind one interface (:class:`~famevil_fast.data.backends.base.ImageBackend`).

=============  ===================================================================================
name           what decodes and resamples
=============  ===================================================================================
``dali``       NVIDIA DALI: GPU ("mixed") decoding and GPU resize/normalise on CUDA; CPU pipeline on CPU
``torchvision`` torchvision.io: nvJPEG batches + batched GPU resampling on CUDA; CPU decode + PIL otherwise
``pil``        Pillow decode and resample on a thread pool (the reference)
``cache``      pre-decoded uint8 shards (``famevil-fast cache``); crop/flip/normalise on the device
=============  ===================================================================================

``choose_backend(device)``: ``FAMEVIL_FAST_DATA_BACKEND`` when set, else DALI on a CUDA device when it is
installed, else torchvision on CUDA, else PIL.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from famevil_fast.data.backends.base import ImageBackend, Loaded
from famevil_fast.data.backends.dali_backend import DALIBackend, dali_importable
from famevil_fast.data.backends.pil_backend import PILBackend
from famevil_fast.data.backends.torchvision_backend import TorchvisionBackend

FILE_BACKENDS: tuple[str, ...] = ("dali", "torchvision", "pil")
BACKENDS: tuple[str, ...] = FILE_BACKENDS + ("cache",)


@functools.cache
def torchvision_importable() -> bool:
    """Whether torchvision is installed (checked without importing it)."""
    return importlib.util.find_spec("torchvision") is not None


def available_backends() -> list[str]:
    """File backends usable in this environment (``cache`` additionally needs a cache directory)."""
    out = ["pil"]
    if torchvision_importable():
        out.insert(0, "torchvision")
    if dali_importable():
        out.insert(0, "dali")
    return out


def choose_backend(device: torch.device | str) -> str:
    forced = os.environ.get("FAMEVIL_FAST_DATA_BACKEND", "").strip()
    if forced:
        return forced
    if torch.device(device).type == "cuda":
        if dali_importable():
            return "dali"
        if torchvision_importable():
            return "torchvision"
    return "pil"


def make_backend(
    name: str,
    root: str | os.PathLike,
    image_size: int,
    device: torch.device | str = "cpu",
    num_threads: int | None = None,
) -> ImageBackend:
    """A file backend by name (see the table above); ValueError for unknown or unavailable names."""
    classes = {"dali": DALIBackend, "torchvision": TorchvisionBackend, "pil": PILBackend}
    if name not in classes:
        raise ValueError(
            f"unknown data backend {name!r}; expected one of {FILE_BACKENDS} (or 'cache' with a cache dir)"
        )
    if name == "dali" and not dali_importable():
        raise ValueError("data backend 'dali' needs NVIDIA DALI: pip install famevil_fast[dali]")
    if name == "torchvision" and not torchvision_importable():
        raise ValueError("data backend 'torchvision' needs torchvision: pip install famevil_fast[vision]")
    return classes[name](root, image_size, device, num_threads)


__all__ = [
    "BACKENDS",
    "FILE_BACKENDS",
    "DALIBackend",
    "ImageBackend",
    "Loaded",
    "PILBackend",
    "TorchvisionBackend",
    "available_backends",
    "choose_backend",
    "make_backend",
]
