"""What graph capture asks of the model code: no host read-backs and shapes that do not depend on data.

* ``capturing()`` is True while a CUDA graph is being captured on the current stream. Checks that read
  values back to the host (label ranges, task-id ranges, end tokens present) are skipped then: a captured
  graph replays device work only, so such a check could not run on the replayed data anyway.
* ``static_shapes()`` is a context in which the model keeps every tensor shape a function of the input
  shapes alone: no trimming of text padding to the batch's longest text, no boolean-mask selections.
  The outputs are the same (trimming and selection are exact); only the amount of work differs. Graph
  capture and its warm-up iterations run inside it, so that the warm-up allocates what the capture uses.
* ``simulated_capture()`` checks code for capture on any device, the CPU included: inside it
  ``capturing()`` is True and every host read-back or data-dependent shape raises ``HostSyncError``
  naming the call.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

_state = threading.local()


def capturing() -> bool:
    """True while the current CUDA stream is capturing a graph (never inside torch.compile tracing)."""
    if torch.compiler.is_compiling():
        return False
    if getattr(_state, "simulated", False):
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def host_reads_allowed() -> bool:
    """False where a check must not read tensor values back to the host: inside torch.compile tracing or a
    CUDA graph capture (real or simulated). Shape, dtype and device checks need no read and always run."""
    return not (torch.compiler.is_compiling() or capturing())


def static_shapes_enabled() -> bool:
    """True inside ``static_shapes()`` or during graph capture."""
    return getattr(_state, "depth", 0) > 0 or capturing()


@contextmanager
def static_shapes() -> Iterator[None]:
    """Keep every shape independent of the data (see the module docstring)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


class HostSyncError(RuntimeError):
    """A call that a CUDA graph cannot capture: it reads device values back or sizes a tensor by data."""


_READ_BACKS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
}
_DATA_SHAPED = {
    torch.nonzero,
    torch.Tensor.nonzero,
    torch.argwhere,
    torch.masked_select,
    torch.Tensor.masked_select,
    torch.unique,
    torch.Tensor.unique,
    torch.unique_consecutive,
    torch.Tensor.unique_consecutive,
}


def _bool_index(args: tuple) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class _ForbidHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__qualname__", repr(func))
        if func in _READ_BACKS:
            raise HostSyncError(f"{name} reads a device value back to the host")
        if func in _DATA_SHAPED or (func is torch.Tensor.__getitem__ and _bool_index(args)):
            raise HostSyncError(f"{name} gives a tensor whose shape depends on the data")
        if func is torch.Tensor.to and any(isinstance(a, (str, torch.device)) for a in args[1:]):
            target = torch.device(next(a for a in args[1:] if isinstance(a, (str, torch.device))))
            if target.type != args[0].device.type:
                raise HostSyncError(f"{name} copies between {args[0].device.type} and {target.type}")
        return func(*args, **kwargs)


@contextmanager
def simulated_capture() -> Iterator[None]:
    """Run code as under graph capture (``capturing()`` True, static shapes), raising ``HostSyncError`` at
    the first call that capture could not record."""
    previous = getattr(_state, "simulated", False)
    _state.simulated = True
    try:
        with _ForbidHostSync(), static_shapes():
            yield
    finally:
        _state.simulated = previous
