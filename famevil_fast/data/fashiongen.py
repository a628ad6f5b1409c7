"""FashionGen reader: ``FashionGen/{train,val}_info.json`` products with their image views.

Each product becomes a :class:`~famevil_fast.data.records.Product` with text = title + "." + description
(no space), its category and sub-category ids and its attribute ids. A row's image paths are relative to
the split's image folder, ``FashionGen/train`` or ``FashionGen/val``, as in the official loader (paths that
start with "train/" or "val/" are relative to ``FashionGen/``); records store them relative to the data
root (backslashes read as "/", an absolute path under the data root made relative to it, one elsewhere
refused; a view listed twice kept once: :func:`~famevil_fast.data.image_paths.image_paths`,
:class:`~famevil_fast.data.records.ViewPaths`). The test split is the val split (files and images).
"""

from __future__ import annotations

import os
from pathlib import Path

from famevil_fast.data.records import (
    IDS,
    INT,
    STR,
    STR_OR_STRS,
    Product,
    ViewPaths,
    check_types,
    dataset_dir,
    entry_name,
    load_json_list,
    read_once,
    reject_duplicate_ids,
    relative_prefix,
    require_keys,
)

NUM_SUBCATEGORIES = 121
DIRECTORY = "FashionGen"  # under the data root
SPLITS = ("train", "val")  # its split files
SPLIT_ALIASES = {"test": "val"}  # the test split is the val split (files and images)
_KEYS = ("images", "id", "title", "description", "subcategory_id")
_FORMAT = (
    "a FashionGen row holds images, id, title, description and subcategory_id (category_id and "
    "attributes_id optional), as in FashionViL's {train,val}_info.json"
)
_SOURCE = (
    "FashionGen/{train,val}_info.json are FashionViL's pre-processed files (its README); "
    "`famevil-fast make-synthetic DIR` writes a dataset in the same format"
)
_KINDS = {
    "images": STR_OR_STRS,
    "id": INT,
    "title": STR,
    "description": STR,
    "subcategory_id": INT,
    "category_id": INT,
    "attributes_id": IDS,
}


def _split_name(split: str) -> str:
    name = SPLIT_ALIASES.get(split, split)
    if name not in SPLITS:
        *first, last = (repr(s) for s in (*SPLITS, *SPLIT_ALIASES))
        choices = f"{', '.join(first)} or {last}"
        raise ValueError(f"{DIRECTORY}: split must be {choices}, got {split!r}")
    return name


def fashiongen_split_file(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    split = _split_name(split)
    directory = dataset_dir(root, DIRECTORY, f"{split}_info.json")
    return directory, directory / f"{split}_info.json"


def read_fashiongen(root: str | os.PathLike, split: str) -> list[Product]:
    """Products of ``split`` ("train", "val"; "test" = "val") under ``root`` (or ``root/FashionGen``).

    ValueError naming the file, entry and field for a row that lacks a key, holds a value of the wrong type
    (ids are integers, texts strings, images a string or a list of strings), has an absolute image path
    outside the data root or repeats a product id. A view listed twice is kept once (one
    :class:`~famevil_fast.data.records.DuplicateViewsWarning` per file)."""
    directory, path = fashiongen_split_file(root, split)
    prefix, folder = relative_prefix(root, directory), _split_name(split)
    key = ("fashiongen", prefix, folder, os.path.abspath(root))
    return read_once(path, key, lambda: _read(path, ViewPaths(path, root, prefix, folder)))


def _read(path: Path, views: ViewPaths) -> list[Product]:
    rows = load_json_list(path, "FashionGen", _SOURCE)
    products = [_product(row, path, i, views) for i, row in enumerate(rows)]
    reject_duplicate_ids([p.id for p in products], path)
    views.warn()
    return products


def _product(row: object, path: Path, i: int, views: ViewPaths) -> Product:
    row = check_types(require_keys(row, _KEYS, path, i, _FORMAT), _KINDS, path, i)
    images = views(row, i)
    sub = row["subcategory_id"]
    if not 0 <= sub < NUM_SUBCATEGORIES:
        raise ValueError(
            f"{entry_name(path, i, row)} has subcategory_id {sub}, expected 0..{NUM_SUBCATEGORIES - 1}"
        )
    return Product(
        id=row["id"],
        images=images,
        text=f"{row['title']}.{row['description']}",
        category_id=row.get("category_id", -1),
        subcategory_id=sub,
        attributes_id=tuple(row.get("attributes_id", ())),
        dataset="fashiongen",
    )
