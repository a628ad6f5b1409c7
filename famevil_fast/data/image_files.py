"""Image files as a model's input: :func:`load_images` decodes them with the evaluation transform (resize,
centre crop, CLIP normalisation) into one batch of pixels, as ``famevil-fast embed``, ``caption``, ``search``
and the evaluator see them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from famevil_fast.data.transforms import check_eval_resize, reference_transform

PathLike = str | Path


def load_images(
    paths: PathLike | Sequence[PathLike], size: int, eval_resize: str = "keep_aspect"
) -> torch.Tensor:
    """(N, 3, size, size) float32 CLIP-normalised pixels of the image files ``paths`` (one path or a
    sequence), in order, by the evaluation transform: a resize to R = round(size * 256 / 224), then the
    centre size x size crop. ``eval_resize`` chooses the resize: "keep_aspect", the shorter side to R (the
    aspect kept), or "squash", the whole image to R x R (see ``famevil_fast.data.transforms``). A missing
    file raises FileNotFoundError; a file that is not a readable image, or one of more than twice
    ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (PIL's DecompressionBombError: raise that limit to read it),
    ValueError; each names the file."""
    from PIL import Image, UnidentifiedImageError

    from famevil_fast.data.backends.pil_backend import pixel_limit_message

    files = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    if not files:
        raise ValueError("load_images: no image paths given")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"load_images: size must be a positive int (pixels), got {size!r}")
    check_eval_resize(eval_resize)
    pixels = []
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"image file not found: {f}")
        if f.is_dir():
            raise ValueError(f"load_images: {f} is a directory, not an image file")
        try:
            with Image.open(f) as image:
                image.load()
                pixels.append(reference_transform(image, size, eval_resize=eval_resize))
        except Image.DecompressionBombError as exc:  # not an OSError
            raise ValueError(f"cannot read image {f}: {pixel_limit_message(exc)}") from exc
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {f}: {exc}") from exc
    return torch.stack(pixels)
