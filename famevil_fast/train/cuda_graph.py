"""Forward and backward of a training micro-step, captured as a CUDA graph per batch layout and replayed.

At ViT-B/16 batch 64 a training step is bound by kernel launches, not arithmetic: replaying a captured graph
removes the Python and launch cost of the hundreds of kernels in the forward and backward passes.

``GraphedStep(loss_fn, params)`` is called like ``loss_fn``: with a dict of task batches. The first call
with a new layout (tasks, keys, shapes, dtypes) copies the batch into static input buffers, warms the step
up on a side stream, captures it, and replays it; later calls with that layout only copy the new batch in
and replay. Gradients accumulate into each parameter's ``.grad`` exactly as ``loss.backward()`` does, so
gradient accumulation across micro-steps works; the ``.grad`` tensors must stay allocated, so clear them
with ``zero_grad()`` (in place), never with ``optimizer.zero_grad(set_to_none=True)``. The optimizer step
runs outside the graph (a fused AdamW step is a handful of launches), inside ``untouched_grads_hidden()``:
parameters that no call since the last ``zero_grad()`` reached then have ``.grad`` None, as after eager
backward passes, so the optimizer skips them (no weight decay, no moment update) exactly as it would.

The model must be capturable: no host read-backs and static shapes during the step (see
``famevil_fast.capture``; ``simulated_capture`` checks that on the CPU). Autocast runs with its weight-cast
cache disabled, as graph capture requires. Without CUDA (or with ``simulate=True``) the step runs eagerly,
with the capture itself replaced by a run under ``simulated_capture``: the same code path, checked for
capture safety, on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from famevil_fast.capture import simulated_capture, static_shapes
from famevil_fast.train.checkpoint import rng_untouched
from famevil_fast.train.tensor_lists import zero_grouped

Batches = Mapping[str, Mapping[str, torch.Tensor]]
LossFn = Callable[[Batches], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(batches) -> (total loss to back-propagate, {task: task loss})``."""


def batch_layout(batches: Batches) -> tuple:
    """What a captured graph is specialised to: tasks, keys, shapes, dtypes and devices, in order."""
    for task, batch in batches.items():
        for key, value in batch.items():
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"GraphedStep: batch {task}.{key} is a {type(value).__name__}; a captured step takes "
                    "tensors only (their shapes and dtypes select the graph)"
                )
    return tuple(
        (task, tuple((key, tuple(t.shape), t.dtype, t.device) for key, t in batch.items()))
        for task, batch in batches.items()
    )


@dataclass
class _Captured:
    inputs: dict[str, dict[str, torch.Tensor]]
    losses: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None  # None: simulated (replayed eagerly)
    touched: tuple[bool, ...]  # per parameter: does the step's backward reach it


