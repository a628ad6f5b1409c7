"""Shared builders for the data tests: one tiny synthetic dataset per parameter set and session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

_BUILT: dict[tuple, Path] = {}


def synthetic(
    tmp_path_factory: pytest.TempPathFactory,
    products: int = 40,
    image_size: int = 48,
    seed: int = 0,
    fiq_images: int | None = None,
) -> Path:
    """A synthetic dataset shared by every test of the session that asks for the same parameters."""
    from famevil_fast.data.synthetic.generate import make_synthetic

    key = (products, image_size, seed, fiq_images)
    if key not in _BUILT:
        root = tmp_path_factory.mktemp(f"synthetic_{products}_{image_size}_{seed}")
        make_synthetic(
            root, products=products, seed=seed, image_size=image_size, fiq_images=fiq_images, workers=1
        )
        _BUILT[key] = root
    return _BUILT[key]


def noise_image(
    path: Path, height: int, width: int, seed: int = 0, smooth: bool = False, **save
) -> np.ndarray:
    """Write a random RGB image (optionally low-pass: blocky noise upsampled) and return its pixels."""
    rng = np.random.default_rng(seed)
    if smooth:
        small = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC))
    else:
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, **save)
    return np.asarray(Image.open(path).convert("RGB"))


def fashiongen_row(pid: int, images: list[str], sub: int = 0, cat: int | None = None) -> dict:
    """One FashionGen info row (text "t" / "d"); ``category_id`` only when ``cat`` is given."""
    row = {"images": images, "id": pid, "title": "t", "description": "d", "subcategory_id": sub}
    if cat is not None:
        row["category_id"] = cat
    return row


def small_fashiongen_root(tmp_path: Path, n: int = 12) -> Path:
    """``tmp_path/data``: a FashionGen train split of ``n`` products with two smooth noise images each
    (product ``i`` of ``20 + i`` x ``30 - i`` pixels), for the cache tests."""
    import json

    rows = []
    for i in range(n):
        views = [f"train/{i}_{v}.png" for v in range(2)]
        for v, view in enumerate(views):
            noise_image(tmp_path / "data" / "FashionGen" / view, 20 + i, 30 - i, seed=10 * i + v, smooth=True)
        rows.append(
            {"images": views, "id": i, "title": f"item {i}", "description": "plain", "subcategory_id": i}
        )
    (tmp_path / "data" / "FashionGen" / "train_info.json").write_text(json.dumps(rows))
    return tmp_path / "data"
