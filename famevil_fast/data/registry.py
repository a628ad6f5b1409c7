"""The product datasets in one table: name, directory under the data root, split files, split aliases,
reader and split-file lookup of each, and the name of FashionViL's pre-training union.

Every module that needs one of these facts (``tasks``, ``fashionall``, ``cache``, ``attributes``) reads it
from here; each dataset's facts themselves live with its reader (FashionGen's in ``fashiongen``, the
catalogues' in their :class:`~famevil_fast.data.records.CatalogueFormat`). This module imports only the
readers, so any module of the package may import it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from famevil_fast.data import bigfacad, fashion200k, fashiongen, polyvore
from famevil_fast.data.records import CatalogueFormat, Product

Reader = Callable[[str | os.PathLike, str], list[Product]]  # (data root, split) -> products
UNION = "fashionall"  # FashionViL's pre-training union of the product datasets (famevil_fast.data.fashionall)


@dataclass(frozen=True)
class ProductDataset:
    """One product dataset: ``name`` (e.g. "fashiongen"), ``directory`` under the data root, the ``splits``
    it has files for, ``aliases`` (a split read from another's file, e.g. Fashion200k "val" = "test"), its
    reader and its split-file lookup (``(dataset directory, split file)``, aliases applied)."""

    name: str
    directory: str
    splits: tuple[str, ...]
    aliases: Mapping[str, str]
    read: Reader
    split_file: Callable[[str | os.PathLike, str], tuple[Path, Path]]


def _catalogue(fmt: CatalogueFormat, read: Reader) -> ProductDataset:
    return ProductDataset(fmt.dataset, fmt.name, fmt.splits, fmt.aliases, read, fmt.split_file)


# in union order: a product's union id is k * 2**40 + id, k its dataset's position here (FashionGen first)
PRODUCT: dict[str, ProductDataset] = {
    d.name: d
    for d in (
        ProductDataset(
            "fashiongen",
            fashiongen.DIRECTORY,
            fashiongen.SPLITS,
            fashiongen.SPLIT_ALIASES,
            fashiongen.read_fashiongen,
            fashiongen.fashiongen_split_file,
        ),
        _catalogue(fashion200k.FORMAT, fashion200k.read_fashion200k),
        _catalogue(polyvore.FORMAT, polyvore.read_polyvore_outfits),
        _catalogue(bigfacad.FORMAT, bigfacad.read_bigfacad),
    )
}
PRODUCT_DATASETS: tuple[str, ...] = tuple(PRODUCT)
DIRECTORIES: dict[str, str] = {d: p.directory for d, p in PRODUCT.items()}
READERS: dict[str, Reader] = {d: p.read for d, p in PRODUCT.items()}
SPLITS: dict[str, tuple[str, ...]] = {d: p.splits for d, p in PRODUCT.items()}
