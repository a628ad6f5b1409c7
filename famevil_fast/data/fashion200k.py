"""Fashion200k reader: ``Fashion200k/{train,test}_info.json`` products (text = title only).

Fashion200k has no validation split; "val" reads the test file. Products carry no sub-category. A row's
image paths are relative to ``Fashion200k/images``, as in the official loader (paths that start with
"images/" are relative to ``Fashion200k/``).
"""

from __future__ import annotations

import os
from pathlib import Path

from famevil_fast.data.records import (
    INT,
    INTS,
    STR,
    STR_OR_STRS,
    Product,
    check_types,
    dataset_dir,
    entry_name,
    image_paths,
    load_json_list,
    reject_duplicate_ids,
    relative_prefix,
    require_keys,
)

_KEYS = ("images", "id", "title")
_KINDS = {"images": STR_OR_STRS, "id": INT, "title": STR, "attributes_id": INTS}
_SOURCE = "Fashion200k/{train,test}_info.json are FashionViL's pre-processed files (its README)"
_FORMAT = (
    "a Fashion200k row holds images, id and title (attributes_id optional), as in FashionViL's "
    "{train,test}_info.json"
)


def read_fashion200k(root: str | os.PathLike, split: str) -> list[Product]:
    """Products of ``split`` ("train", "test"; "val" = "test") under ``root`` (or ``root/Fashion200k``).

    ValueError naming the file, entry and field for a row that lacks a key, holds a value of the wrong type
    or repeats a product id."""
    split = "test" if split == "val" else split
    if split not in ("train", "test"):
        raise ValueError(f"Fashion200k: split must be 'train' or 'test', got {split!r}")
    directory = dataset_dir(root, "Fashion200k", f"{split}_info.json")
    path = directory / f"{split}_info.json"
    prefix = relative_prefix(root, directory)
    products = [
        _product(row, path, i, prefix) for i, row in enumerate(load_json_list(path, "Fashion200k", _SOURCE))
    ]
    reject_duplicate_ids([p.id for p in products], path)
    return products


def _product(row: object, path: Path, i: int, prefix: str) -> Product:
    row = check_types(require_keys(row, _KEYS, path, i, _FORMAT), _KINDS, path, i)
    images = [row["images"]] if isinstance(row["images"], str) else row["images"]
    if not images:
        raise ValueError(f"{entry_name(path, i, row)} has no images")
    return Product(
        id=row["id"],
        images=image_paths(images, prefix, "images"),
        text=row["title"],
        attributes_id=tuple(row.get("attributes_id", ())),
        dataset="fashion200k",
    )
