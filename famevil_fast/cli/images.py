"""Reading user-given image files for the inference commands (eval crop, CLIP normalisation)."""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def collect_images(paths: list[str]) -> list[Path]:
    """Files as given, and the image files inside given folders (sorted); a missing path is an error."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"image path not found: {p}")
        if p.is_dir():
            found.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            found.append(p)
    if not found:
        raise ValueError(f"no images found in {paths}")
    return found


def load_pixels(files: list[Path], image_size: int, eval_resize: str = "keep_aspect") -> torch.Tensor:
    """(N, 3, S, S) normalised pixels by the evaluation transform (its resize chosen by ``eval_resize``); a
    file that is not a readable image raises ValueError naming it."""
    from PIL import Image, UnidentifiedImageError

    from famevil_fast.data.transforms import reference_transform

    out = []
    for f in files:
        try:
            with Image.open(f) as image:
                image.load()
                out.append(reference_transform(image, image_size, eval_resize=eval_resize))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {f}: {exc}") from exc
    return torch.stack(out)
