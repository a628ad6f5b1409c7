"""Sample tables: what one sample of each task and split is, as flat arrays the loaders index into.

A :class:`SampleTable` lists, per sample, the image choices of each image slot (a product's views, from
which training draws one at random) and the per-sample tensors (token ids, ids, labels). Tables are built
from the reader records; images already known to be missing are dropped here with one summarising warning.

Train tables: ``itc`` / ``scr`` / ``cap`` = one sample per product (random view), ``tgir`` = one sample per
real triplet. Eval tables follow the evaluation protocols (docs/evaluation.md): every view is a sample for XMR
images, SCR and FIC; XMR texts are one per product; TGIR has per category a query table and a gallery table
of distinct target ids (fake rows included).

Product datasets: ``fashiongen`` (every product task), ``fashion200k``, ``polyvoreoutfits``, ``bigfacad`` and
the pre-training union ``fashionall`` (their train splits; val = FashionGen val, ``data.fashionall``) for
``itc`` and the pre-training objectives (``data.pretrain``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from famevil_fast.data.cache import ImageCache
from famevil_fast.data.fashionall import read_fashionall
from famevil_fast.data.fashiongen import fashiongen_split_file
from famevil_fast.data.fashioniq import read_fashioniq
from famevil_fast.data.fiq_convert import FIQ_CATEGORIES
from famevil_fast.data.images import SkippedImages, missing_files
from famevil_fast.data.records import Product, Triplet
from famevil_fast.data.registry import DIRECTORIES, PRODUCT, PRODUCT_DATASETS, READERS, UNION
from famevil_fast.data.tokens import tokenize_texts

TASKS: tuple[str, ...] = ("itc", "tgir", "scr", "cap")
DEFAULT_DATASET = {"itc": "fashiongen", "scr": "fashiongen", "cap": "fashiongen", "tgir": "fashioniq"}
ITC_DATASETS = PRODUCT_DATASETS + (UNION,)  # what itc and the pre-training objectives can read
_READERS = {**READERS, UNION: read_fashionall}


@dataclass
class SampleTable:
    """Per-sample image choices (per slot) and tensors of one task split.

    ``distinct_views`` = (first, second): in training, slot ``second`` draws a view other than the one slot
    ``first`` drew (the same view, cropped and flipped independently, when a sample has only one)."""

    name: str
    slots: tuple[str, ...]
    images: dict[str, list[tuple[str, ...]]]
    fields: dict[str, torch.Tensor]
    texts: list[str] = field(default_factory=list)
    distinct_views: tuple[str, str] | None = None

    def __len__(self) -> int:
        if self.slots:
            return len(self.images[self.slots[0]])
        return len(next(iter(self.fields.values())))

    def subset(self, keep: np.ndarray) -> SampleTable:
        idx = np.flatnonzero(keep)
        t = torch.from_numpy(idx)
        return SampleTable(
            self.name,
            self.slots,
            {s: [v[i] for i in idx] for s, v in self.images.items()},
            {k: v[t] for k, v in self.fields.items()},
            [self.texts[i] for i in idx] if self.texts else [],
            self.distinct_views,
        )


def check_task(task: str, dataset: str | None) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    dataset = dataset or DEFAULT_DATASET[task]
    allowed = ("fashioniq",) if task == "tgir" else (ITC_DATASETS if task == "itc" else ("fashiongen",))
    if dataset not in allowed:
        raise ValueError(f"task {task!r} reads {allowed}, not {dataset!r}")
    return dataset


def read_products(
    dataset: str, root: str | os.PathLike, split: str, allow_empty: bool = False
) -> list[Product]:
    """The products of ``dataset`` (one of ``ITC_DATASETS``) / ``split``; ValueError naming the split file
    when it holds none (unless ``allow_empty``)."""
    reader = _READERS.get(dataset)
    if reader is None:
        raise ValueError(f"unknown product dataset {dataset!r}; expected one of {ITC_DATASETS}")
    products = reader(root, split)
    if not products and not allow_empty:
        raise ValueError(f"{dataset}: no products in {_split_file(dataset, root, split)}")
    return products


def _split_file(dataset: str, root: str | os.PathLike, split: str) -> os.PathLike | str:
    if dataset == UNION and split != "train":
        return fashiongen_split_file(root, split)[1]
    if dataset == UNION:
        names = ", ".join(f"{d}/train_info.json" for d in DIRECTORIES.values())
        return f"{names} under {root}"
    return PRODUCT[dataset].split_file(root, split)[1]


def product_datasets_under(root: str | os.PathLike) -> list[str]:
    """The product datasets (``PRODUCT_DATASETS``) whose split files a data root holds, each file read as
    one dataset only: those whose directory lies under ``root``; else, when ``root`` is itself a dataset
    directory, the one it is named after; else (a dataset directory of another name, whose split files
    every reader would take for its own) the one its rows' keys say: FashionGen when a row holds
    ``subcategory_id`` (or no split file can be told apart: the documented default), Fashion200k when it
    holds only Fashion200k's keys; a directory whose rows are neither (PolyvoreOutfits and BigFACAD rows
    hold a description, which Fashion200k rows do not) is refused with a ValueError saying to name it."""
    base = Path(root)
    present = [d for d in PRODUCT_DATASETS if (base / DIRECTORIES[d]).is_dir()]
    if present:
        return present
    named = [d for d in PRODUCT_DATASETS if base.resolve().name == DIRECTORIES[d]]
    return named or [_dataset_of_rows(base)]


_FASHION200K_KEYS = frozenset(("images", "id", "title", "attributes_id"))


def _dataset_of_rows(directory: Path) -> str:
    """The dataset ("fashiongen" or "fashion200k") of the first row of ``directory``'s first split file
    (FashionGen rows hold ``subcategory_id``, Fashion200k rows nothing beyond ``_FASHION200K_KEYS``);
    "fashiongen" when there is no row to look at; ValueError for rows of neither."""
    for split in ("train", "val", "test"):
        path = directory / f"{split}_info.json"
        if not path.is_file():
            continue
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return "fashiongen"  # its reader names what is wrong with the file
        if isinstance(rows, list) and rows and isinstance(rows[0], dict):
            if "subcategory_id" in rows[0]:
                return "fashiongen"
            other = sorted(set(rows[0]) - _FASHION200K_KEYS)
            if other:
                guess = "bigfacad" if "color" in rows[0] else "polyvoreoutfits"
                like = (
                    f" (they look like {DIRECTORIES[guess]} rows: PolyvoreOutfits rows hold a description, "
                    "BigFACAD rows also a color)"
                    if "description" in rows[0]
                    else ""
                )
                raise ValueError(
                    f"{directory} is not named after a dataset ({', '.join(DIRECTORIES.values())}) and the "
                    f"rows of {path} hold {other}, which neither FashionGen nor Fashion200k rows hold{like}; "
                    f"name the directory after its dataset (e.g. {directory.parent / DIRECTORIES[guess]}), "
                    "or give the data root that holds it under that name (docs/data.md)"
                )
            return "fashion200k"
    return "fashiongen"


def tokenize_products(
    products: Sequence[Product], cache_dir: str | os.PathLike | None = None
) -> torch.Tensor:
    """Token ids of the products' texts, tokenised per run of products of one dataset: a union table's
    runs are its datasets' own text lists, whose token files ``famevil-fast cache`` writes."""
    runs = []
    start = 0
    for i in range(1, len(products) + 1):
        if i == len(products) or products[i].dataset != products[start].dataset:
            runs.append(tokenize_texts([p.text for p in products[start:i]], cache_dir))
            start = i
    return torch.cat(runs) if len(runs) > 1 else (runs[0] if runs else tokenize_texts([], cache_dir))


