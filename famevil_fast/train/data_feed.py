"""Training data for the trainer: one endless, resumable stream of batches per task, built from the data
layer's loaders (``famevil_fast.data.build_train_loader``), sharded by process."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from famevil_fast.train.config import TrainConfig
from famevil_fast.train.distributed import DistInfo


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
        self._batches = None
        self.loader.load_state_dict(dict(state))

    def close(self) -> None:
        self.loader.close()


def build_streams(config: TrainConfig, dist: DistInfo, device: torch.device) -> dict[str, LoaderStream]:
    from famevil_fast.data import build_train_loader

    d = config.data
    streams = {}
    for i, task in enumerate(config.model.tasks):
        loader = build_train_loader(
            task, d.root, batch_size=d.batch_size, image_size=d.image_size, seed=config.train.seed + 1000 * i,
            rank=dist.rank, world_size=dist.world_size, backend=d.backend, device=device, cache_dir=d.cache,
            num_threads=d.num_workers,
        )  # fmt: skip
        streams[task] = LoaderStream(loader)
    return streams