class GraphedStep:
    """Forward + backward of ``loss_fn`` as a CUDA graph per batch layout (see the module docstring)."""

    def __init__(
        self,
        loss_fn: LossFn,
        params: Sequence[torch.nn.Parameter],
        autocast_dtype: torch.dtype | None = None,
        warmup: int = 3,
        max_graphs: int = 8,
        simulate: bool | None = None,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (capture needs a warmed-up step), got {warmup}")
        self.loss_fn = loss_fn
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("GraphedStep needs at least one parameter that requires a gradient")
        self.device = self.params[0].device
        self.autocast_dtype = autocast_dtype
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.simulate = self.device.type != "cuda" if simulate is None else simulate
        self.graphs: dict[tuple, _Captured] = {}
        self.eager_calls = 0  # layouts beyond max_graphs run eagerly
        self._pool = None
        self._touched = [False] * len(self.params)

    # ------------------------------------------------------------------ public
    def __call__(self, batches: Batches) -> dict[str, torch.Tensor]:
        """Run forward + backward on ``batches``; returns the detached task losses (fresh tensors)."""
        layout = batch_layout(batches)
        captured = self.graphs.get(layout)
        if captured is None:
            if len(self.graphs) >= self.max_graphs:
                return self._run_uncaptured(batches)
            captured = self.graphs[layout] = self._capture(batches)
        self._copy_in(captured.inputs, batches)
        self._touched = [a or b for a, b in zip(self._touched, captured.touched)]
        if captured.graph is None:
            with simulated_capture():
                losses = self._run(captured.inputs)
            self._write_losses(captured, losses)
        else:
            captured.graph.replay()
        return {task: loss.clone() for task, loss in captured.losses.items()}

    def zero_grad(self) -> None:
        """Zero every gradient in place (the captured graphs accumulate into these very tensors)."""
        zero_grouped([p.grad for p in self.params if p.grad is not None])
        self._touched = [False] * len(self.params)

    @contextlib.contextmanager
    def untouched_grads_hidden(self) -> Iterator[None]:
        """Within it, parameters that no call since ``zero_grad()`` reached have ``.grad`` None."""
        hidden = [(p, p.grad) for p, touched in zip(self.params, self._touched) if not touched]
        for p, _ in hidden:
            p.grad = None
        try:
            yield
        finally:
            for p, grad in hidden:
                p.grad = grad

    # ------------------------------------------------------------------ internals
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _run(self, batches: Batches) -> dict[str, torch.Tensor]:
        """Forward + backward; returns detached losses only, so that no reference keeps the autograd graph
        (and its gradient-accumulation nodes, bound to this stream) alive into the next capture."""
        with self._autocast():
            total, losses = self.loss_fn(batches)
        total.backward()
        return {task: loss.detach().float() for task, loss in losses.items()}

    def _run_uncaptured(self, batches: Batches) -> dict[str, torch.Tensor]:
        """An eager step for a layout beyond ``max_graphs``. The gradients of parameters that no call has
        reached since ``zero_grad()`` are set aside during it: those it reaches get a gradient (added into
        their own tensor, which the graphs accumulate into) and count as touched; the others stay hidden
        from the optimizer, as after captured and eager steps."""
        self.eager_calls += 1
        held = {i: p.grad for i, p in enumerate(self.params) if not self._touched[i]}
        for i in held:
            self.params[i].grad = None
        try:
            return self._run(batches)
        finally:
            for i, grad in held.items():
                p = self.params[i]
                if p.grad is not None:
                    self._touched[i] = True
                    if grad is not None:  # zero since zero_grad(): it takes this step's gradient
                        p.grad = grad.add_(p.grad)
                else:
                    p.grad = grad

    @staticmethod
    def _copy_in(static: dict[str, dict[str, torch.Tensor]], batches: Batches) -> None:
        for task, batch in batches.items():
            for key, value in batch.items():
                static[task][key].copy_(value, non_blocking=True)

    @staticmethod
    def _write_losses(captured: _Captured, losses: dict[str, torch.Tensor]) -> None:
        for task, loss in losses.items():
            captured.losses[task].copy_(loss)

    def _capture(self, batches: Batches) -> _Captured:
        """Static inputs, a probe run (which parameters the step reaches), warm-up and capture of one
        layout; the gradients hold the same values afterwards as before."""
        inputs = {task: {k: v.detach().clone() for k, v in b.items()} for task, b in batches.items()}
        grads = [p.grad for p in self.params]
        saved = [g.clone() if g is not None else None for g in grads]
        for p in self.params:
            p.grad = None
        with rng_untouched(self.device), simulated_capture() if self.simulate else static_shapes():
            # under simulation, this fails naming any call that capture could not record
            losses = self._run(inputs)
        touched = tuple(p.grad is not None for p in self.params)
        for p, grad in zip(self.params, grads):  # the tensors every graph accumulates into
            p.grad = grad if grad is not None else torch.zeros_like(p)
        if self.simulate:
            captured = _Captured(inputs, {t: v.clone() for t, v in losses.items()}, None, touched)
        else:
            captured = self._capture_cuda(inputs, touched)
        for p, value in zip(self.params, saved):
            p.grad.copy_(value) if value is not None else p.grad.zero_()
        return captured

    def _capture_cuda(
        self, inputs: dict[str, dict[str, torch.Tensor]], touched: tuple[bool, ...]
    ) -> _Captured:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with rng_untouched(self.device), torch.cuda.stream(side), static_shapes():
            for _ in range(self.warmup - 1):  # the probe run was the first
                self._run(inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loaders' threads allocate and copy on their own streams meanwhile, which
        # the default ("global") mode would refuse, failing both their work and the capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            losses = self._run(inputs)
        return _Captured(inputs, losses, graph, touched)
