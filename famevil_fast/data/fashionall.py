"""FashionViL's pre-training set ``fashionall``: the union of four datasets' train splits, validated on
FashionGen val.

The authors' union holds BigFACAD 164,555 + FashionGen 60,147 + Fashion200k 76,856 + PolyvoreOutfits 71,967
= 373,408 training products. Here the train split of every one of the four whose directory lies under the
data root with its ``train_info.json`` takes part (``FashionGen/``, ``Fashion200k/``, ``PolyvoreOutfits/``,
``BigFACAD/``, as the FashionViL README lays them out); one warning names the missing ones, and no
dataset at all is a ``FileNotFoundError`` naming what was looked for. "val" (and "test") is FashionGen's val
split. Each product keeps its own reader's text, views and ``attributes_id`` (the four files index one
2,232-entry pseudo-attribute vocabulary, so the union's attribute ids stay meaningful as they are).

Product ids: every dataset numbers its own products and the numbers collide across datasets. In the union a
product's id is ``union_id(dataset, id) = k * 2**40 + id``, ``k`` the dataset's position in
:data:`UNION_DATASETS` (FashionGen first, so FashionGen products, and the val split, keep their ids), and
:func:`union_source` maps it back. These ids are what the union's records, tables (``product_ids``), attribute
files (PAC's lookup) and loaders carry, so they are unique wherever a product id is a key; a source id
outside ``[0, 2**40)`` is refused naming the file. Records keep their reader's name in ``Product.dataset``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from famevil_fast.data.fashiongen import fashiongen_split_file, read_fashiongen
from famevil_fast.data.records import Product
from famevil_fast.data.registry import DIRECTORIES, PRODUCT_DATASETS, READERS
from famevil_fast.data.registry import UNION as NAME

UNION_DATASETS: tuple[str, ...] = PRODUCT_DATASETS  # the union takes every product dataset, in this order
VALIDATION = "fashiongen"  # the union's val split is FashionGen val
ID_BITS = 40
ID_STRIDE = 1 << ID_BITS

_log = logging.getLogger(__name__)


def union_id(dataset: str, product_id: int) -> int:
    """The id of product ``product_id`` of ``dataset`` in the union (``k * 2**40 + id``)."""
    if dataset not in UNION_DATASETS:
        raise ValueError(f"{NAME}: unknown dataset {dataset!r}; expected one of {UNION_DATASETS}")
    if not 0 <= product_id < ID_STRIDE:
        raise ValueError(
            f"{NAME}: {DIRECTORIES[dataset]} product id {product_id} is outside [0, 2**{ID_BITS}), the range "
            "each dataset's ids must keep in the union"
        )
    return UNION_DATASETS.index(dataset) * ID_STRIDE + int(product_id)


def union_source(uid: int) -> tuple[str, int]:
    """(dataset, its own product id) of a union id."""
    k, pid = divmod(int(uid), ID_STRIDE)
    if not 0 <= k < len(UNION_DATASETS):
        raise ValueError(f"{NAME}: {uid} is not a union product id")
    return UNION_DATASETS[k], pid


@dataclass(frozen=True)
class UnionPart:
    """One dataset's split in the union: its name, the split file read and its number of products."""

    dataset: str
    path: Path
    products: int


@dataclass(frozen=True)
class FashionAll:
    """The union's products of one split, the parts they came from and the datasets not found."""

    root: str
    split: str
    products: list[Product]
    parts: tuple[UnionPart, ...]
    absent: tuple[str, ...] = ()  # e.g. "BigFACAD/ (no such directory)"

    def describe(self) -> str:
        """E.g. "fashionall train: FashionGen 60,147 + Fashion200k 76,856 = 137,003 products; not found
        under ROOT: PolyvoreOutfits/ (no such directory), ..."."""
        parts = " + ".join(f"{DIRECTORIES[p.dataset]} {p.products:,}" for p in self.parts)
        text = f"{NAME} {self.split}: {parts} = {len(self.products):,} products"
        if self.absent:
            text += f"; not found under {self.root}: {', '.join(self.absent)}"
        return text


def _ids_in_union(products: list[Product], dataset: str, path: Path) -> list[Product]:
    out = []
    for p in products:
        try:
            uid = union_id(dataset, p.id)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        out.append(p if uid == p.id else dataclasses.replace(p, id=uid))
    return out


def _case_hints(base: Path) -> str:
    if not base.is_dir():
        return f"; {base} does not exist"
    wanted = {d.lower(): d for d in DIRECTORIES.values()}
    near = [
        f"{p.name} (must be named {wanted[p.name.lower()]})"
        for p in sorted(base.iterdir())
        if p.is_dir() and p.name.lower() in wanted and p.name != wanted[p.name.lower()]
    ]
    hint = f"; found {', '.join(near)}: names are case-sensitive" if near else ""
    if (base / "train_info.json").is_file():
        hint += f"; {base} holds a train_info.json itself: give the data root above the dataset directories"
    return hint


def load_fashionall(root: str | os.PathLike, split: str = "train") -> FashionAll:
    """The union's ``split``: "train" = the train splits of the four datasets found under ``root``; "val" /
    "test" = FashionGen val. Ids are union ids (module docstring).

    FileNotFoundError when none of the four is found (train) or FashionGen val is missing (val)."""
    base = Path(root)
    if split in ("val", "test"):
        try:
            _, path = fashiongen_split_file(root, split)
            products = read_fashiongen(root, split)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{NAME} is validated on FashionGen val, which is missing: {e}") from e
        products = _ids_in_union(products, VALIDATION, path)
        return FashionAll(os.fspath(root), "val", products, (UnionPart(VALIDATION, path, len(products)),))
    if split != "train":
        raise ValueError(f"{NAME}: split must be 'train', 'val' or 'test', got {split!r}")
    products: list[Product] = []
    parts: list[UnionPart] = []
    absent: list[str] = []
    for dataset in UNION_DATASETS:
        name = DIRECTORIES[dataset]
        directory = base / name
        path = directory / "train_info.json"
        if not directory.is_dir():
            absent.append(f"{name}/ (no such directory)")
            continue
        if not path.is_file():
            absent.append(f"{name}/train_info.json (file not found)")
            continue
        rows = _ids_in_union(READERS[dataset](root, "train"), dataset, path)
        products += rows
        parts.append(UnionPart(dataset, path, len(rows)))
    if not parts:
        looked = ", ".join(f"{base / DIRECTORIES[d] / 'train_info.json'}" for d in UNION_DATASETS)
        raise FileNotFoundError(
            f"{NAME}: none of its four datasets is under {base} (looked for {looked}){_case_hints(base)}. "
            "fashionall is the union of the train splits of FashionGen/, Fashion200k/, PolyvoreOutfits/ and "
            "BigFACAD/ under one data root (docs/data.md)"
        )
    return FashionAll(os.fspath(root), "train", products, tuple(parts), tuple(absent))


def read_fashionall(root: str | os.PathLike, split: str = "train") -> list[Product]:
    """The products of :func:`load_fashionall`; the union's composition is logged (INFO), and a training
    union that lacks some of the four datasets says which in one warning."""
    union = load_fashionall(root, split)
    _log.info(union.describe())
    if union.absent:
        warnings.warn(union.describe(), UserWarning, stacklevel=2)
    return union.products
