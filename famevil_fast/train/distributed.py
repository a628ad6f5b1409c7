"""Distributed training helpers: process-group setup from torchrun's environment (and each process's GPU),
the feature all-gather (with gradient flow) that the retrieval losses use to score local rows against the
global batch, and an all-gather of small picklable values (each process's CUDA random-number state, for the
checkpoints).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

TIMEOUT_ENV = "FAMEVIL_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0

T = TypeVar("T")


def collective_timeout() -> timedelta:
    """How long a collective waits for the other processes before the run fails: ``FAMEVIL_FAST_DIST_TIMEOUT``
    seconds, default 1800. It must cover what rank 0 does alone between updates (evaluation, checkpoints)."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_device_index(local_rank: int) -> int:
    """The index of process ``local_rank``'s GPU among those it sees: ``local_rank`` modulo the visible GPUs,
    so ``local_rank`` itself where every process sees every GPU of its node, and 0 where each process sees
    only its own (a cluster that sets CUDA_VISIBLE_DEVICES per process). ``local_rank`` without any visible
    GPU."""
    count = torch.cuda.device_count()
    return local_rank % count if count > 0 else local_rank


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes (NCCL on GPUs, gloo on CPUs; collectives time out
    after ``collective_timeout()``), on GPUs making ``local_device_index(LOCAL_RANK)`` the current device; a
    single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", timeout=collective_timeout())
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_device_index(local))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def process_device(wanted: torch.device, dist: DistInfo, source: str = "train.device") -> torch.device:
    """This process's device: under torchrun its LOCAL_RANK GPU, ``local_device_index`` (a fixed ``cuda:N``,
    named as ``source``, is refused), else the device asked for, made the current CUDA device so that kernels
    and graphs run on it."""
    if wanted.type == "cpu":
        return wanted
    if dist.enabled:
        if wanted.index is not None:
            raise ValueError(
                f"{source}={str(wanted)!r} names one GPU, but torchrun runs {dist.world_size} processes: "
                "use 'cuda' (each process takes its LOCAL_RANK GPU)"
            )
        return torch.device("cuda", local_device_index(dist.local_rank))
    device = torch.device("cuda", wanted.index if wanted.index is not None else 0)
    torch.cuda.set_device(device)
    return device


class FeatureGather:
    """``gather(x) -> (cat of every process's x, offset of this process's rows)`` with gradient flow back to
    every process's features; ``mean_count(n)`` is the count averaged over processes; ``row_weight`` is
    local rows / mean rows over processes (the factor of a per-row mean loss, see ``model.losses``)."""

    def __init__(self, info: DistInfo) -> None:
        self.info = info

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Processes may hold different numbers of rows (a batch that lost a corrupt image): rows are padded
        to the largest count for the collective and the padding is dropped again."""
        from torch.distributed.nn.functional import all_gather

        sizes = self._sizes(x.shape[0], x.device)
        largest = max(sizes)
        padded = (
            x if x.shape[0] == largest else torch.cat([x, x.new_zeros(largest - x.shape[0], *x.shape[1:])])
        )
        parts = all_gather(padded.contiguous())
        gathered = torch.cat([part[:n] for part, n in zip(parts, sizes)])
        return gathered, sum(sizes[: self.info.rank])

    def _sizes(self, rows: int, device: torch.device) -> list[int]:
        local = torch.tensor([rows], device=device)
        sizes = [torch.zeros_like(local) for _ in range(self.info.world_size)]
        dist.all_gather(sizes, local)
        return [int(s) for s in sizes]

    def row_weight(self, rows: int, device: torch.device, total: int | None = None) -> float | torch.Tensor:
        """``rows * world_size / total``: a float from ``total`` (the global row count, known from a gather's
        shape), else a tensor on ``device`` from an all-reduce of the count (no read-back to the host)."""
        if total is not None:
            return rows * self.info.world_size / total
        count = torch.full((), float(rows), device=device)
        dist.all_reduce(count)
        return (rows * self.info.world_size) / count

    def mean_count(self, n: torch.Tensor) -> torch.Tensor:
        total = n.detach().clone().float()
        dist.all_reduce(total)
        return total / self.info.world_size


def gather_objects(value: T, info: DistInfo) -> list[T]:
    """Every process's ``value`` (picklable, small: it travels through ``all_gather_object``), in rank order;
    ``[value]`` in a single process. A collective under DDP: every process must call it."""
    if not info.enabled:
        return [value]
    gathered: list[T | None] = [None] * info.world_size
    dist.all_gather_object(gathered, value)
    return gathered  # type: ignore[return-value]  # every slot filled


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
