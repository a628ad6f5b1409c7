"""Evaluation sets of the four tasks, shaped after their protocols (docs/evaluation.md).

=======  ==========================================================================================
task     what :func:`build_eval_sets` returns
=======  ==========================================================================================
itc      :class:`XMREval`: ``images`` = every view of every product, batches of pixels, product_ids,
         subcategory; ``texts`` = one text per product: input_ids (P, 77), product_ids, subcategory
tgir     :class:`TGIREval`: per category ("dress", "shirt", "toptee") ``queries`` (ref_pixels,
         input_ids, target_ids, category) and ``gallery`` (pixels, target_ids; distinct target ids of
         all val rows, fake_data rows included)
scr      :class:`SCREval`: every view is a sample: pixels, input_ids, labels, product_ids
cap      :class:`CapEval`: every view with its reference text: pixels, input_ids, product_ids;
         ``references`` holds the raw text of each sample in order
=======  ==========================================================================================

Image batches are :class:`~famevil_fast.data.loader.EvalBatches` (re-iterable, in order, eval crop); all
tensors are on the chosen device.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from famevil_fast.data.backends import ImageBackend
from famevil_fast.data.fiq_convert import FIQ_CATEGORIES
from famevil_fast.data.loader import EvalBatches, default_device, resolve_backend
from famevil_fast.data.tasks import (
    check_task,
    drop_missing_products,
    drop_missing_triplets,
    product_text_table,
    read_products,
    tgir_tables,
    view_table,
)


@dataclass
class XMREval:
    images: EvalBatches
    texts: dict[str, torch.Tensor]
    text_strings: list[str]


@dataclass
class TGIRCategoryEval:
    category: str
    queries: EvalBatches
    gallery: EvalBatches


@dataclass
class TGIREval:
    categories: dict[str, TGIRCategoryEval]


@dataclass
class SCREval:
    samples: EvalBatches


@dataclass
class CapEval:
    samples: EvalBatches
    references: list[str]


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
) -> XMREval | TGIREval | SCREval | CapEval:
    """The evaluation set of ``task`` on ``split`` (module table); arguments as in ``build_train_loader``."""
    from famevil_fast.data.fashioniq import read_fashioniq

    dataset = check_task(task, dataset)
    dev = torch.device(device) if device is not None else default_device()
    images = resolve_backend(backend, root, image_size, dev, cache_dir, num_threads, verify_cache)
    if hasattr(images, "max_batch"):
        images.max_batch = max(images.max_batch, batch_size)

    def batches(table) -> EvalBatches:
        return EvalBatches(table, images, batch_size, prefetch)

    cache = images.cache if images.name == "cache" else None  # images missing from where they are read
    if task == "tgir":
        triplets = read_fashioniq(root, split, categories)
        if check_files:
            triplets = drop_missing_triplets(triplets, root, f"FashionIQ {split}", cache)
        out = {}
        for name in categories:
            q, g = tgir_tables(triplets, FIQ_CATEGORIES.index(name), cache_dir)
            out[name] = TGIRCategoryEval(name, batches(q), batches(g))
        return TGIREval(out)
    products = read_products(dataset, root, split)
    if check_files:
        products = drop_missing_products(products, root, f"{dataset} {split}", cache)
    if task == "itc":
        texts = product_text_table(products, split, cache_dir)
        return XMREval(
            batches(view_table("itc", products, split, cache_dir)),
            {k: v.to(dev) for k, v in texts.fields.items()},
            texts.texts,
        )
    views = view_table(task, products, split, cache_dir)
    if task == "scr":
        return SCREval(batches(views))
    return CapEval(batches(views), views.texts)
