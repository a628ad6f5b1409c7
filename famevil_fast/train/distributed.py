"""Distributed training helpers: process-group setup from torchrun's environment, and the feature
all-gather (with gradient flow) that the retrieval losses use to score local rows against the global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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


def init_from_env(device_type: str) -> DistInfo:
    """Join the process group that torchrun describes (NCCL on GPUs, gloo on CPUs); a single process
    otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


class FeatureGather:
    """``gather(x) -> (cat of every process's x, offset of this process's rows)`` with gradient flow back to
    every process's features; ``mean_count(n)`` is the count averaged over processes."""

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

    def mean_count(self, n: torch.Tensor) -> torch.Tensor:
        total = n.detach().clone().float()
        dist.all_reduce(total)
        return total / self.info.world_size


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
