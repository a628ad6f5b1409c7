"""Evaluation sets of the four tasks, shaped after their protocols (docs/evaluation.md).

=======  ==========================================================================================
task     what :func:`build_eval_sets` returns
=======  ==========================================================================================
itc      :class:`XMREval`: ``images`` = every view of every product, batches of pixels, product_ids,
         subcategory; ``texts`` = one text per product: input_ids (P, 77), product_ids, subcategory
tgir     :class:`TGIREval`: per category ("dress", "shirt", "toptee") ``queries`` (ref_pixels,
         input_ids, target_ids, category) and ``gallery`` (pixels, target_ids; distinct target ids of
         all val rows, fake_data rows included)
scr      :class:`SCREval`: every view is a sample: pixels, input_ids, labels, product_ids;
         ``categories`` maps each subcategory to its category (None, with ``category_note`` saying why,
         when the rows carry no category_id or put a subcategory in two categories)
cap      :class:`CapEval`: every view with its reference text: pixels, input_ids, product_ids;
         ``references`` holds the raw text of each sample in order
=======  ==========================================================================================

Image batches are :class:`~famevil_fast.data.loader.EvalBatches` (re-iterable, in order, eval crop); all
tensors are on the chosen device.

``views``: "all" (default, the official protocol behind the published
numbers) makes every view of a product a sample of SCR and FIC and an item of the XMR image side; "first"
keeps one view per product, the first one listed that has an image. TGIR has one image per entry either way.
``eval_resize``: "keep_aspect" (default) or "squash" (the official code), see
:mod:`famevil_fast.data.transforms`. Every set records both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from famevil_fast.data.backends import ImageBackend
from famevil_fast.data.cache import ImageCache
from famevil_fast.data.fashiongen import fashiongen_split_file
from famevil_fast.data.fiq_convert import FIQ_CATEGORIES
from famevil_fast.data.loader import EvalBatches, default_device, resolve_backend
from famevil_fast.data.records import Product, Triplet
from famevil_fast.data.tasks import (
    SampleTable,
    check_task,
    drop_missing_products,
    drop_missing_triplets,
    product_text_table,
    read_products,
    tgir_tables,
    view_table,
)
from famevil_fast.data.transforms import check_eval_resize

EVAL_VIEWS: tuple[str, ...] = ("all", "first")  # default (the official protocol) first


@dataclass
class XMREval:
    images: EvalBatches
    texts: dict[str, torch.Tensor]
    text_strings: list[str]
    views: str = "all"
    eval_resize: str = "keep_aspect"


@dataclass
class TGIRCategoryEval:
    category: str
    queries: EvalBatches
    gallery: EvalBatches


@dataclass
class TGIREval:
    categories: dict[str, TGIRCategoryEval]
    eval_resize: str = "keep_aspect"


@dataclass
class SCREval:
    samples: EvalBatches
    views: str = "all"
    eval_resize: str = "keep_aspect"
    categories: dict[int, int] | None = None  # subcategory id -> category id, from the dataset rows
    category_note: str | None = None  # why ``categories`` is None


@dataclass
class CapEval:
    samples: EvalBatches
    references: list[str]
    views: str = "all"
    eval_resize: str = "keep_aspect"


def check_views(views: str) -> str:
    """``views`` when it is one of :data:`EVAL_VIEWS`; ValueError naming the choices otherwise."""
    if views not in EVAL_VIEWS:
        raise ValueError(f"views must be one of {EVAL_VIEWS}, got {views!r}")
    return views


def first_views(products: list[Product]) -> list[Product]:
    """Every product with its first view only (the alternative to the official every-view protocol)."""
    return [p if len(p.images) == 1 else replace(p, images=p.images[:1]) for p in products]


def subcategory_categories(products: list[Product], what: str) -> tuple[dict[int, int] | None, str | None]:
    """(subcategory id -> category id, None) read from the products' rows, or (None, why) when the rows give
    no such mapping, so that only the optional category-level SCR scores are skipped: some rows carry no
    ``category_id``, or a subcategory has products in two categories (the note names the subcategory, both
    categories and a product of each)."""
    lacking = [p.id for p in products if p.category_id < 0]
    if lacking:
        return None, (
            f"{len(lacking)} of {len(products)} products of {what} have no category_id "
            f"(product {lacking[0]}{', ...' if len(lacking) > 1 else ''})"
        )
    first: dict[int, Product] = {}
    for p in products:
        seen = first.setdefault(p.subcategory_id, p)
        if seen.category_id != p.category_id:
            return None, (
                f"{what}: subcategory {p.subcategory_id} maps to several categories: {seen.category_id} "
                f"(product {seen.id}) and {p.category_id} (product {p.id}); category-level SCR scores need "
                "one category per subcategory"
            )
    return {sub: p.category_id for sub, p in sorted(first.items())}, None


def build_eval_sets(
    task: str,
    root: str | os.PathLike,
    image_size: int = 224,
    batch_size: int = 256,
    backend: str | ImageBackend | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    split: str = "val",
    dataset: str | None = None,
    num_threads: int | None = None,
    prefetch: int = 2,
    check_files: bool = True,
    categories: Sequence[str] = FIQ_CATEGORIES,
    verify_cache: bool = True,
    views: str = "all",
    eval_resize: str = "keep_aspect",
) -> XMREval | TGIREval | SCREval | CapEval:
    """The evaluation set of ``task`` on ``split`` (module table); arguments as in ``build_train_loader``.

    ``views``: "all" (every view of a product is a sample of SCR / FIC and an item of the XMR image side, as
    the official protocol) or "first" (one view per product). ``eval_resize``: "keep_aspect" (shorter side to
    round(S * 256 / 224), aspect kept) or "squash" (the official code's R x R resize), then the centre crop.
    """
    check_views(views)
    check_eval_resize(eval_resize)
    dataset = check_task(task, dataset)
    dev = torch.device(device) if device is not None else default_device()
    images = resolve_backend(backend, root, image_size, dev, cache_dir, num_threads, verify_cache)
    if hasattr(images, "max_batch"):
        images.max_batch = max(images.max_batch, batch_size)

    def batches(table) -> EvalBatches:
        return EvalBatches(table, images, batch_size, prefetch, eval_resize)

    cache = images.cache if images.name == "cache" else None  # images missing from where they are read
    if task == "tgir":
        triplets = _tgir_triplets(root, split, categories, check_files, cache)
        return TGIREval(_tgir_categories(triplets, categories, cache_dir, batches), eval_resize)
    products = read_products(dataset, root, split)
    mapping, note = (None, None)
    if task == "scr":  # from every row of the split (FashionGen), before missing images drop any
        path = fashiongen_split_file(root, split)[1]
        mapping, note = subcategory_categories(products, f"{dataset} {split} ({path})")
    if check_files:
        products = drop_missing_products(products, root, f"{dataset} {split}", cache)
    if views == "first":
        products = first_views(products)
    if task == "itc":
        return _xmr_eval(products, split, cache_dir, batches, dev, views, eval_resize)
    table = view_table(task, products, split, cache_dir)
    if task == "scr":
        return SCREval(batches(table), views, eval_resize, mapping, note)
    return CapEval(batches(table), table.texts, views, eval_resize)


def _tgir_triplets(
    root: str | os.PathLike,
    split: str,
    categories: Sequence[str],
    check_files: bool,
    cache: ImageCache | None,
) -> list[Triplet]:
    """The FashionIQ ``split`` triplets of ``categories``, those with a missing image dropped when
    ``check_files``."""
    from famevil_fast.data.fashioniq import read_fashioniq

    triplets = read_fashioniq(root, split, categories)
    if check_files:
        triplets = drop_missing_triplets(triplets, root, f"FashionIQ {split}", cache)
    return triplets


def _tgir_categories(
    triplets: list[Triplet],
    categories: Sequence[str],
    cache_dir: str | os.PathLike | None,
    batches: Callable[[SampleTable], EvalBatches],
) -> dict[str, TGIRCategoryEval]:
    """The queries and gallery of each of ``categories``, by name."""
    out = {}
    for name in categories:
        q, g = tgir_tables(triplets, FIQ_CATEGORIES.index(name), cache_dir)
        out[name] = TGIRCategoryEval(name, batches(q), batches(g))
    return out


def _xmr_eval(
    products: list[Product],
    split: str,
    cache_dir: str | os.PathLike | None,
    batches: Callable[[SampleTable], EvalBatches],
    device: torch.device,
    views: str,
    eval_resize: str,
) -> XMREval:
    """The XMR set of ``products``: every view on the image side, one text per product."""
    texts = product_text_table(products, split, cache_dir)
    return XMREval(
        batches(view_table("itc", products, split, cache_dir)),
        {k: v.to(device) for k, v in texts.fields.items()},
        texts.texts,
        views,
        eval_resize,
    )
