"""The records every reader produces: products (FashionGen, Fashion200k) and triplets (FashionIQ).

Image paths in records are relative to the data root the reader was given, so the same record resolves to
a file on disk or to an entry of a pre-decoded cache built from that root.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Product:
    """One catalogue product: its views and the text the tasks use (FashionGen: title + "." + description)."""

    id: int
    images: tuple[str, ...]
    text: str
    category_id: int = -1
    subcategory_id: int = -1
    attributes_id: tuple[int, ...] = ()


@dataclass(frozen=True)
class Triplet:
    """One FashionIQ row: reference image, target image, two modification captions.

    ``target_id`` is the gallery id of the target (val: from the file; train: position of the target name
    in the sorted image names of the split). ``fake_data`` rows only add their target to the gallery.
    """

    candidate: str
    target: str
    captions: tuple[str, str]
    category: int
    target_id: int
    fake_data: bool = False

    @property
    def text(self) -> str:
        return ", ".join(self.captions)


def load_json_list(path: Path, what: str) -> list:
    """The JSON list in ``path``; FileNotFoundError / ValueError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{what}: {path} must hold a JSON list, got {type(data).__name__}")
    return data


def require_keys(row: object, keys: tuple[str, ...], path: Path, index: int) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{path}: entry {index} is a {type(row).__name__}, expected an object")
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{path}: entry {index} lacks {missing}")
    return row


def dataset_dir(root: str | os.PathLike, name: str, marker: str) -> Path:
    """``root/name`` if it exists, else ``root`` if it holds ``marker``; FileNotFoundError otherwise."""
    base = Path(root)
    if (base / name).is_dir():
        return base / name
    if (base / marker).exists():
        return base
    raise FileNotFoundError(f"{name}: no dataset under {base} (looked for {base / name} and {base / marker})")


def relative_prefix(root: str | os.PathLike, directory: Path) -> str:
    rel = os.path.relpath(directory, root)
    return "" if rel == "." else rel.replace(os.sep, "/") + "/"
