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
    refused, as every process would take that one GPU). The process group is shut down on exit."""
    import torch

    from famevil_fast.eval.sharding import EvalShard
    from famevil_fast.train.distributed import init_from_env, shutdown

    device = resolve_device(requested)
    info = init_from_env(device.type)
    try:
        if info.enabled and device.type == "cuda":
            if requested is not None and device.index is not None:
                raise ValueError(
                    f"--device={requested!r} names one GPU, but torchrun runs {info.world_size} processes: "
                    "use 'cuda' (each process takes its LOCAL_RANK GPU)"
                )
            device = torch.device("cuda", info.local_rank)
        yield EvalShard(info.rank, info.world_size), device
    finally:
        shutdown()
