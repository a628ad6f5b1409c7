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
    import torch.distributed as dist

    from famevil_fast.eval.sharding import EvalShard
    from famevil_fast.train.distributed import init_from_env, process_device, shutdown

    device = resolve_device(requested)
    created = not (dist.is_available() and dist.is_initialized())
    try:
        info = init_from_env(device.type)
        device = process_device(device, info, "--device")
        yield EvalShard(info.rank, info.world_size), device
    finally:
        if created:
            shutdown()
