"""Training data of the pre-training objectives: sample tables and loaders for ``mvc``, ``pac`` and ``itm``.

One sample per product of ``dataset``: FashionGen by default, or Fashion200k, PolyvoreOutfits, BigFACAD, or
FashionViL's union ``fashionall`` (the train splits of those of the four found under the data root, ids made
unique across them, val = FashionGen val: ``famevil_fast.data.fashionall``). Shuffled, sharded and exactly
resumable like every :class:`~famevil_fast.data.loader.TrainLoader` (a batch is a pure function of seed,
epoch and step):

- ``mvc``: ``pixels`` (view A), ``fused_pixels`` (view B: another view of the product, drawn uniformly from
  the others; the same view with its own random crop and flip when the product has one view),
  ``input_ids``, ``product_ids``;
- ``pac``: ``pixels``, ``input_ids``, ``attribute_ids`` (B, K) int32, the product's attribute ids padded
  with -1 (K = most attributes of any product; int32 halves the table every process holds), ``product_ids``;
- ``itm``: ``pixels``, ``input_ids``, ``product_ids`` (negatives are chosen by the model from the batch).

Attributes come from an attribute file of ``famevil-fast mine-attributes`` (mined from the same dataset:
its product ids are the keys), from the products' own ``attributes_id``, or are mined from the training texts
when none is given (``famevil_fast.data.attributes``).
"""

from __future__ import annotations

import os

import torch

from famevil_fast.data.attributes import AttributeFile, check_attribute_dataset, load_attributes
from famevil_fast.data.backends import ImageBackend
from famevil_fast.data.cache import ImageCache
from famevil_fast.data.loader import TrainLoader, default_device, resolve_backend
from famevil_fast.data.records import shared_reads
from famevil_fast.data.tasks import (
    ITC_DATASETS,
    SampleTable,
    drop_missing_products,
    read_products,
    tokenize_products,
)

PRETRAIN_TASKS: tuple[str, ...] = ("mvc", "pac", "itm")


def check_pretrain_task(task: str, dataset: str | None) -> str:
    if task not in PRETRAIN_TASKS:
        raise ValueError(f"unknown pre-training task {task!r}; expected one of {PRETRAIN_TASKS}")
    dataset = dataset or "fashiongen"
    if dataset not in ITC_DATASETS:
        raise ValueError(f"pre-training task {task!r} reads {ITC_DATASETS}, not {dataset!r}")
    return dataset


def attribute_matrix(rows: list[tuple[int, ...]]) -> torch.Tensor:
    """Attribute ids per sample as (N, K) int32 padded with -1 (K >= 1); ValueError for an id beyond int32
    (attribute vocabularies are far smaller)."""
    width = max([len(r) for r in rows] + [1])
    largest = max((max(r) for r in rows if r), default=0)
    if largest >= 2**31:
        raise ValueError(f"attribute id {largest} is beyond the int32 range of the attribute table")
    out = torch.full((len(rows), width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.int32)
    return out


def pretrain_table(
    task: str,
    root: str | os.PathLike,
    split: str = "train",
    dataset: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    check_files: bool = True,
    attributes: AttributeFile | None = None,
    image_cache: ImageCache | None = None,
) -> SampleTable:
    """The sample table of a pre-training task (see the module docstring); ``attributes`` for ``pac``;
    ``check_files`` looks for the images in ``image_cache`` when they are read from one, else in ``root``."""
    dataset = check_pretrain_task(task, dataset)
    products = read_products(dataset, root, split)
    if check_files:
        products = drop_missing_products(products, root, f"{dataset} {split}", image_cache)
    texts = [p.text for p in products]
    fields = {
        "input_ids": tokenize_products(products, cache_dir),
        "product_ids": torch.as_tensor([p.id for p in products], dtype=torch.int64),
    }
    views = [p.images for p in products]
    if task == "mvc":
        images = {"pixels": views, "fused_pixels": views}
        return SampleTable(
            f"mvc/{split}", ("pixels", "fused_pixels"), images, fields, texts, ("pixels", "fused_pixels")
        )
    if task == "pac":
        if attributes is None:
            raise ValueError("the pac table needs attributes (an AttributeFile)")
        check_attribute_dataset(attributes, dataset)
        known = attributes.split(split)
        absent = [p for p in products if p.id not in known]
        if absent:
            raise ValueError(
                f"attribute file {attributes.source} has no attributes for {len(absent)} {dataset} {split} "
                f"products (e.g. id {absent[0].id}, {absent[0].dataset or dataset}); mine it from the same "
                f"data root and dataset (`famevil-fast mine-attributes ROOT --dataset {dataset}`)"
            )
        fields["attribute_ids"] = attribute_matrix([known[p.id] for p in products])
    return SampleTable(f"{task}/{split}", ("pixels",), {"pixels": views}, fields, texts)


def build_pretrain_loader(
    task: str,
    root: str | os.PathLike,
    batch_size: int,
    image_size: int = 224,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    backend: str | ImageBackend | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    split: str = "train",
    dataset: str | None = None,
    drop_last: bool = True,
    num_threads: int | None = None,
    prefetch: int = 2,
    check_files: bool = True,
    attributes: AttributeFile | str | os.PathLike | None = None,
    attribute_min_count: int = 5,
) -> TrainLoader:
    """A :class:`TrainLoader` of ``task`` ("mvc", "pac", "itm"); arguments as ``build_train_loader``.
    ``attributes``: an AttributeFile, the path of one, or None (mine the training texts, keeping words of
    at least ``attribute_min_count`` products)."""
    dev = torch.device(device) if device is not None else default_device()
    with shared_reads():  # PAC's mined attributes and its table read the same split files
        if task == "pac" and not isinstance(attributes, AttributeFile):
            attributes = load_attributes(
                root, attributes, check_pretrain_task(task, dataset), attribute_min_count
            )
        images = resolve_backend(backend, root, image_size, dev, cache_dir, num_threads)
        image_cache = images.cache if images.name == "cache" else None
        table = pretrain_table(task, root, split, dataset, cache_dir, check_files, attributes, image_cache)
    if hasattr(images, "max_batch"):
        images.max_batch = max(images.max_batch, batch_size * len(table.slots))
    return TrainLoader(table, images, batch_size, seed, rank, world_size, drop_last, prefetch)