def _ids(values: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(list(values), dtype=torch.int64)


# ------------------------------------------------------------------------------------------ missing files


def open_image_cache(cache: ImageCache | str | os.PathLike | None) -> ImageCache | None:
    """``cache`` opened (index only, no checksums) when it is a directory; None stays None."""
    if cache is None or isinstance(cache, ImageCache):
        return cache
    return ImageCache(cache, verify=False)


def _missing(
    root: str | os.PathLike, paths: list[str], cache: ImageCache | None, what: str, total: int
) -> set[str]:
    """The ``paths`` without an image (not a file under ``root``, or not in ``cache`` when given), reported in
    one warning."""
    if cache is None:
        missing = missing_files(root, paths)
        reasons = dict.fromkeys(missing, "file not found")
    else:
        key = cache.key_function(root)
        keys = {p: key(p) for p in paths}
        missing = {p for p, k in keys.items() if k is None or k not in cache}
        outside = "outside the data root the cache was built from"
        reasons = {p: outside if keys[p] is None else cache.reason_missing(keys[p]) for p in missing}
    skipped = SkippedImages(what)
    for p in sorted(missing):
        skipped.add(p, reasons[p])
    skipped.report(total=total)
    return missing


def drop_missing_products(
    products: list[Product],
    root: str | os.PathLike,
    what: str,
    cache: ImageCache | str | os.PathLike | None = None,
) -> list[Product]:
    """``products`` without the views that have no image file (or, with ``cache``, no cache entry); products
    left without views are dropped, ValueError when none is left."""
    paths = [p for prod in products for p in prod.images]
    cache = open_image_cache(cache)
    missing = _missing(root, paths, cache, what, len(paths))
    if not missing:
        return products
    out = []
    for prod in products:
        views = tuple(v for v in prod.images if v not in missing)
        if views:
            out.append(dataclasses.replace(prod, images=views))
    if products and not out:
        raise ValueError(
            f"{what}: none of the {len(paths)} images of its products is found {_where(root, cache, missing)}"
        )
    return out


_IMAGE_FOLDERS = (
    "the image paths of a split file are relative to its image folder: FashionGen/train, FashionGen/val, "
    "Fashion200k/images, PolyvoreOutfits/images, BigFACAD/images, FashionIQ/images/<name>.jpg (docs/data.md)"
)


def _where(root: str | os.PathLike, cache: ImageCache | None, missing: set[str]) -> str:
    """Where images were looked for, with one missing path (for the error when none is found)."""
    example = sorted(missing)[0]
    if cache is not None:
        return f"in the image cache {cache.path} (e.g. {example})"
    return f"under {root} (e.g. {os.path.join(root, example)}); {_IMAGE_FOLDERS}"


def drop_missing_triplets(
    triplets: list[Triplet],
    root: str | os.PathLike,
    what: str,
    cache: ImageCache | str | os.PathLike | None = None,
) -> list[Triplet]:
    """``triplets`` without those whose target (or, unless fake, reference) has no image file (or, with
    ``cache``, no cache entry); ValueError when none of their images is found."""
    paths = sorted({p for t in triplets for p in (t.candidate, t.target)})
    cache = open_image_cache(cache)
    missing = _missing(root, paths, cache, what, len(paths))
    if not missing:
        return triplets
    if len(missing) == len(paths):
        raise ValueError(
            f"{what}: none of the {len(paths)} images of its triplets is found {_where(root, cache, missing)}"
        )
    out = []
    for t in triplets:
        if t.target in missing:
            continue
        if t.candidate in missing and not t.fake_data:
            continue
        out.append(t)
    return out


# ------------------------------------------------------------------------------------------ train tables


def _checked_cache(
    image_cache: ImageCache | str | os.PathLike | bool | None, cache_dir: str | os.PathLike | None
) -> ImageCache | str | os.PathLike | None:
    if image_cache is None or image_cache is True:
        return cache_dir
    return None if image_cache is False else image_cache  # (an empty ImageCache is falsy)


def train_table(
    task: str,
    root: str | os.PathLike,
    split: str = "train",
    dataset: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    categories: Sequence[str] = FIQ_CATEGORIES,
    image_cache: ImageCache | str | os.PathLike | bool | None = None,
) -> SampleTable:
    """The training table of ``task`` (see the module docstring).

    ``check_files`` drops samples whose image is missing: from ``image_cache`` when the images come from a
    cache (None, the default: ``cache_dir``, if given; False: the files under ``root``)."""
    dataset = check_task(task, dataset)
    cache = open_image_cache(_checked_cache(image_cache, cache_dir)) if check_files else None
    if task == "tgir":
        triplets = [t for t in read_fashioniq(root, split, categories) if not t.fake_data]
        if check_files:
            triplets = drop_missing_triplets(triplets, root, f"FashionIQ {split}", cache)
        texts = [t.text for t in triplets]
        return SampleTable(
            f"tgir/{split}",
            ("ref_pixels", "target_pixels"),
            {
                "ref_pixels": [(t.candidate,) for t in triplets],
                "target_pixels": [(t.target,) for t in triplets],
            },
            {
                "input_ids": tokenize_texts(texts, cache_dir),
                "target_ids": _ids(t.target_id for t in triplets),
                "category": _ids(t.category for t in triplets),
            },
            texts,
        )
    products = read_products(dataset, root, split)
    if check_files:
        products = drop_missing_products(products, root, f"{dataset} {split}", cache)
    texts = [p.text for p in products]
    fields = {"input_ids": tokenize_products(products, cache_dir)}
    if task == "itc":
        fields["product_ids"] = _ids(p.id for p in products)
    elif task == "scr":
        fields["labels"] = _ids(p.subcategory_id for p in products)
    return SampleTable(
        f"{task}/{split}", ("pixels",), {"pixels": [p.images for p in products]}, fields, texts
    )


# ------------------------------------------------------------------------------------------ eval tables


def view_table(
    task: str, products: list[Product], split: str, cache_dir: str | os.PathLike | None = None
) -> SampleTable:
    """Every view of every product as one sample (XMR images, SCR, FIC evaluation)."""
    views = [(p, v) for p in products for v in p.images]
    fields = {
        "product_ids": _ids(p.id for p, _ in views),
        "subcategory": _ids(p.subcategory_id for p, _ in views),
    }
    texts = [p.text for p, _ in views]
    if task == "scr":
        fields["labels"] = fields.pop("subcategory")
    if task in ("scr", "cap"):
        # one tokenisation per product, repeated per view
        ids = tokenize_products(products, cache_dir)
        counts = torch.as_tensor([len(p.images) for p in products])
        fields["input_ids"] = torch.repeat_interleave(ids, counts, dim=0)
    return SampleTable(
        f"{task}/{split}/views", ("pixels",), {"pixels": [(v,) for _, v in views]}, fields, texts
    )


def product_text_table(
    products: list[Product], split: str, cache_dir: str | os.PathLike | None = None
) -> SampleTable:
    """One text per product (XMR text side): input_ids, product_ids, subcategory."""
    texts = [p.text for p in products]
    return SampleTable(
        f"itc/{split}/texts",
        (),
        {},
        {
            "input_ids": tokenize_products(products, cache_dir),
            "product_ids": _ids(p.id for p in products),
            "subcategory": _ids(p.subcategory_id for p in products),
        },
        texts,
    )


def tgir_tables(
    triplets: list[Triplet], category: int, cache_dir: str | os.PathLike | None = None
) -> tuple[SampleTable, SampleTable]:
    """(queries, gallery) of one FashionIQ category."""
    rows = [t for t in triplets if t.category == category]
    queries = [t for t in rows if not t.fake_data]
    if not queries:
        raise ValueError(
            f"FashionIQ: no {FIQ_CATEGORIES[category]} queries (rows without fake_data, with their images) "
            f"in captions/cap.{FIQ_CATEGORIES[category]}.val.json"
        )
    gallery: dict[int, str] = {}
    for t in rows:
        gallery.setdefault(t.target_id, t.target)
    ids = sorted(gallery)
    texts = [t.text for t in queries]
    name = FIQ_CATEGORIES[category]
    q = SampleTable(
        f"tgir/{name}/queries",
        ("ref_pixels",),
        {"ref_pixels": [(t.candidate,) for t in queries]},
        {
            "input_ids": tokenize_texts(texts, cache_dir),
            "target_ids": _ids(t.target_id for t in queries),
            "category": _ids(category for _ in queries),
        },
        texts,
    )
    g = SampleTable(
        f"tgir/{name}/gallery",
        ("pixels",),
        {"pixels": [(gallery[i],) for i in ids]},
        {"target_ids": _ids(ids)},
    )
    return q, g


def all_texts(root: str | os.PathLike, splits: Sequence[str] = ("train", "val")) -> list[list[str]]:
    """Every text list the tables of ``root`` tokenise (for pre-filling a token cache)."""
    out: list[list[str]] = []
    datasets = product_datasets_under(root)
    for split in splits:
        for dataset in datasets:
            try:
                products = read_products(dataset, root, split, allow_empty=True)
            except FileNotFoundError:
                continue
            out.append([p.text for p in products])
        try:
            triplets = read_fashioniq(root, split, allow_empty=True)
        except FileNotFoundError:
            continue
        if split == "train":
            out.append([t.text for t in triplets if not t.fake_data])
        for c in range(len(FIQ_CATEGORIES)):
            out.append([t.text for t in triplets if t.category == c and not t.fake_data])
    return out
