"""PIL backend: decode, crop-resize and flip with Pillow on a thread pool (the reference behaviour)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

from famevil_fast.data.backends.base import ImageBackend, Loaded
from famevil_fast.data.transforms import CropPlan, pil_resample, to_rgb

# what PIL raises for data it cannot decode, or will not: an image of more pixels than
# ``PIL.Image.MAX_IMAGE_PIXELS`` (DecompressionBombError, not an OSError)
PIL_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def pixel_limit_message(e: BaseException) -> str:
    """What a DecompressionBombError means and how to read the image anyway (every reader says it so)."""
    return f"it exceeds PIL's pixel limit ({str(e).rstrip('.')}); raise PIL.Image.MAX_IMAGE_PIXELS to read it"


def decode_error(e: BaseException) -> str:
    """A failed decode as one line: the exception's type, then its message."""
    if isinstance(e, Image.DecompressionBombError):
        return f"{type(e).__name__}: {pixel_limit_message(e)}"
    return f"{type(e).__name__}: {e}"


def pil_image(data: bytes) -> Image.Image:
    """The 8-bit RGB PIL image of encoded ``data`` (16-bit samples scaled as
    :func:`~famevil_fast.data.transforms.to_rgb` does).

    Raises one of :data:`PIL_DECODE_ERRORS` when the data cannot be decoded.
    """
    with Image.open(io.BytesIO(data)) as im:
        return to_rgb(im)


class PILBackend(ImageBackend):
    name = "pil"

    def _one(self, rel: str, plan: CropPlan, i: int) -> np.ndarray | str:
        try:
            with Image.open(self.path(rel)) as im:
                im = to_rgb(im)
        except PIL_DECODE_ERRORS as e:
            return decode_error(e)
        boxes, flips = plan.subset(np.asarray([i])).boxes(
            np.asarray([[im.height, im.width]]), self.image_size
        )
        return np.asarray(pil_resample(im, boxes[0], bool(flips[0]), self.image_size))

    def load(self, paths: Sequence[str], plan: CropPlan) -> Loaded:
        results = list(self.pool.map(lambda a: self._one(a[1], plan, a[0]), enumerate(paths)))
        failures = [(p, r) for p, r in zip(paths, results) if isinstance(r, str)]
        loaded = self._from_host([None if isinstance(r, str) else r for r in results])
        loaded.failures = failures
        return loaded
