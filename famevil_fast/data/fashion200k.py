"""Fashion200k reader: ``Fashion200k/{train,test}_info.json`` products (text = title only).

Fashion200k has no validation split; "val" reads the test file. Products carry no sub-category.
"""

from __future__ import annotations

import os

from famevil_fast.data.records import Product, dataset_dir, load_json_list, relative_prefix, require_keys


def read_fashion200k(root: str | os.PathLike, split: str) -> list[Product]:
    """Products of ``split`` ("train", "test"; "val" = "test") under ``root`` (or ``root/Fashion200k``)."""
    split = "test" if split == "val" else split
    if split not in ("train", "test"):
        raise ValueError(f"Fashion200k: split must be 'train' or 'test', got {split!r}")
    directory = dataset_dir(root, "Fashion200k", f"{split}_info.json")
    path = directory / f"{split}_info.json"
    prefix = relative_prefix(root, directory)
    products = []
    for i, row in enumerate(load_json_list(path, "Fashion200k")):
        require_keys(row, ("images", "id", "title"), path, i)
        images = [row["images"]] if isinstance(row["images"], str) else list(row["images"])
        if not images:
            raise ValueError(f"{path}: entry {i} (id {row['id']}) has no images")
        products.append(
            Product(
                id=int(row["id"]),
                images=tuple(prefix + p for p in images),
                text=str(row["title"]),
                attributes_id=tuple(int(a) for a in row.get("attributes_id", ())),
            )
        )
    return products
