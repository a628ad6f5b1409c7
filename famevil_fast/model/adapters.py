"""Adapter modules: the bottleneck adapter, the per-task set of them (TSA) and the cross-attention
adapter (XAA).

A bottleneck adapter computes ``scale * up(relu(down(layer_norm(x))))`` with the up-projection
zero-initialised and ``scale`` a learnable scalar starting at 1, so a fresh adapter outputs exactly zero.
The computation itself lives in ``famevil_fast.ops`` (fused kernels or references).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from famevil_fast.model.task_mix import TaskMix, as_task_mix, equal_chunks, per_segment
from famevil_fast.ops import (
    AdapterParams,
    CrossAttentionParams,
    context_key_values,
    cross_attention_adapter,
    fused_adapter,
)
from famevil_fast.ops.adapter import (
    Residual,
    adapter_backend,
    check_adapter_args,
    check_residuals,
    grouped_adapter_reference,
    promote_under_autocast,
    residual_list,
    scaled_up_projection,
    sum_residuals,
)
from famevil_fast.ops.layer_norm import layer_norm_in_dtype


class BottleneckAdapter(nn.Module):
    """LayerNorm -> Linear(d, r) -> ReLU -> dropout -> Linear(r, d) (zero init) -> x learnable scale."""

    def __init__(self, width: int, bottleneck: int, dropout: float = 0.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width, eps=eps)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.ones(1))
        self.dropout = dropout
        self.backend: str | None = None
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def params(self) -> AdapterParams:
        return AdapterParams(
            self.ln.weight,
            self.ln.bias,
            self.down.weight,
            self.down.bias,
            self.up.weight,
            self.up.bias,
            self.scale,
        )

    def forward(self, x: torch.Tensor, residual: Residual = None) -> torch.Tensor:
        if self.dropout > 0.0 and self.training:
            h = layer_norm_in_dtype(x, self.ln.weight, self.ln.bias, self.ln.eps)
            h = F.dropout(F.relu(self.down(h)), self.dropout, training=True)
            y = scaled_up_projection(h, self.up.weight, self.up.bias, self.scale)
            y = y.to(x.dtype)  # a 16-bit stream stays 16-bit
            res = sum_residuals(residual)
            return y if res is None else res + y
        return fused_adapter(x, *self.params(), residual=residual, backend=self.backend, eps=self.ln.eps)


def stack_adapter_params(adapters: list[BottleneckAdapter]) -> AdapterParams:
    """Parameters of several adapters stacked along a new leading task dimension (gradients flow back)."""
    return AdapterParams(*(torch.stack(group) for group in zip(*(a.params() for a in adapters))))


class TaskAdapters(nn.Module):
    """One bottleneck adapter per task (the task-specific adapters of a transformer layer).

    ``task`` is a task key, or the layout of a batch whose samples belong to different tasks (a
    ``TaskMix``, or a (B,) tensor of indices into ``tasks``): then each sample goes through its own task's
    adapter, and only the tasks present in the batch take part (absent tasks get no gradient). Where the
    fused kernels run, that is one call whose rows carry their task ids; otherwise batched products over
    equal chunks of the batch (``equal_chunks``), or, for a layout of too many chunks, one call per task on
    its contiguous slice of the batch; none of them reads anything back from the device.
    """

    def __init__(
        self, width: int, bottleneck: int, tasks: tuple[str, ...], dropout: float = 0.0, eps: float = 1e-5
    ):
        super().__init__()
        self.tasks = tuple(tasks)
        self.adapters = nn.ModuleDict({t: BottleneckAdapter(width, bottleneck, dropout, eps) for t in tasks})

    def forward(
        self, x: torch.Tensor, task: str | torch.Tensor | TaskMix, residual: Residual = None
    ) -> torch.Tensor:
        if isinstance(task, str):
            return self.adapters[task](x, residual)
        return self._mixed(x, as_task_mix(task, x.shape[0]), residual)

    def _mixed(self, x: torch.Tensor, mix: TaskMix, residual: Residual) -> torch.Tensor:
        adapters = [self.adapters[self.tasks[i]] for i in mix.present]
        if len(adapters) == 1:
            return adapters[0](x, residual)
        first = adapters[0]
        backend = adapter_backend(x, first.params(), first.backend, mixed=True)
        if backend != "triton":
            chunk_tasks = equal_chunks(mix)
            if chunk_tasks is None or (first.dropout > 0.0 and self.training):
                return self._per_segment(x, mix, residual)
            return self._grouped(x, chunk_tasks, residual)
        if first.dropout > 0.0 and self.training:
            raise ValueError("mixed-task batches need adapter dropout 0 (the fused path has no dropout)")
        row_task = _row_task_ids(mix, x[0].numel() // x.shape[-1], x.device)
        return fused_adapter(
            x,
            *stack_adapter_params(adapters),
            residual=residual,
            task_ids=row_task,
            backend=backend,  # chosen above
            eps=first.ln.eps,
            check_task_ids=False,  # built here from the host-side layout
        )

    def _grouped(self, x: torch.Tensor, chunk_tasks: list[int], residual: Residual) -> torch.Tensor:
        """The batch as equal chunks, chunk c through the adapter of task position ``chunk_tasks[c]``, in
        batched products (``ops.adapter.grouped_adapter_reference``); the other branches are added over the
        whole batch. Neither the input nor the output is split or concatenated."""
        adapters = [self.adapters[self.tasks[position]] for position in chunk_tasks]
        check_adapter_args(x, adapters[0].params(), None)  # x against one adapter's shapes, dtypes, device
        y = grouped_adapter_reference(x, stack_adapter_params(adapters), eps=adapters[0].ln.eps)
        return plus_branches(x, y, residual)

    def _per_segment(self, x: torch.Tensor, mix: TaskMix, residual: Residual) -> torch.Tensor:
        """Each task's adapter on its segment of x; the other branches are added over the whole batch
        afterwards (the same sum, in the same order), so that they are not split: a split input's gradient
        is put back together by a concatenation, a pass over the whole branch."""

        def run(position: int, parts: list[torch.Tensor]) -> torch.Tensor:
            return self.adapters[self.tasks[position]](parts[0])

        return plus_branches(x, per_segment(mix, [x], run), residual)


def plus_branches(x: torch.Tensor, y: torch.Tensor, residual: Residual) -> torch.Tensor:
    """Adapter output ``y`` of input x plus the other branches ``residual``, checked and brought to x's
    dtype as ``fused_adapter`` takes them, summed over the whole batch in its order."""
    residuals = promote_under_autocast(x, residual_list(residual))
    check_residuals(x, residuals)
    res = sum_residuals(residuals)
    return y if res is None else res + y


def _row_task_ids(mix: TaskMix, rows_per_sample: int, device: torch.device) -> torch.Tensor:
    """Per token row: the rank of its task among the tasks present, filled on the device from the host-side
    segments (no host-to-device copy, so a CUDA graph can capture it)."""
    rank = {position: k for k, position in enumerate(mix.present)}
    return torch.cat(
        [
            torch.full(((stop - start) * rows_per_sample,), rank[position], dtype=torch.long, device=device)
            for position, start, stop in mix.segments
        ]
    )


class CrossAttentionAdapter(nn.Module):
    """XAA: queries from this tower (width d), keys/values from the other tower (width c), full-width
    Q/K/V, no output projection, then a bottleneck adapter (zero-initialised, so a no-op at start)."""

    def __init__(self, width: int, context_width: int, heads: int, bottleneck: int = 64, eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.ln_q = nn.LayerNorm(width, eps=eps)
        self.ln_ctx = nn.LayerNorm(context_width, eps=eps)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(context_width, 2 * width)
        self.adapter = BottleneckAdapter(width, bottleneck, eps=eps)
        self.backend: str | None = None
        nn.init.zeros_(self.q.bias)
        nn.init.zeros_(self.kv.bias)
        # keys and values start as two independent default-initialised projections
        key, value = torch.empty(width, context_width), torch.empty(width, context_width)
        nn.init.kaiming_uniform_(key, a=5**0.5)
        nn.init.kaiming_uniform_(value, a=5**0.5)
        with torch.no_grad():
            self.kv.weight.copy_(torch.cat([key, value]))

    def attn_params(self) -> CrossAttentionParams:
        return CrossAttentionParams(
            self.ln_q.weight,
            self.ln_q.bias,
            self.ln_ctx.weight,
            self.ln_ctx.bias,
            self.q.weight,
            self.q.bias,
            self.kv.weight,
            self.kv.bias,
        )

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of a context, for reuse across calls (e.g. decoding steps)."""
        return context_key_values(
            context, self.attn_params(), self.heads, backend=self.backend, eps=self.ln_ctx.eps
        )

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        residual: Residual = None,
    ) -> torch.Tensor:
        return cross_attention_adapter(
            x,
            self.attn_params(),
            self.adapter.params(),
            self.heads,
            context=context,
            context_kv=context_kv,
            context_mask=context_mask,
            residual=residual,
            backend=self.backend,
            eps=self.ln_q.eps,
        )
