"""FashionIQ reader: ``FashionIQ/captions/cap.<cat>.<split>.json`` triplets, images in ``FashionIQ/images``.

Image names get ".jpg" appended (a name that already ends in ".jpg" is taken as the file name) and are
relative to ``FashionIQ/images``: backslashes are read as "/", and an absolute name is made relative to
``FashionIQ/images`` when it lies there and refused naming the file, the entry and the name otherwise (as the
product readers' paths: :func:`~famevil_fast.data.image_paths.image_paths`); ".." components are resolved
(``sub/../a`` is ``a``) and a name that climbs out of ``FashionIQ/images`` through them, or that names no
file (``""``, ``"./"``, ``"sub/.."``), is refused likewise. Train rows need candidate, target, captions;
their ``target_id`` is the position of the target name among the sorted image names of the split (all
loaded categories together).
Val rows must also carry ``target_id`` and ``fake_data`` (build them with ``famevil-fast convert-fiq``, which
also writes the ``garment_class`` of the official files; it is not read); the gallery of a category is the
set of distinct target ids over all its val rows, fake rows included. A split none of whose files holds a
triplet (a row without ``fake_data``) is refused naming its files.
"""

from __future__ import annotations

import os
import posixpath
import warnings
from collections.abc import Sequence
from pathlib import Path

from famevil_fast.data.fiq_convert import FIQ_CATEGORIES, image_name
from famevil_fast.data.image_paths import clean_image_path, is_absolute_image_path, path_inside
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
    if not path.is_file() and (directory / path.name).is_file():
        raise FileNotFoundError(
            f"FashionIQ: file not found: {path}; {directory / path.name} exists: the caption files belong "
            f"in {directory / 'captions'}/ (the layout is FashionIQ/{{captions,images,image_splits}})"
        )
    hint = "the FashionIQ release's captions/cap.<category>.<split>.json, one file per category"
    if split == "val":
        hint += f"; then add the gallery rows with `famevil-fast convert-fiq {directory}`"
    return directory, path, load_json_list(path, "FashionIQ", hint)


_GALLERY_KEYS = ("target_id", "fake_data")


def _check_row(row: object, path: Path, i: int, split: str) -> dict:
    keys = ("candidate", "target", "captions") + (_GALLERY_KEYS if split == "val" else ())
    if split == "val" and isinstance(row, dict) and any(k not in row for k in _GALLERY_KEYS):
        fiq = path.parent.parent
        raise ValueError(
            f"{entry_name(path, i, row)} lacks {[k for k in keys if k not in row]}: FashionIQ val rows carry "
            "the gallery fields target_id and fake_data, which the raw FashionIQ release does not have; "
            f"add them (and the gallery rows) with `famevil-fast convert-fiq {fiq}`"
        )
    row = require_keys(row, keys, path, i, "a FashionIQ row holds candidate, target and captions")
    check_types(row, _KINDS if split == "val" else _TRAIN_KINDS, path, i)
    if len(row["captions"]) != 2:
        raise ValueError(f"{entry_name(path, i)} has {len(row['captions'])} captions, expected 2")
    return row


def _image_names(row: dict, path: Path, i: int, images: Path) -> dict:
    """``row`` with its candidate and target names relative to the image folder ``images`` (backslashes read
    as "/", an absolute name inside ``images`` made relative to it, one trailing ".jpg" dropped, ".."
    components resolved); ValueError naming the file, entry and key for an absolute name elsewhere, a name
    that climbs out of ``images`` or one left empty."""
    out = dict(row)
    for key in ("candidate", "target"):
        name = clean_image_path(row[key])
        if is_absolute_image_path(name):
            inside = path_inside(name, images)
            if inside is None:
                raise ValueError(
                    f"{entry_name(path, i, row)}: {key} {row[key]!r} is absolute and not under {images}; "
                    "FashionIQ rows name images relative to FashionIQ/images, without .jpg"
                )
            name = inside
        name = image_name(name)
        if ".." in name.split("/"):
            name = posixpath.normpath(name)
            if name == ".." or name.startswith("../"):
                raise ValueError(
                    f"{entry_name(path, i, row)}: {key} {row[key]!r} climbs out of {images} through '..'; "
                    "FashionIQ rows name images relative to FashionIQ/images, without .jpg"
                )
        if not name or name == ".":
            raise ValueError(
                f"{entry_name(path, i, row)} has no image path ({key} holds {row[key]!r}); FashionIQ rows "
                "name images relative to FashionIQ/images, without .jpg"
            )
        out[key] = name
    return out


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


def _warn_without_gallery_rows(rows: list[dict], path: Path, category: str, directory: Path) -> None:
    """A val file without any ``fake_data`` row evaluates against the queries' own targets only, a smaller
    gallery than the reference's whole val split (inflated recall): warn, naming the fix."""
    if not rows or any(row["fake_data"] for row in rows):
        return
    targets = len({row["target"] for row in rows})
    warnings.warn(
        f"{path} has no fake_data rows, so the {category} gallery holds only the {targets} targets of its "
        f"queries, not every image of image_splits/split.{category}.val.json as in the reference protocol; "
        f"rebuild it from the raw captions with `famevil-fast convert-fiq {directory}`",
        stacklevel=3,
    )


def _check_not_empty(loaded: list[tuple], split: str) -> None:
    """ValueError naming the caption files of ``split`` when none holds a triplet (a row without
    ``fake_data``), as the product readers do for a split with no products."""
    if any(not row.get("fake_data", False) for *_, rows in loaded for row in rows):
        return
    files = ", ".join(str(path) for _, _, path, _ in loaded)
    raise ValueError(f"FashionIQ: no {split} triplets (rows without fake_data) in {files}")


def read_fashioniq(
    root: str | os.PathLike,
    split: str,
    categories: Sequence[str] = FIQ_CATEGORIES,
    allow_empty: bool = False,
) -> list[Triplet]:
    """Triplets of ``split`` ("train", "val"; "test" = "val") for ``categories``, fake rows included.

    Every row is checked before any is used: ValueError naming the file, entry and field for a missing key
    or a value of the wrong type (names and captions are strings, two captions, ``target_id`` an integer,
    ``fake_data`` true or false), for an empty image name, for val rows that give one target two ids or one
    id two targets, and naming the caption files when none holds a triplet (unless ``allow_empty``)."""
    split = "val" if split == "test" else split
    if split not in ("train", "val"):
        raise ValueError(f"FashionIQ: split must be 'train', 'val' or 'test', got {split!r}")
    unknown = [c for c in categories if c not in FIQ_CATEGORIES]
    if unknown:
        raise ValueError(f"FashionIQ: unknown categories {unknown}; expected a subset of {FIQ_CATEGORIES}")
    loaded = [(c, *_category_rows(root, split, c)) for c in categories]  # every file checked before any work
    for k, (category, directory, path, rows) in enumerate(loaded):
        rows = [
            _image_names(_check_row(r, path, i, split), path, i, directory / "images")
            for i, r in enumerate(rows)
        ]
        loaded[k] = (category, directory, path, rows)
        if split == "val":
            _check_gallery(rows, path)
    if not allow_empty:
        _check_not_empty(loaded, split)
    if split == "val":
        for category, directory, path, rows in loaded:
            _warn_without_gallery_rows(rows, path, category, directory)
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
