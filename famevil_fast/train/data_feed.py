"""Training data for the trainer: one endless, resumable stream of batches per task, built from the data
layer's loaders (``famevil_fast.data.build_train_loader``; ``data.pretrain`` for the pre-training
objectives), sharded by process."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch

from famevil_fast.train.config import TrainConfig
from famevil_fast.train.distributed import DistInfo

if TYPE_CHECKING:
    from famevil_fast.data.attributes import AttributeFile


class LoaderStream:
    """Adapts a ``TrainLoader`` to the trainer: ``next_batch()`` crosses epochs; the state is the loader's
    (epoch and position), so a resumed run continues with the same batches and augmentations."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self._batches: Iterator[dict[str, torch.Tensor]] | None = None

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._batches is None:
            self._batches = self.loader.stream()
        return next(self._batches)

    def __len__(self) -> int:
        """Training samples of the task (size-proportional sampling weighs tasks by it)."""
        return len(self.loader.table)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._stop_batches()
        self.loader.load_state_dict(dict(state))

    def _stop_batches(self) -> None:
        """End the running batch generator (and its prefetching thread): the next batch comes from the
        loader's restored position."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def close(self) -> None:
        self._stop_batches()
        self.loader.close()


@functools.lru_cache(maxsize=4)
def _attributes(root: str, path: str | None, min_count: int, dataset: str):
    from famevil_fast.data.attributes import load_attributes

    return load_attributes(root, path, dataset, min_count=min_count)


def product_dataset(config: TrainConfig) -> str:
    """The product dataset of the itc and pre-training streams (``data.dataset``; FashionGen by default)."""
    return config.data.dataset or "fashiongen"


def pac_attributes(config: TrainConfig) -> AttributeFile:
    """The PAC attribute file of a run (``data.attributes``, or mined from the training texts of
    ``data.dataset``), read once."""
    d = config.data
    return _attributes(str(d.root), d.attributes, d.attribute_min_count, product_dataset(config))


DEFAULT_BATCH_SIZE = 64  # per process, when a recipe sets neither data.batch_size nor data.global_batch_size


def process_batch_size(config: TrainConfig, world_size: int) -> int:
    """Each process's micro-batch: ``data.global_batch_size`` split over the processes when it is set (a
    ValueError when they do not divide it), else ``data.batch_size`` (64 when null)."""
    total = config.data.global_batch_size
    if total is None:
        return config.data.batch_size or DEFAULT_BATCH_SIZE
    if total % world_size:
        raise ValueError(
            f"data.global_batch_size {total} does not split over {world_size} processes; use a multiple of "
            f"{world_size}"
        )
    return total // world_size


def build_streams(config: TrainConfig, dist: DistInfo, device: torch.device) -> dict[str, LoaderStream]:
    from famevil_fast.data import build_train_loader
    from famevil_fast.data.pretrain import PRETRAIN_TASKS, build_pretrain_loader

    d = config.data
    streams = {}
    for i, task in enumerate(config.model.tasks):
        common = dict(
            batch_size=process_batch_size(config, dist.world_size),
            image_size=d.image_size,
            seed=config.train.seed + 1000 * i,
            rank=dist.rank,
            world_size=dist.world_size,
            backend=d.backend,
            device=device,
            cache_dir=d.cache,
            num_threads=d.num_workers,
        )
        if task in PRETRAIN_TASKS:
            extra = {"attributes": pac_attributes(config)} if task == "pac" else {}
            loader = build_pretrain_loader(task, d.root, dataset=product_dataset(config), **common, **extra)
        elif task == "itc":
            loader = build_train_loader(task, d.root, dataset=product_dataset(config), **common)
        else:
            loader = build_train_loader(task, d.root, **common)
        streams[task] = LoaderStream(loader)
    return streams
