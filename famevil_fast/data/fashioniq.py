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
from pathlib import Path

from famevil_fast.data.fiq_convert import FIQ_CATEGORIES
from famevil_fast.data.records import (
    BOOL,
    INT,
    STR,
    STRS,
    Triplet,
    check_types,
    dataset_dir,
    entry_name,
    load_json_list,
    relative_prefix,
    require_keys,
)

_KINDS = {"candidate": STR, "target": STR, "captions": STRS, "target_id": INT, "fake_data": BOOL}
_TRAIN_KINDS = {k: v for k, v in _KINDS.items() if k != "target_id"}  # train ids come from the names


def _category_rows(root: str | os.PathLike, split: str, category: str):
    directory = dataset_dir(root, "FashionIQ", "captions")
    path = directory / "captions" / f"cap.{category}.{split}.json"
    return directory, path, load_json_list(path, "FashionIQ")


def _check_row(row: object, path: Path, i: int, split: str) -> dict:
    keys = ("candidate", "target", "captions") + (("target_id", "fake_data") if split == "val" else ())
    try:
        row = require_keys(row, keys, path, i)
    except ValueError as e:
        if split == "val" and isinstance(row, dict):
            raise ValueError(
                f"{e}; convert raw FashionIQ val files with `famevil-fast convert-fiq`"
            ) from None
        raise
    check_types(row, _KINDS if split == "val" else _TRAIN_KINDS, path, i)
    if len(row["captions"]) != 2:
        raise ValueError(f"{entry_name(path, i)} has {len(row['captions'])} captions, expected 2")
    return row


def _check_gallery(rows: list[dict], path: Path) -> None:
    """Val rows: one target_id per target image and one image per target_id (else the gallery would hold an
    image twice, or an id would stand for two images)."""
    by_name: dict[str, tuple[int, int]] = {}
    by_id: dict[int, tuple[int, str]] = {}
    for i, row in enumerate(rows):
        name, tid = row["target"], row["target_id"]
        j, other_id = by_name.setdefault(name, (i, tid))
        if other_id != tid:
            raise ValueError(
                f"{path}: entries {j} and {i} give target {name!r} different target_ids ({other_id}, {tid})"
            )
        j, other_name = by_id.setdefault(tid, (i, name))
        if other_name != name:
            raise ValueError(
                f"{path}: entries {j} and {i} give target_id {tid} to different targets "
                f"({other_name!r}, {name!r})"
            )


def read_fashioniq(
    root: str | os.PathLike, split: str, categories: Sequence[str] = FIQ_CATEGORIES
) -> list[Triplet]:
    """Triplets of ``split`` ("train", "val"; "test" = "val") for ``categories``, fake rows included.

    Every row is checked before any is used: ValueError naming the file, entry and field for a missing key
    or a value of the wrong type (names and captions are strings, two captions, ``target_id`` an integer,
    ``fake_data`` true or false), and for val rows that give one target two ids or one id two targets."""
    split = "val" if split == "test" else split
    if split not in ("train", "val"):
        raise ValueError(f"FashionIQ: split must be 'train', 'val' or 'test', got {split!r}")
    unknown = [c for c in categories if c not in FIQ_CATEGORIES]
    if unknown:
        raise ValueError(f"FashionIQ: unknown categories {unknown}; expected a subset of {FIQ_CATEGORIES}")
    loaded = [(c, *_category_rows(root, split, c)) for c in categories]  # every file checked before any work
    for _, _, path, rows in loaded:
        for i, row in enumerate(rows):
            _check_row(row, path, i, split)
        if split == "val":
            _check_gallery(rows, path)
    names = sorted({r[k] for _, _, _, rows in loaded for r in rows for k in ("candidate", "target")})
    ids = {n: i for i, n in enumerate(names)} if split == "train" else {}
    out: list[Triplet] = []
    for category, directory, _, rows in loaded:
        prefix = relative_prefix(root, directory) + "images/"
        cat_id = FIQ_CATEGORIES.index(category)
        for row in rows:
            out.append(
                Triplet(
                    candidate=f"{prefix}{row['candidate']}.jpg",
                    target=f"{prefix}{row['target']}.jpg",
                    captions=(row["captions"][0], row["captions"][1]),
                    category=cat_id,
                    target_id=row["target_id"] if split == "val" else ids[row["target"]],
                    fake_data=row.get("fake_data", False),
                )
            )
    return out
