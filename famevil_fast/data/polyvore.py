"""PolyvoreOutfits reader: ``PolyvoreOutfits/{train,val,test}_info.json`` products (one image each).

A row holds ``images`` (a single path string; a list of strings is read as the product's views), ``id``,
``title``, ``description`` and optionally ``attributes_id`` (FashionViL's pseudo-attribute ids, indices into
the 2,232-entry vocabulary the four pre-training datasets share). The text is
``title + "." + description`` exactly as stored (no space added or stripped), as FashionGen's and as the
official loader (FashionViL's ``PolyvoreOutfitsDatabase``: ``item["title"] + "." + item["description"]``,
``image_path = [item["images"]]``). A row's image path is relative to ``PolyvoreOutfits/images`` (a path that
starts with "images/" is relative to ``PolyvoreOutfits/``;
:func:`~famevil_fast.data.image_paths.image_paths`). The outfit files of the OCIR task (``ocir_*.json``) are
not read. Products carry no (sub-)category.
"""

from __future__ import annotations

import os

from famevil_fast.data.records import IDS, INT, STR, STR_OR_STRS, CatalogueFormat, Product

FORMAT = CatalogueFormat(
    name="PolyvoreOutfits",
    dataset="polyvoreoutfits",
    splits=("train", "val", "test"),
    keys=("images", "id", "title", "description"),
    kinds={"images": STR_OR_STRS, "id": INT, "title": STR, "description": STR, "attributes_id": IDS},
    text=lambda row: f"{row['title']}.{row['description']}",
    row_format="a PolyvoreOutfits row holds images (one path), id, title and description (attributes_id "
    "optional), as in FashionViL's {train,val,test}_info.json",
)


def read_polyvore_outfits(root: str | os.PathLike, split: str) -> list[Product]:
    """Products of ``split`` ("train", "val", "test") under ``root`` (or ``root/PolyvoreOutfits``).
    Rows are checked, and image paths resolved, as :meth:`~famevil_fast.data.records.CatalogueFormat.read`
    describes."""
    return FORMAT.read(root, split)
