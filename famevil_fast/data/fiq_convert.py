"""Builds FashionIQ validation caption files with gallery rows from the raw FashionIQ release.

The FAME-ViL loader reads ``captions/cap.<cat>.val.json`` rows that carry ``target_id`` (gallery id),
``fake_data`` and ``garment_class``; those files were distributed privately. The gallery of a category is
``image_splits/split.<cat>.val.json`` (plus any target missing from it); every gallery image gets one
``fake_data`` row so that the evaluation sees the whole gallery, and every real triplet gets the gallery id
of its target. Raw files are kept as ``cap.<cat>.val.raw.json`` when converting in place.

Every input is checked before anything is renamed or written: gallery entries are image names (strings),
caption rows hold a non-empty ``candidate`` and ``target`` and ``captions``, a list of two strings; a
ValueError names the source file and the entry otherwise. Image names are written without ".jpg" (the
reader appends it): a name that already ends in ".jpg" loses that one suffix, so ``B00.jpg`` and ``B00``
are the same gallery image.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from famevil_fast.data.image_paths import clean_image_path
from famevil_fast.files import atomic_write_json

FIQ_CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")


def _where(file: str | os.PathLike | None, what: str) -> str:
    return f"{file}: {what}" if file is not None else what


def image_name(name: str) -> str:
    """FashionIQ image name ``name`` without one trailing ".jpg" (the readers append it)."""
    return name[: -len(".jpg")] if name.endswith(".jpg") else name


def _name(value: object, where: str) -> str:
    """``value`` as an image name without ".jpg"; ValueError naming ``where`` unless it is a string that
    names a file."""
    if not isinstance(value, str):
        raise ValueError(f"{where} is {value!r}, expected an image name (a string)")
    name = image_name(value)
    if not clean_image_path(name):
        raise ValueError(f"{where} has no image name ({value!r})")
    return name


def gallery_names(gallery: Sequence[object], gallery_file: str | os.PathLike | None = None) -> list[str]:
    """The image names of an ``image_splits`` list; ValueError naming ``gallery_file`` and the entry for one
    that is not a non-empty string."""
    return [_name(v, _where(gallery_file, f"gallery entry {i}")) for i, v in enumerate(gallery)]


def raw_triplet(row: object, i: int, raw_file: str | os.PathLike | None = None) -> dict:
    """Raw caption row ``i`` with its names without ".jpg"; ValueError naming ``raw_file`` and the entry
    unless it is an object with a non-empty ``candidate`` and ``target`` and two string ``captions``."""
    where = _where(raw_file, f"FashionIQ val row {i}")
    if not isinstance(row, dict):
        raise ValueError(f"{where} is {row!r}, expected an object")
    missing = [k for k in ("candidate", "target", "captions") if k not in row]
    if missing:
        raise ValueError(f"{where} lacks {missing}: {row}")
    captions = row["captions"]
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: captions must be a list of strings, got {captions!r}")
    if len(captions) != 2:
        raise ValueError(f"{where}: captions holds {len(captions)} strings, expected 2")
    names = {k: _name(row[k], f"{where}: {k}") for k in ("candidate", "target")}
    return {**row, **names, "captions": list(captions)}


def fashioniq_val_rows(
    raw_rows: Sequence[object],
    gallery: Sequence[object],
    garment_class: int,
    raw_file: str | os.PathLike | None = None,
    gallery_file: str | os.PathLike | None = None,
) -> list[dict]:
    """Real triplets with ``target_id`` followed by one ``fake_data`` row per gallery image.

    Gallery ids are positions in ``gallery``; targets absent from it are appended in order of appearance.
    Every row and gallery entry is checked first (:func:`raw_triplet`, :func:`gallery_names`; errors name
    ``raw_file`` / ``gallery_file`` when given)."""
    names = gallery_names(gallery, gallery_file)
    triplets = [raw_triplet(row, i, raw_file) for i, row in enumerate(raw_rows)]
    ids: dict[str, int] = {}
    for name in names:
        ids.setdefault(name, len(ids))
    rows = []
    for row in triplets:
        if row.get("fake_data"):
            continue
        target_id = ids.setdefault(row["target"], len(ids))
        rows.append(_row(row["candidate"], row["target"], row["captions"], target_id, False, garment_class))
    for name, target_id in ids.items():
        rows.append(_row(name, name, ["", ""], target_id, True, garment_class))
    return rows


def _row(candidate: str, target: str, captions: list, target_id: int, fake: bool, garment_class: int) -> dict:
    return {
        "candidate": candidate,
        "target": target,
        "captions": list(captions),
        "target_id": target_id,
        "fake_data": fake,
        "garment_class": garment_class,
    }


def _load(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"FashionIQ conversion: missing file {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"FashionIQ conversion: {path} is not valid UTF-8 JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"FashionIQ conversion: {path} must hold a JSON list, got {type(data).__name__}")
    return data


def _check_fashioniq_dir(fiq: Path) -> None:
    """FileNotFoundError unless ``fiq`` holds captions/, naming what it is instead: missing, not a
    directory, or a data root whose FashionIQ/ subdirectory is the one meant."""
    if not fiq.exists():
        raise FileNotFoundError(f"FashionIQ conversion: {fiq} does not exist")
    if not fiq.is_dir():
        raise FileNotFoundError(f"FashionIQ conversion: {fiq} is not a directory")
    if not (fiq / "captions").is_dir():
        hint = f" (give {fiq / 'FashionIQ'})" if (fiq / "FashionIQ" / "captions").is_dir() else ""
        raise FileNotFoundError(f"FashionIQ conversion: {fiq} holds no captions/ directory{hint}")


def _converted(fiq: Path, cat: str) -> tuple[Path, Path, list[dict]]:
    """(caption file read, where a raw file is kept, gallery-format rows) of category ``cat``, every input
    checked."""
    if cat not in FIQ_CATEGORIES:
        raise ValueError(f"unknown FashionIQ category {cat!r}; expected one of {FIQ_CATEGORIES}")
    gallery_path = fiq / "image_splits" / f"split.{cat}.val.json"
    raw_path = fiq / "captions" / f"cap.{cat}.val.raw.json"
    src = raw_path if raw_path.is_file() else fiq / "captions" / f"cap.{cat}.val.json"
    gallery = _load(gallery_path)
    raw = _load(src)
    try:
        return src, raw_path, fashioniq_val_rows(raw, gallery, FIQ_CATEGORIES.index(cat), src, gallery_path)
    except ValueError as e:
        raise ValueError(f"FashionIQ conversion: {e}") from None


def convert_fashioniq_val(
    fiq_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    categories: Sequence[str] = FIQ_CATEGORIES,
) -> dict[str, int]:
    """Rewrite ``captions/cap.<cat>.val.json`` of ``fiq_dir`` (or write to ``out_dir``) in the gallery format.

    Reads the raw triplets from ``cap.<cat>.val.raw.json`` when present (an earlier in-place conversion),
    else from ``cap.<cat>.val.json``. Every category's files are read and checked before any file is
    renamed or written. Returns the gallery size per category.
    """
    fiq = Path(fiq_dir)
    _check_fashioniq_dir(fiq)
    out = Path(out_dir) if out_dir is not None else fiq / "captions"
    if out.exists() and not out.is_dir():
        raise ValueError(f"FashionIQ conversion: the output {out} is a file; give a directory")
    converted = {cat: _converted(fiq, cat) for cat in categories}
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs have been read
    for cat, (src, raw_path, rows) in converted.items():
        dest = out / f"cap.{cat}.val.json"
        if dest.resolve() == src.resolve() and not raw_path.exists():  # keep the raw file it overwrites
            os.replace(src, raw_path)
        atomic_write_json(dest, rows)
    return {cat: sum(1 for r in rows if r["fake_data"]) for cat, (_, _, rows) in converted.items()}
