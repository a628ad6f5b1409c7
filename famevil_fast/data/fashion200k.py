"""Fashion200k reader: ``Fashion200k/{train,test}_info.json`` products (text = title only).

Fashion200k has no validation split; "val" reads the test file. Products carry no sub-category. A row's
image paths are relative to ``Fashion200k/images``, as in the official loader (paths that start with
"images/" are relative to ``Fashion200k/``).
"""

from __future__ import annotations

import os

from famevil_fast.data.records import IDS, INT, STR, STR_OR_STRS, CatalogueFormat, Product

FORMAT = CatalogueFormat(
    name="Fashion200k",
    dataset="fashion200k",
    splits=("train", "test"),
    keys=("images", "id", "title"),
    kinds={"images": STR_OR_STRS, "id": INT, "title": STR, "attributes_id": IDS},
    text=lambda row: row["title"],
    row_format="a Fashion200k row holds images, id and title (attributes_id optional), as in FashionViL's "
    "{train,test}_info.json",
    aliases={"val": "test"},  # Fashion200k has no validation split
)


def read_fashion200k(root: str | os.PathLike, split: str) -> list[Product]:
    """Products of ``split`` ("train", "test"; "val" = "test") under ``root`` (or ``root/Fashion200k``).
    Rows are checked, and image paths resolved, as :meth:`~famevil_fast.data.records.CatalogueFormat.read`
    describes."""
    return FORMAT.read(root, split)
