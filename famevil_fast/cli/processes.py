"""The processes of an inference command launched by torchrun (``famevil-fast eval``, ``embed``,
``caption``): this process's rank and device, and the process group shut down when the command ends."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from famevil_fast.devices import resolve_device

if TYPE_CHECKING:
    import torch

    from famevil_fast.eval.sharding import EvalShard


@contextmanager
def command_processes(requested: str | None) -> Iterator[tuple[EvalShard, torch.device]]:
    """``(shard, device)`` of this process: one process on the ``--device`` asked for, or, under torchrun,
    process RANK of WORLD_SIZE on its LOCAL_RANK GPU (``cuda`` or no ``--device``; a fixed ``cuda:N`` is
    refused, as every process would take that one GPU). A process group made here is shut down on exit; one
    the caller had made is left as it is."""
    import os

    import torch
    import torch.distributed as dist

    from famevil_fast.eval.sharding import EvalShard
    from famevil_fast.train.distributed import init_from_env, shutdown

    device = resolve_device(requested)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and device.type == "cuda" and requested is not None and device.index is not None:
        raise ValueError(
            f"--device={requested!r} names one GPU, but torchrun runs {world} processes: use 'cuda' (each "
            "process takes its LOCAL_RANK GPU)"
        )
    created = not (dist.is_available() and dist.is_initialized())
    try:
        info = init_from_env(device.type)
        if info.enabled and device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        yield EvalShard(info.rank, info.world_size), device
    finally:
        if created:
            shutdown()
