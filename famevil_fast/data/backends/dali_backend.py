"""NVIDIA DALI backend: "mixed" GPU decoding (nvJPEG; PNG on the CPU) with resize, crop, flip and
normalisation on the GPU, or the same pipeline on the CPU (``device_id=None``) when the device is the CPU.

The host reads the encoded bytes, parses the image sizes from the headers and computes the crop boxes
with the shared :class:`~famevil_fast.data.transforms.CropPlan`; the pipeline receives them through
``external_source`` (so shuffling, sharding and resumption stay with the loader) and resizes the box with
linear antialiased interpolation. A batch holding an undecodable image makes DALI fail the whole
pipeline: the images are then probed one by one with PIL, the bad ones are dropped and a fresh pipeline
decodes the rest. Images in a format DALI does not decode (GIF, ...) go to PIL directly, and when the fresh
pipeline still fails (an image PIL reads and DALI does not) the batch is decoded and resampled by PIL, the
reference, so no image PIL can read is lost and no error escapes.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from famevil_fast.data.backends.base import ImageBackend, Loaded
from famevil_fast.data.backends.pil_backend import PIL_DECODE_ERRORS, decode_error, pil_image
from famevil_fast.data.images import jpeg_truncated, probe_size, read_bytes
from famevil_fast.data.transforms import CLIP_MEAN, CLIP_STD, CropPlan, normalize, pil_resample

if TYPE_CHECKING:
    from nvidia.dali import Pipeline


@functools.cache
def dali_importable() -> bool:
    """Whether NVIDIA DALI is installed (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


def _require_dali():
    if not dali_importable():
        raise ImportError("the DALI data backend needs NVIDIA DALI: pip install famevil_fast[dali]")
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    return fn, types, pipeline_def


def build_dali_pipeline(
    batch_size: int, image_size: int, device_id: int | None, num_threads: int
) -> Pipeline:
    """The decode -> resize(box) -> crop_mirror_normalize pipeline fed by four external sources."""
    fn, types, pipeline_def = _require_dali()

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=1,
        exec_async=False,
        exec_pipelined=False,
    )
    def pipeline():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
        roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
        mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
        images = fn.decoders.image(  # EXIF orientation is ignored, as PIL and torchvision do
            encoded,
            device="cpu" if device_id is None else "mixed",
            output_type=types.RGB,
            adjust_orientation=False,
        )
        images = fn.resize(
            images,
            size=[image_size, image_size],
            roi_start=roi_start,
            roi_end=roi_end,
            roi_relative=False,
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        return fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mirror=mirror,
            mean=[255.0 * m for m in CLIP_MEAN],
            std=[255.0 * s for s in CLIP_STD],
        )

    pipe = pipeline()
    pipe.build()
    return pipe


