"""Spreading an evaluation over the processes of a distributed run.

Batch ``step`` of an evaluation set is encoded by process ``step % world``; the per-batch outputs are then
gathered to process 0 alone, in the order of the set (the other processes receive nothing). The batches are
the ones a single process would make, so the scores are a single process's; each process decodes and encodes
only its share. An error in one process's share is exchanged before the outputs, so that every process
raises it. Process 0 scores and reports (``on_main``: an error while it scores is raised in every process
too); the others return nothing.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class EvalShard:
    """This process's share of an evaluation: process ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (self.rank, self.world))
        if not ints or not 0 <= self.rank < self.world:
            raise ValueError(
                f"EvalShard: expected 0 <= rank < world, got rank={self.rank!r}, world={self.world!r}"
            )

    @classmethod
    def of_process_group(cls) -> EvalShard:
        """The default process group's rank and size; one process when no group is initialised."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def map_batches(self, batches: Iterable[dict], fn: Callable[[dict], T]) -> list[T]:
        """``fn`` of every batch of ``batches``, in order, each batch computed by one process: all of them in
        process 0, [] in the others (tensors arrive on the CPU). Batch sets with ``iter_steps``
        (``EvalBatches``) make only this process's batches; other iterables are walked and the other
        processes' batches skipped. An error in one process (a corrupt image, say) is raised in every
        process, rather than leaving the others waiting for it."""
        if not self.enabled:
            return [fn(batch) for _, batch in self._owned(batches)]
        local: list[tuple[int, T]] = []
        try:
            for step, batch in self._owned(batches):
                local.append((step, fn(batch)))
        except Exception as exc:  # handed to every process below
            return self._exchange(local, exc)
        return self._exchange(local, None)

    def gather(self, local: list[tuple[int, T]]) -> list[T]:
        """Every process's ``(step, value)`` pairs, merged in step order, in process 0 (tensors arrive on
        the CPU); [] in the others."""
        return [value for _, value in local] if not self.enabled else self._exchange(local, None)

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """``fn()`` computed by process 0 alone, in process 0 (where it stays: nothing is sent); None in the
        others. Every process must call it: an error in ``fn`` is raised in every process, as in
        ``map_batches``, rather than in process 0 alone while the others move on to their next collective."""
        if not self.enabled:
            return fn()
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as exc:  # handed to every process below
                error = exc
        self._raise_failures(error)
        return value

    def any_process(self, flag: bool) -> bool:
        """Whether ``flag`` is true in any process; every process gets the answer."""
        if not self.enabled:
            return bool(flag)
        flags: list[Any] = [None] * self.world
        dist.all_gather_object(flags, bool(flag))
        return any(flags)

    def broadcast(self, value: T) -> T:
        """Process 0's ``value`` in every process (what the others pass is ignored; tensors arrive on the
        CPU): something small that every process needs, such as which texts to encode."""
        if not self.enabled:
            return value
        box = [_to_cpu(value) if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _exchange(self, local: list[tuple[int, T]], error: Exception | None) -> list[T]:
        """Every process learns whether any process failed (and raises that error); then, when none did,
        the pairs travel to process 0, which merges them in step order. The others get []."""
        self._raise_failures(error)
        parts: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(_to_cpu(local), parts, dst=0)
        if parts is None:
            return []
        merged = sorted((item for part in parts for item in part), key=itemgetter(0))
        return [value for _, value in merged]

    def _raise_failures(self, error: Exception | None) -> None:
        """Exchange every process's failure (class name and message, or None); this process raises its own
        ``error``, or else the first other process's failure, naming that process."""
        failures: list[Any] = [None] * self.world
        dist.all_gather_object(failures, None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        failed = [(rank, failure) for rank, failure in enumerate(failures) if failure is not None]
        if failed:
            rank, (kind, message) = failed[0]
            raise _error_like(kind, f"{message} (in process {rank} of {self.world})")

    def _owned(self, batches: Iterable[dict]) -> Iterator[tuple[int, dict]]:
        if not self.enabled:
            yield from enumerate(batches)
            return
        iter_steps = getattr(batches, "iter_steps", None)
        if iter_steps is not None:
            yield from iter_steps(range(self.rank, len(batches), self.world))  # type: ignore[arg-type]
            return
        for step, batch in enumerate(batches):
            if step % self.world == self.rank:
                yield step, batch


def _error_like(kind: str, message: str) -> Exception:
    """An exception of the built-in class named ``kind`` (what another process raised), else RuntimeError."""
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # a class that takes other arguments
            pass
    return RuntimeError(f"{kind}: {message}")


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor in it moved to the CPU (what the object collectives pickle)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, tuple | list):
        return type(value)(_to_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value
