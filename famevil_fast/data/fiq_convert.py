"""Builds FashionIQ validation caption files with gallery rows from the raw FashionIQ release.

The FAME-ViL loader reads ``captions/cap.<cat>.val.json`` rows that carry ``target_id`` (gallery id),
``fake_data`` and ``garment_class``; those files were distributed privately. The gallery of a category is
``image_splits/split.<cat>.val.json`` (plus any target missing from it); every gallery image gets one
``fake_data`` row so that the evaluation sees the whole gallery, and every real triplet gets the gallery id
of its target. Raw files are kept as ``cap.<cat>.val.raw.json`` when converting in place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

FIQ_CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")


def fashioniq_val_rows(raw_rows: Sequence[dict], gallery: Sequence[str], garment_class: int) -> list[dict]:
    """Real triplets with ``target_id`` followed by one ``fake_data`` row per gallery image.

    Gallery ids are positions in ``gallery``; targets absent from it are appended in order of appearance.
    """
    ids: dict[str, int] = {}
    for name in gallery:
        ids.setdefault(name, len(ids))
    rows = []
    for i, row in enumerate(raw_rows):
        if not isinstance(row, dict):
            raise ValueError(f"FashionIQ val row {i} is {row!r}, expected an object")
        missing = [k for k in ("candidate", "target", "captions") if k not in row]
        if missing:
            raise ValueError(f"FashionIQ val row {i} lacks {missing}: {row}")
        captions = row["captions"]
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise ValueError(f"FashionIQ val row {i}: captions must be a list of strings, got {captions!r}")
        if row.get("fake_data"):
            continue
        target_id = ids.setdefault(row["target"], len(ids))
        rows.append(
            {
                "candidate": row["candidate"],
                "target": row["target"],
                "captions": list(row["captions"]),
                "target_id": target_id,
                "fake_data": False,
                "garment_class": garment_class,
            }
        )
    for name, target_id in ids.items():
        rows.append(
            {
                "candidate": name,
                "target": name,
                "captions": ["", ""],
                "target_id": target_id,
                "fake_data": True,
                "garment_class": garment_class,
            }
        )
    return rows


def _load(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"FashionIQ conversion: missing file {path}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"FashionIQ conversion: {path} is not valid UTF-8 JSON ({e})") from e


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


def convert_fashioniq_val(
    fiq_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    categories: Sequence[str] = FIQ_CATEGORIES,
) -> dict[str, int]:
    """Rewrite ``captions/cap.<cat>.val.json`` of ``fiq_dir`` (or write to ``out_dir``) in the gallery format.

    Reads the raw triplets from ``cap.<cat>.val.raw.json`` when present (an earlier in-place conversion),
    else from ``cap.<cat>.val.json``. Returns the gallery size per category.
    """
    fiq = Path(fiq_dir)
    _check_fashioniq_dir(fiq)
    out = Path(out_dir) if out_dir is not None else fiq / "captions"
    if out.exists() and not out.is_dir():
        raise ValueError(f"FashionIQ conversion: the output {out} is a file; give a directory")
    sizes = {}
    for cat in categories:
        if cat not in FIQ_CATEGORIES:
            raise ValueError(f"unknown FashionIQ category {cat!r}; expected one of {FIQ_CATEGORIES}")
        gallery_path = fiq / "image_splits" / f"split.{cat}.val.json"
        gallery = _load(gallery_path)
        raw_path = fiq / "captions" / f"cap.{cat}.val.raw.json"
        src = raw_path if raw_path.is_file() else fiq / "captions" / f"cap.{cat}.val.json"
        raw = _load(src)
        for path, data in ((src, raw), (gallery_path, gallery)):
            if not isinstance(data, list):
                raise ValueError(
                    f"FashionIQ conversion: {path} must hold a JSON list, got {type(data).__name__}"
                )
        try:
            rows = fashioniq_val_rows(raw, gallery, FIQ_CATEGORIES.index(cat))
        except ValueError as e:
            raise ValueError(f"FashionIQ conversion: {src}: {e}") from None
        out.mkdir(parents=True, exist_ok=True)  # only once the inputs have been read
        dest = out / f"cap.{cat}.val.json"
        if dest.resolve() == src.resolve() and not raw_path.exists():
            os.replace(src, raw_path)
        tmp = dest.with_name(dest.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(rows, f)
        os.replace(tmp, dest)
        sizes[cat] = sum(1 for r in rows if r["fake_data"])
    return sizes
