"""torchvision backend: ``torchvision.io`` decoders; JPEG batches decode with nvJPEG when the device is CUDA.

With the "torch" resampler (the default on a CUDA device) the JPEGs of a batch decode together (nvJPEG on
CUDA), PNGs decode on the CPU and move, and the padded batch is cropped, resized and flipped on the device by
:func:`~famevil_fast.data.transforms.resample_batch`. With "pil" (the CPU default) each decoded image is
resampled by PIL, the reference resampler, on the decode threads.

Only JPEGs go through ``torchvision.io``; every other format is decoded by PIL. torchvision's PNG decoder
kills the process (a segmentation fault from libpng's error handler) on a PNG whose compressed data is
damaged, where PIL raises an error and the image is skipped like any undecodable one; PIL also scales
16-bit images to 8 bits as every other backend does (:func:`~famevil_fast.data.transforms.to_rgb`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from famevil_fast.data.backends.base import ImageBackend, Loaded
from famevil_fast.data.backends.pil_backend import PIL_DECODE_ERRORS, decode_error, pil_image
from famevil_fast.data.images import read_bytes
from famevil_fast.data.transforms import CropPlan, normalize, pil_resample, resample_batch


def _torchvision_io():
    try:
        import torchvision.io as tvio
    except ImportError as e:  # pragma: no cover - torchvision is a dev dependency
        raise ImportError(
            "the torchvision data backend needs torchvision (pip install famevil_fast[vision])"
        ) from e
    return tvio


def _is_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8"


# what a decode may raise for a bad file: PIL raises PIL_DECODE_ERRORS, torchvision RuntimeError / ValueError
DECODE_ERRORS = (*PIL_DECODE_ERRORS, RuntimeError)


class TorchvisionBackend(ImageBackend):
    name = "torchvision"

    def __init__(self, *args, resampler: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._io = _torchvision_io()
        if resampler not in (None, "pil", "torch"):
            raise ValueError(f"TorchvisionBackend: resampler must be 'pil', 'torch' or None: {resampler!r}")
        self.resampler = resampler or ("torch" if self.device.type == "cuda" else "pil")

    def _decode_cpu(self, data: bytes) -> torch.Tensor:
        """(3, h, w) uint8 of encoded ``data``: JPEGs with torchvision.io, anything else with PIL."""
        if not _is_jpeg(data):
            return torch.from_numpy(np.asarray(pil_image(data)).copy()).permute(2, 0, 1)
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out = self._io.decode_image(t, mode=self._io.ImageReadMode.RGB)
        if out.dtype != torch.uint8:  # a wider-than-8-bit decode: scaled as to_rgb does
            out = torch.round(out.to(torch.float64) / 257.0).clamp_(0, 255).to(torch.uint8)
        return out

    def _one_cpu(self, data: bytes | None, plan: CropPlan, i: int) -> np.ndarray | str:
        if data is None:
            return "file not readable"
        try:
            if _is_jpeg(data):
                image = Image.fromarray(self._decode_cpu(data).permute(1, 2, 0).numpy())
            else:  # PIL directly, not through a tensor
                image = pil_image(data)
        except DECODE_ERRORS as e:
            return decode_error(e)
        boxes, flips = plan.subset(np.asarray([i])).boxes(
            np.asarray([[image.height, image.width]]), self.image_size
        )
        return np.asarray(pil_resample(image, boxes[0], bool(flips[0]), self.image_size))

    def load(self, paths: Sequence[str], plan: CropPlan) -> Loaded:
        datas = read_bytes(self.root, paths, self.pool)
        if self.resampler == "torch":
            return self._load_batched(paths, datas, plan)
        results = list(self.pool.map(lambda a: self._one_cpu(a[1], plan, a[0]), enumerate(datas)))
        loaded = self._from_host([None if isinstance(r, str) else r for r in results])
        loaded.failures = [(p, r) for p, r in zip(paths, results) if isinstance(r, str)]
        return loaded

    # batched path (nvJPEG on CUDA) -------------------------------------------------------------------

    def _decode_jpegs(self, datas: list[bytes]) -> list[torch.Tensor | str]:
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        try:
            return list(self._io.decode_jpeg(tensors, mode=self._io.ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            out: list[torch.Tensor | str] = []
            for t in tensors:  # find the undecodable ones
                try:
                    out.append(self._io.decode_jpeg(t, mode=self._io.ImageReadMode.RGB, device=self.device))
                except RuntimeError as e:
                    out.append(decode_error(e))
            return out

    def _decode_other(self, data: bytes) -> torch.Tensor | str:
        try:
            return self._decode_cpu(data).to(self.device, non_blocking=True)
        except DECODE_ERRORS as e:
            return decode_error(e)

    def _load_batched(self, paths: Sequence[str], datas: list[bytes | None], plan: CropPlan) -> Loaded:
        decoded: list[torch.Tensor | str] = ["file not readable"] * len(paths)
        jpeg = [i for i, d in enumerate(datas) if d is not None and _is_jpeg(d)]
        other = [i for i, d in enumerate(datas) if d is not None and not _is_jpeg(d)]
        if jpeg:
            for i, r in zip(jpeg, self._decode_jpegs([datas[i] for i in jpeg])):
                decoded[i] = r
        for i, r in zip(other, self.pool.map(self._decode_other, [datas[i] for i in other])):
            decoded[i] = r
        ok = np.asarray([isinstance(d, torch.Tensor) for d in decoded], dtype=bool)
        failures = [(p, d) for p, d in zip(paths, decoded) if isinstance(d, str)]
        good = [d for d in decoded if isinstance(d, torch.Tensor)]
        s = self.image_size
        if not good:
            return Loaded(torch.empty((0, 3, s, s), device=self.device), ok, failures)
        sizes = np.asarray([[g.shape[1], g.shape[2]] for g in good])
        boxes, flips = plan.subset(np.flatnonzero(ok)).boxes(sizes, s)
        batch = pad_batch(good)
        pixels = resample_batch(
            batch, torch.from_numpy(sizes), torch.from_numpy(boxes), torch.from_numpy(flips), s
        )
        return Loaded(normalize(pixels), ok, failures)


def pad_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack (3, h_i, w_i) images into one zero-padded (n, 3, max h, max w) tensor on their device."""
    h = max(int(x.shape[1]) for x in images)
    w = max(int(x.shape[2]) for x in images)
    if all(x.shape[1] == h and x.shape[2] == w for x in images):
        return torch.stack(images)
    out = torch.zeros((len(images), 3, h, w), dtype=images[0].dtype, device=images[0].device)
    for k, x in enumerate(images):
        out[k, :, : x.shape[1], : x.shape[2]] = x
    return out
