"""Which task each sample of a mixed-task pass belongs to.

A mixed-task pass concatenates the samples of several tasks, one task after another. ``TaskMix`` carries
that layout twice: on the host as contiguous segments, so that adapters can slice the batch and pick
their parameters without reading anything back from the device, and on the device as a per-sample index,
for the fused kernels that take a task id per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch


class TaskMix(NamedTuple):
    """``index`` (B,) positions in the model's task list; ``segments`` ((position, start, stop), ...) the
    same information as contiguous sample ranges, in batch order."""

    index: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]

    @property
    def present(self) -> tuple[int, ...]:
        """Task positions that occur, sorted."""
        return tuple(sorted({position for position, _, _ in self.segments}))


TaskChoice = str | torch.Tensor | TaskMix
"""What a tower's forward takes as its task: one task key for the whole batch, or a per-sample layout."""


def task_mix(positions: list[int], sizes: list[int], device: torch.device | str) -> TaskMix:
    """The layout of a batch made of ``sizes[i]`` samples of task position ``positions[i]``, in order."""
    segments, start = [], 0
    for position, size in zip(positions, sizes):
        if size:
            segments.append((position, start, start + size))
        start += size
    # filled on the device: no host-to-device copy, so a CUDA graph can capture it
    index = torch.cat(
        [
            torch.full((size,), position, dtype=torch.long, device=device)
            for position, size in zip(positions, sizes)
        ]
    )
    return TaskMix(index, tuple(segments))


def check_segments(mix: TaskMix, batch: int) -> None:
    """The segments of ``mix`` must cover the batch's ``batch`` samples in order, without gaps (a layout
    built by hand could say otherwise, and the chunked paths would then pair samples with other tasks)."""
    stops = [0, *(stop for _, _, stop in mix.segments)]
    starts = [start for _, start, _ in mix.segments]
    if starts != stops[:-1] or stops[-1] != batch:
        raise ValueError(
            f"task layout segments {mix.segments} do not cover the batch's {batch} samples in order"
        )


def as_task_mix(task: torch.Tensor | TaskMix, batch: int) -> TaskMix:
    """A ``TaskMix`` from a per-sample index tensor (one read-back to find its runs) or an existing one."""
    index = task.index if isinstance(task, TaskMix) else task
    if index.shape != (batch,):
        raise ValueError(f"task index must have shape ({batch},), one per sample; got {tuple(index.shape)}")
    if isinstance(task, TaskMix):
        check_segments(task, batch)
        return task
    values, counts = torch.unique_consecutive(index, return_counts=True)
    return task_mix(values.tolist(), counts.tolist(), index.device)._replace(index=index)


def per_segment(
    mix: TaskMix, inputs: Sequence[torch.Tensor], run: Callable[[int, list[torch.Tensor]], torch.Tensor]
) -> torch.Tensor:
    """``run(task position, each input's samples of the segment)`` for each segment, concatenated in batch
    order. Each input (batch first) is split once: ``torch.split``'s backward is one concatenation, where a
    slice per segment would give each segment's gradient as a zero-filled tensor of the whole batch, and
    autograd would add them up."""
    sizes = [stop - start for _, start, stop in mix.segments]
    parts = [torch.split(t, sizes) for t in inputs]
    outputs = [run(position, [p[i] for p in parts]) for i, (position, _, _) in enumerate(mix.segments)]
    return torch.cat(outputs)


MAX_GROUPED_CHUNKS = 8  # beyond this, batched products over chunks give way to one call per segment


def equal_chunks(mix: TaskMix) -> list[int] | None:
    """The task position of each chunk when the segments of ``mix`` split into at most
    ``MAX_GROUPED_CHUNKS`` chunks of one size (the segments' greatest common divisor), in batch order;
    None otherwise."""
    size = math.gcd(*(stop - start for _, start, stop in mix.segments))
    chunks = [position for position, start, stop in mix.segments for _ in range((stop - start) // size)]
    return chunks if len(chunks) <= MAX_GROUPED_CHUNKS else None
