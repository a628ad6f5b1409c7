"""FashionIQ reader: ``FashionIQ/captions/cap.<cat>.<split>.json`` triplets, images in ``FashionIQ/images``.

Image names get ".jpg" appended. Train rows need candidate, target, captions; their ``target_id`` is the
position of the target name among the sorted image names of the split (all loaded categories
together). Val rows must carry
``target_id``, ``fake_data`` and ``garment_class`` (build them with ``famevil-fast convert-fiq``); the
gallery of a category is the set of distinct target ids over all its val rows, fake rows included.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from famevil_fast.data.fiq_convert import FIQ_CATEGORIES
from famevil_fast.data.records import Triplet, dataset_dir, load_json_list, relative_prefix, require_keys


def _category_rows(root: str | os.PathLike, split: str, category: str):
    directory = dataset_dir(root, "FashionIQ", "captions")
    path = directory / "captions" / f"cap.{category}.{split}.json"
    return directory, path, load_json_list(path, "FashionIQ")


def read_fashioniq(
    root: str | os.PathLike, split: str, categories: Sequence[str] = FIQ_CATEGORIES
) -> list[Triplet]:
    """Triplets of ``split`` ("train", "val"; "test" = "val") for ``categories``, fake rows included."""
    split = "val" if split == "test" else split
    if split not in ("train", "val"):
        raise ValueError(f"FashionIQ: split must be 'train', 'val' or 'test', got {split!r}")
    unknown = [c for c in categories if c not in FIQ_CATEGORIES]
    if unknown:
        raise ValueError(f"FashionIQ: unknown categories {unknown}; expected a subset of {FIQ_CATEGORIES}")
    loaded = [(c, *_category_rows(root, split, c)) for c in categories]  # every file checked before any work
    names = sorted({r[k] for _, _, _, rows in loaded for r in rows for k in ("candidate", "target")})
    ids = {n: i for i, n in enumerate(names)} if split == "train" else {}
    out: list[Triplet] = []
    for category, directory, path, rows in loaded:
        prefix = relative_prefix(root, directory) + "images/"
        cat_id = FIQ_CATEGORIES.index(category)
        keys = ("candidate", "target", "captions") + (("target_id", "fake_data") if split == "val" else ())
        for i, row in enumerate(rows):
            try:
                require_keys(row, keys, path, i)
            except ValueError as e:
                if split == "val":
                    raise ValueError(
                        f"{e}; convert raw FashionIQ val files with `famevil-fast convert-fiq`"
                    ) from None
                raise
            if len(row["captions"]) != 2:
                raise ValueError(f"{path}: entry {i} has {len(row['captions'])} captions, expected 2")
        for row in rows:
            target_id = int(row["target_id"]) if split == "val" else ids[row["target"]]
            out.append(
                Triplet(
                    candidate=f"{prefix}{row['candidate']}.jpg",
                    target=f"{prefix}{row['target']}.jpg",
                    captions=(str(row["captions"][0]), str(row["captions"][1])),
                    category=cat_id,
                    target_id=target_id,
                    fake_data=bool(row.get("fake_data", False)),
                )
            )
    return out
