"""FashionGen reader: ``FashionGen/{train,val}_info.json`` products with their image views.

Each product becomes a :class:`~famevil_fast.data.records.Product` with text = title + "." + description
(no space), its category and sub-category ids and its attribute ids; image paths are stored relative to
the data root. The test split is the val split.
"""

from __future__ import annotations

import os
from pathlib import Path

from famevil_fast.data.records import Product, dataset_dir, load_json_list, relative_prefix, require_keys

NUM_SUBCATEGORIES = 121
_KEYS = ("images", "id", "title", "description", "subcategory_id")


def fashiongen_split_file(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    split = "val" if split == "test" else split
    if split not in ("train", "val"):
        raise ValueError(f"FashionGen: split must be 'train', 'val' or 'test', got {split!r}")
    directory = dataset_dir(root, "FashionGen", f"{split}_info.json")
    return directory, directory / f"{split}_info.json"


def read_fashiongen(root: str | os.PathLike, split: str) -> list[Product]:
    """Products of ``split`` ("train", "val"; "test" = "val") under ``root`` (or ``root/FashionGen``)."""
    directory, path = fashiongen_split_file(root, split)
    prefix = relative_prefix(root, directory)
    rows = load_json_list(path, "FashionGen")
    products = []
    for i, row in enumerate(rows):
        require_keys(row, _KEYS, path, i)
        images = row["images"]
        if isinstance(images, str):
            images = [images]
        if not images:
            raise ValueError(f"{path}: entry {i} (id {row['id']}) has no images")
        sub = int(row["subcategory_id"])
        if not 0 <= sub < NUM_SUBCATEGORIES:
            raise ValueError(
                f"{path}: entry {i} has subcategory_id {sub}, expected 0..{NUM_SUBCATEGORIES - 1}"
            )
        products.append(
            Product(
                id=int(row["id"]),
                images=tuple(prefix + p for p in images),
                text=f"{row['title']}.{row['description']}",
                category_id=int(row.get("category_id", -1)),
                subcategory_id=sub,
                attributes_id=tuple(int(a) for a in row.get("attributes_id", ())),
            )
        )
    return products