class DALIBackend(ImageBackend):
    name = "dali"

    def __init__(self, *args, max_batch: int = 256, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _require_dali()
        if self.device.type == "cuda":
            self.device_id = (
                self.device.index if self.device.index is not None else torch.cuda.current_device()
            )
        elif self.device.type == "cpu":
            self.device_id = None
        else:
            raise ValueError(f"DALIBackend: device must be cpu or cuda, got {self.device}")
        self.max_batch = int(max_batch)
        self._pipe = None
        self._warned_fallback = False

    def _pipeline(self):
        if self._pipe is None:
            self._pipe = build_dali_pipeline(
                self.max_batch, self.image_size, self.device_id, min(self.num_threads, 16)
            )
        return self._pipe

    def _run(self, encoded: list[np.ndarray], boxes: np.ndarray, flips: np.ndarray) -> torch.Tensor:
        pipe = self._pipeline()
        pipe.feed_input("encoded", encoded)
        pipe.feed_input("roi_start", [b[:2].astype(np.float32) for b in boxes])
        pipe.feed_input("roi_end", [(b[:2] + b[2:]).astype(np.float32) for b in boxes])
        pipe.feed_input("mirror", [np.asarray(int(f), dtype=np.int32) for f in flips])
        (out,) = pipe.run()
        return self._to_torch(out.as_tensor())

    def _to_torch(self, tensor) -> torch.Tensor:
        """Copy a DALI output into a fresh torch tensor; the copy is synchronous, so the tensor is ready for
        any stream when this returns (DALI reuses its output buffers on the next run)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tuple(tensor.shape()), dtype=torch.float32, device=self.device)
        feed_ndarray(tensor, out)
        return out

    def load(self, paths: Sequence[str], plan: CropPlan) -> Loaded:
        if len(paths) > self.max_batch:
            return self._load_in_parts(paths, plan)
        datas = read_bytes(self.root, paths, self.pool)
        sizes, failures = _probe_sizes(paths, datas)
        ok = np.asarray([s is not None for s in sizes], dtype=bool)
        # formats DALI has no decoder for go to PIL without costing a failed pipeline run
        to_pil = np.asarray(
            [bool(ok[i]) and not dali_format(datas[i]) for i in range(len(paths))], dtype=bool
        )
        by_dali = ok & ~to_pil
        try:
            dali_pixels = self._decode(datas, sizes, by_dali, plan)
        except RuntimeError:
            self._pipe = None  # DALI invalidates a pipeline after an error
            for i in np.flatnonzero(by_dali):
                reason = _pil_probe(datas[i])
                if reason is not None:
                    ok[i] = by_dali[i] = False
                    failures.append((paths[i], reason))
            try:
                dali_pixels = self._decode(datas, sizes, by_dali, plan)
            except RuntimeError as e:  # an image PIL reads and DALI does not: PIL decodes them all
                self._pipe = None
                self._warn_fallback([paths[i] for i in np.flatnonzero(by_dali)], e)
                to_pil |= by_dali
                by_dali[:] = False
                dali_pixels = self._decode(datas, sizes, by_dali, plan)
        if not to_pil.any():
            return Loaded(dali_pixels, ok, failures)
        pil_pixels: list[np.ndarray] = []
        for i in np.flatnonzero(to_pil):
            result = _pil_one(datas[i], plan.subset(np.asarray([i])), self.image_size)
            if isinstance(result, str):
                ok[i] = to_pil[i] = False
                failures.append((paths[i], result))
            else:
                pil_pixels.append(result)
        return Loaded(self._assemble(ok, by_dali, dali_pixels, to_pil, pil_pixels), ok, failures)

    def _load_in_parts(self, paths: Sequence[str], plan: CropPlan) -> Loaded:
        """``load`` of more than ``max_batch`` images, ``max_batch`` at a time, joined in order."""
        parts = [
            self.load(
                paths[i : i + self.max_batch],
                plan.subset(np.arange(i, min(len(paths), i + self.max_batch))),
            )
            for i in range(0, len(paths), self.max_batch)
        ]
        return Loaded(
            torch.cat([p.pixels for p in parts]),
            np.concatenate([p.ok for p in parts]),
            [f for p in parts for f in p.failures],
        )

    def _assemble(
        self,
        ok: np.ndarray,
        by_dali: np.ndarray,
        dali_pixels: torch.Tensor,
        to_pil: np.ndarray,
        pil_pixels: list[np.ndarray],
    ) -> torch.Tensor:
        """The batch of the present images (``ok``) in order: those of ``by_dali`` from ``dali_pixels``, those
        of ``to_pil`` from ``pil_pixels`` (uint8 HWC, normalised here)."""
        s = self.image_size
        pixels = torch.empty((int(ok.sum()), 3, s, s), dtype=torch.float32, device=self.device)
        rank = np.cumsum(ok) - 1  # position of each present image in the output
        if by_dali.any():
            pixels[torch.from_numpy(rank[by_dali]).to(self.device)] = dali_pixels
        if pil_pixels:
            host = torch.from_numpy(np.stack(pil_pixels)).permute(0, 3, 1, 2).contiguous()
            pixels[torch.from_numpy(rank[to_pil]).to(self.device)] = normalize(host.to(self.device))
        return pixels

    def _warn_fallback(self, paths: list[str], error: RuntimeError) -> None:
        if self._warned_fallback:
            return
        self._warned_fallback = True
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"DALI could not decode a batch of {len(paths)} images that PIL reads (among {paths[:3]}): "
            f"{first[:200]}; PIL decoded them instead (said once per backend)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _decode(self, datas, sizes, ok: np.ndarray, plan: CropPlan) -> torch.Tensor:
        idx = np.flatnonzero(ok)
        if len(idx) == 0:
            return torch.empty((0, 3, self.image_size, self.image_size), device=self.device)
        boxes, flips = plan.subset(idx).boxes(np.asarray([sizes[i] for i in idx]), self.image_size)
        encoded = [np.frombuffer(datas[i], dtype=np.uint8) for i in idx]
        return self._run(encoded, boxes, flips).to(self.device)

    def close(self) -> None:
        self._pipe = None
        super().close()


def _probe_sizes(
    paths: Sequence[str], datas: Sequence[bytes | None]
) -> tuple[list[tuple[int, int] | None], list[tuple[str, str]]]:
    """(the size of each image read from its header, None for one that is unreadable, truncated or not an
    image; (path, why) of each of those)."""
    sizes: list[tuple[int, int] | None] = []
    failures: list[tuple[str, str]] = []
    for p, d in zip(paths, datas):
        try:
            if d is not None and jpeg_truncated(d):  # checked here: nvJPEG's handling is not PIL's
                raise ValueError("truncated JPEG: the data ends before the end-of-image marker")
            sizes.append(None if d is None else probe_size(d, p))
        except PIL_DECODE_ERRORS as e:
            sizes.append(None)
            failures.append((p, decode_error(e)))
        if d is None:
            failures.append((p, "file not readable"))
    return sizes, failures


def _pil_probe(data: bytes) -> str | None:
    import io

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except PIL_DECODE_ERRORS as e:
        return decode_error(e)
    return None


def dali_format(data: bytes) -> bool:
    """Whether ``data`` starts like a format DALI's image decoder reads (JPEG, PNG, BMP, TIFF, PNM,
    JPEG 2000, WebP); anything else (GIF, ...) is decoded by PIL."""
    head = data[:16]
    return (
        head[:2] == b"\xff\xd8"
        or head[:8] == b"\x89PNG\r\n\x1a\n"
        or head[:2] == b"BM"
        or head[:4] in (b"II*\x00", b"MM\x00*")
        or (len(head) > 2 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace())
        or head[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n"
        or head[:4] == b"\xffO\xffQ"
        or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    )


def _pil_one(data: bytes, plan: CropPlan, image_size: int) -> np.ndarray | str:
    """(S, S, 3) uint8 of one image decoded and resampled by PIL (the reference), or why it failed."""
    try:
        image = pil_image(data)
    except PIL_DECODE_ERRORS as e:
        return decode_error(e)
    boxes, flips = plan.boxes(np.asarray([[image.height, image.width]]), image_size)
    return np.asarray(pil_resample(image, boxes[0], bool(flips[0]), image_size))
