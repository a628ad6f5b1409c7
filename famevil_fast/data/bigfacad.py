"""BigFACAD reader: ``BigFACAD/{train,val,test}_info.json`` products.

A row holds ``images`` (a list of paths, or a single path string), ``id``, ``color``, ``title``,
``description`` and optionally ``attributes_id`` (FashionViL's pseudo-attribute ids, indices into the
2,232-entry vocabulary the four pre-training datasets share). The text is
``color + "." + title + "." + description`` exactly as stored (no space added or stripped), as the official
loader builds it (FashionViL's ``BigFACADDatabase``). A row's image paths are relative to
``BigFACAD/images`` (paths that start with "images/" are relative to ``BigFACAD/``;
:func:`~famevil_fast.data.image_paths.image_paths`). Products carry no (sub-)category.
"""

from __future__ import annotations

import os

from famevil_fast.data.records import IDS, INT, STR, STR_OR_STRS, CatalogueFormat, Product

FORMAT = CatalogueFormat(
    name="BigFACAD",
    dataset="bigfacad",
    splits=("train", "val", "test"),
    keys=("images", "id", "color", "title", "description"),
    kinds={
        "images": STR_OR_STRS,
        "id": INT,
        "color": STR,
        "title": STR,
        "description": STR,
        "attributes_id": IDS,
    },
    text=lambda row: f"{row['color']}.{row['title']}.{row['description']}",
    row_format="a BigFACAD row holds images, id, color, title and description (attributes_id optional), as "
    "in FashionViL's {train,val,test}_info.json",
)


def read_bigfacad(root: str | os.PathLike, split: str) -> list[Product]:
    """Products of ``split`` ("train", "val", "test") under ``root`` (or ``root/BigFACAD``).
    Rows are checked, and image paths resolved, as :meth:`~famevil_fast.data.records.CatalogueFormat.read`
    describes."""
    return FORMAT.read(root, split)
