"""BigFACAD reader: ``BigFACAD/{train,val,test}_info.json`` products.

A row holds ``images`` (a list of paths, or a single path string), ``id``, ``color``, ``title``,
``description`` and optionally ``attributes_id`` (FashionViL's pseudo-attribute ids, indices into the
2,232-entry vocabulary the four pre-training datasets share). The text is
``color + "." + title + "." + description`` exactly as stored (no space added or stripped), as the official
loader builds it (FashionViL's ``BigFACADDatabase``:
``item["color"] + "." + item["title"] + "." + item["description"]``; the spec's "text =
color.title.description"). A row's image paths are relative to ``BigFACAD/images`` (paths that start with
"images/" are relative to ``BigFACAD/``; :func:`~famevil_fast.data.records.image_paths`). Products carry no
(sub-)category.
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

NAME = "BigFACAD"
SPLITS = ("train", "val", "test")
_KEYS = ("images", "id", "color", "title", "description")
_KINDS = {
    "images": STR_OR_STRS,
    "id": INT,
    "color": STR,
    "title": STR,
    "description": STR,
    "attributes_id": INTS,
}
_SOURCE = "BigFACAD/{train,val,test}_info.json are FashionViL's pre-processed files (its README)"
_FORMAT = (
    "a BigFACAD row holds images, id, color, title and description (attributes_id optional), as in "
    "FashionViL's {train,val,test}_info.json"
)


def bigfacad_split_file(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(dataset directory, split file) of ``split`` ("train", "val", "test") under ``root``."""
    if split not in SPLITS:
        raise ValueError(f"{NAME}: split must be one of {SPLITS}, got {split!r}")
    directory = dataset_dir(root, NAME, f"{split}_info.json")
    return directory, directory / f"{split}_info.json"


def read_bigfacad(root: str | os.PathLike, split: str) -> list[Product]:
    """Products of ``split`` ("train", "val", "test") under ``root`` (or ``root/BigFACAD``).

    ValueError naming the file, entry and field for a row that lacks a key, holds a value of the wrong type
    or repeats a product id."""
    directory, path = bigfacad_split_file(root, split)
    prefix = relative_prefix(root, directory)
    rows = load_json_list(path, NAME, _SOURCE)
    products = [_product(row, path, i, prefix) for i, row in enumerate(rows)]
    reject_duplicate_ids([p.id for p in products], path)
    return products


def _product(row: object, path: Path, i: int, prefix: str) -> Product:
    row = check_types(require_keys(row, _KEYS, path, i, _FORMAT), _KINDS, path, i)
    images = [row["images"]] if isinstance(row["images"], str) else row["images"]
    if not images or not all(images):
        raise ValueError(f"{entry_name(path, i, row)} has no images")
    return Product(
        id=row["id"],
        images=image_paths(images, prefix, "images"),
        text=f"{row['color']}.{row['title']}.{row['description']}",
        attributes_id=tuple(row.get("attributes_id", ())),
        dataset="bigfacad",
    )
