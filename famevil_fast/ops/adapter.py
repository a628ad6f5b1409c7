"""The bottleneck adapter op: ``residual + scale * up(relu(down(layer_norm(x))))``.

Owns the public ``fused_adapter`` function, its argument checks and the plain-PyTorch reference.
``backend="triton"`` runs the fused kernels of ``famevil_fast.kernels``: eagerly through their autograd
functions (``kernels/autograd.py``), and inside ``torch.compile`` graphs as the registered
``torch.ops.famevil_fast.adapter_forward`` operator; ``backend="torch"`` always runs the reference. While
``torch.utils.flop_counter.FlopCounterMode`` counts, the Triton path also runs the registered operators,
whose FLOP formulas (here) count what the counter counts for the reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from famevil_fast.capture import host_reads_allowed, static_shapes_enabled
from famevil_fast.ops._backend import check_backend, counting_flops, matmul_flops, select_backend
from famevil_fast.ops.layer_norm import (
    allowed_params_dtypes,
    autocast_dtype,
    layer_norm_in_dtype,
    params_dtype_allowed,
    widened_for,
)

LN_EPS = 1e-5
BACKENDS = ("torch", "triton")


class AdapterParams(NamedTuple):
    """Parameters of one bottleneck adapter (or of T adapters, each with a leading task dimension)."""

    ln_weight: torch.Tensor  # (d,) or (T, d)
    ln_bias: torch.Tensor  # (d,) or (T, d)
    down_weight: torch.Tensor  # (r, d) or (T, r, d)
    down_bias: torch.Tensor  # (r,) or (T, r)
    up_weight: torch.Tensor  # (d, r) or (T, d, r)
    up_bias: torch.Tensor  # (d,) or (T, d)
    scale: torch.Tensor  # (1,) or (T, 1)


Residual = torch.Tensor | Sequence[torch.Tensor] | None


def sum_residuals(residual: Residual) -> torch.Tensor | None:
    if residual is None or isinstance(residual, torch.Tensor):
        return residual
    if len(residual) == 0:
        return None
    total = residual[0]
    for extra in residual[1:]:
        total = total + extra
    return total


def adapter_reference(
    x: torch.Tensor,
    params: AdapterParams,
    residual: Residual = None,
    task_ids: torch.Tensor | None = None,
    eps: float = LN_EPS,
) -> torch.Tensor:
    """Plain PyTorch: one adapter for every row, or row i through adapter ``task_ids[i]``.

    Parameters kept in float32 beside lower-precision activations are cast to x's dtype (autograd returns
    their gradients in float32); under autocast a 16-bit x is normalised in its own dtype
    (``ops.layer_norm``), not promoted to float32."""
    params = AdapterParams(*(p if p.dtype == x.dtype else p.to(x.dtype) for p in params))
    if task_ids is None:
        y = _single_adapter(x, params, eps)
    else:
        y = _mixed_task_adapter(x, params, task_ids, eps)
    res = sum_residuals(residual)
    return y if res is None else res + y


def grouped_adapter_reference(x: torch.Tensor, params: AdapterParams, eps: float = LN_EPS) -> torch.Tensor:
    """The adapter output for an x whose leading dimension splits into C equal chunks, chunk c through
    adapter c of ``params`` (each with a leading dimension C): ``adapter_reference`` on each chunk, as
    batched products, so that each step is one call for every chunk (a mixed-task batch whose segments
    are whole chunks, ``TaskAdapters``). Parameters are cast to x's dtype first. One LayerNorm without
    its affine part serves every chunk; each chunk's affine part goes into its down projection,
    ``W (g xhat + b) + c = (W diag(g)) xhat + (W b + c)``, and its scale into the up projection, as in
    ``adapter_reference``: small products on the weights instead of passes over the activations."""
    chunks = params.ln_weight.shape[0]
    if x.dim() < 2 or x.shape[0] % chunks:
        raise ValueError(
            f"grouped adapters: x of shape {tuple(x.shape)} does not split into {chunks} equal chunks along "
            "its first dimension"
        )
    p = AdapterParams(*(t if t.dtype == x.dtype else t.to(x.dtype) for t in params))
    rows = layer_norm_in_dtype(x.reshape(chunks, -1, x.shape[-1]), None, None, eps)
    down = p.down_weight * p.ln_weight[:, None]  # (C, r, d)
    down_bias = torch.baddbmm(p.down_bias[:, :, None], p.down_weight, p.ln_bias[:, :, None])  # (C, r, 1)
    h = F.relu(torch.baddbmm(down_bias.transpose(1, 2), rows, down.transpose(1, 2)))
    up = (p.up_weight * p.scale[:, :, None]).transpose(1, 2)
    return torch.baddbmm((p.up_bias * p.scale)[:, None], h, up).reshape(x.shape)


def scaled_up_projection(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """``scale * (h W^T + b)``, an adapter's up projection. Where autograd records, the scale goes into the
    weight and bias, ``(s W) h + s b``: scaling the (d, r) weight and the bias costs next to nothing, where
    scaling the output is a pass over every activation forward and two backward (the input's gradient, and
    the scale's as a sum over products). Without gradients (inference, decoding) the output is scaled: one
    small kernel, where the fold takes two."""
    if not torch.is_grad_enabled():
        return F.linear(h, weight, bias) * scale
    return F.linear(h, weight * scale, bias * scale)


def _single_adapter(x: torch.Tensor, p: AdapterParams, eps: float) -> torch.Tensor:
    """One adapter over x."""
    h = layer_norm_in_dtype(x, p.ln_weight, p.ln_bias, eps)
    h = F.relu(F.linear(h, p.down_weight, p.down_bias))
    return scaled_up_projection(h, p.up_weight, p.up_bias, p.scale)


def _mixed_task_adapter(
    x: torch.Tensor, params: AdapterParams, task_ids: torch.Tensor, eps: float
) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if static_shapes_enabled() or torch.compiler.is_compiling():
        return _every_task_masked(rows, params, task_ids, eps).reshape(x.shape)
    out = rows.new_zeros(rows.shape)
    for task in torch.unique(task_ids).tolist():
        idx = (task_ids == task).nonzero(as_tuple=True)[0]
        task_params = AdapterParams(*(p[task] for p in params))
        out = out.index_put((idx,), _single_adapter(rows.index_select(0, idx), task_params, eps))
    return out.reshape(x.shape)


def _every_task_masked(
    rows: torch.Tensor, params: AdapterParams, task_ids: torch.Tensor, eps: float
) -> torch.Tensor:
    """Each task's adapter over every row, each row keeping its own task's output: as many times the work
    as there are tasks, but no read-back and no shape that depends on the ids, as graph capture and
    compile tracing need."""
    out = rows.new_zeros(rows.shape)
    for task in range(params.ln_weight.shape[0]):
        own = (task_ids == task).unsqueeze(-1)
        out = torch.where(own, _single_adapter(rows, AdapterParams(*(p[task] for p in params)), eps), out)
    return out


def residual_list(residual: Residual) -> list[torch.Tensor]:
    if residual is None:
        return []
    if isinstance(residual, torch.Tensor):
        return [residual]
    return list(residual)


def promote_under_autocast(x: torch.Tensor, residuals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Under autocast a block's residual stream and its branch outputs may differ in dtype (float32 stream,
    bf16 branches): the terms are brought to x's dtype, the dtype of the stream the output continues."""
    if not residuals or not torch.is_autocast_enabled("cuda" if x.is_cuda else x.device.type):
        return residuals
    return [r.to(x.dtype) if r.is_floating_point() and r.dtype != x.dtype else r for r in residuals]


_TENSOR_TYPES = (torch.Tensor,) * len(AdapterParams._fields)  # isinstance's second argument, per parameter


def check_adapter_args(
    x: torch.Tensor, params: AdapterParams, task_ids: torch.Tensor | None, check_values: bool = True
) -> None:
    """Shape, dtype and device checks with messages that name the argument; ``check_values`` adds the
    range check of the task ids (a read-back from the device). One pass over the parameters, each read
    once: this runs on every adapter call, where the host's time counts."""
    if not (isinstance(x, torch.Tensor) and all(map(isinstance, params, _TENSOR_TYPES))):
        for name, t in zip(("x", *AdapterParams._fields), (x, *params)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"fused_adapter: {name} must be a tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("fused_adapter: x must have at least one dimension (..., d)")
    if not x.is_floating_point():
        raise ValueError(f"fused_adapter: x must be floating point, got {x.dtype}")
    d = x.shape[-1]
    if d == 0:
        raise ValueError(f"fused_adapter: x of shape {tuple(x.shape)} has no features (d = 0) to normalise")
    if task_ids is not None and params.ln_weight.dim() != 2:
        raise ValueError(
            f"fused_adapter: with task_ids every parameter has a leading task dimension; ln_weight has "
            f"shape {tuple(params.ln_weight.shape)}, expected (T, {d})"
        )
    lead = () if task_ids is None else (params.ln_weight.shape[0],)
    r = params.down_weight.shape[-2] if params.down_weight.dim() >= 2 else -1
    expected = [lead + want for want in ((d,), (d,), (r, d), (r,), (d, r), (d,), (1,))]
    device, dtype = x.device, params.ln_weight.dtype
    floating = dtype.is_floating_point  # every parameter has this dtype, or the loop raises
    for name, t, want in zip(AdapterParams._fields, params, expected):
        if t.shape != want:
            raise ValueError(
                f"fused_adapter: {name} has shape {tuple(t.shape)}, expected {want} "
                f"for x of shape {tuple(x.shape)}"
            )
        if t.device != device:
            raise ValueError(f"fused_adapter: {name} is on {t.device} but x is on {device}")
        if t.dtype != dtype or not floating:
            if not t.is_floating_point():
                raise ValueError(f"fused_adapter: {name} must be floating point, got {t.dtype}")
            dtypes = sorted({str(p.dtype) for p in params})
            raise ValueError(f"fused_adapter: the adapter parameters mix dtypes {dtypes}")
    if not params_dtype_allowed(x, dtype):
        raise ValueError(
            f"fused_adapter: parameters are {dtype} but x is {x.dtype} (allowed: {allowed_params_dtypes()})"
        )
    if task_ids is not None:
        _check_task_ids(x, task_ids, params.ln_weight.shape[0], check_values)


def _check_task_ids(x: torch.Tensor, task_ids: torch.Tensor, n_tasks: int, check_values: bool = True) -> None:
    rows = x.numel() // max(x.shape[-1], 1)
    if task_ids.shape != (rows,):
        raise ValueError(
            f"fused_adapter: task_ids has shape {tuple(task_ids.shape)}, expected ({rows},): one per row"
        )
    if task_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_adapter: task_ids must be int32 or int64, got {task_ids.dtype}")
    if task_ids.device != x.device:
        raise ValueError(f"fused_adapter: task_ids is on {task_ids.device} but x is on {x.device}")
    if check_values and task_ids.numel() and host_reads_allowed():
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < 0 or high >= n_tasks:
            raise ValueError(
                f"fused_adapter: task_ids must lie in [0, {n_tasks}), got values in [{low}, {high}]"
            )


def check_residuals(x: torch.Tensor, residuals: list[torch.Tensor]) -> None:
    """Every residual term has x's shape, dtype and device (they are summed into the output)."""
    if not residuals:
        return
    shape, device, dtype = x.shape, x.device, x.dtype
    for i, res in enumerate(residuals):
        if not isinstance(res, torch.Tensor):
            raise ValueError(f"fused_adapter: residual[{i}] must be a tensor, got {type(res).__name__}")
        if res.shape != shape:
            raise ValueError(
                f"fused_adapter: residual[{i}] has shape {tuple(res.shape)} but x has {tuple(shape)}"
            )
        if res.device != device:
            raise ValueError(f"fused_adapter: residual[{i}] is on {res.device} but x is on {device}")
        if res.dtype != dtype:
            raise ValueError(f"fused_adapter: residual[{i}] has dtype {res.dtype} but x has {dtype}")


# Where the automatic choice takes the Triton kernels on a GPU (H200, bf16, d = 768; bench/RESULTS.md).
# Called eagerly, a call's host time decides below 2^20 rows: at 1,048,576 rows and r = 64 the kernels took
# 0.44-0.67x the PyTorch time; at 12,608 rows (a ViT-B/16 batch of 64) 1.2-2.2x, the host's work being 77-89%
# of the call. Inside a step replayed as a CUDA graph only device time is left, and there the kernels took
# 0.47x the PyTorch kernels' time forward and 0.52x backward at 12,608 rows (2026-11-27, second run). Fewer
# rows were not measured. All of these were measured with bf16 activations and bf16 parameters, one task a
# call, and the rule holds only there. A model training under bf16 autocast keeps float32 parameters (and a
# float32 residual stream in part of its adapters), and mixes tasks: in the graphed four-task ViT-B/16 step
# at batch 64 the kernels' backward took 16.2 ms a call (63,040 vision rows of three tasks), 388 ms of the
# step's 631 ms, and the step 635 ms against 267 ms with the reference (H200, 2026-11-27, third run). So
# training with float32 parameters never takes the kernels automatically. With ``train.master_weights`` on
# the bf16 stream the parameters are bf16 too: a graphed step's one-task calls of 12,608 rows or more (a
# ViT-B/16 batch of 64 in the vision tower) are then the measured case and take them; such a whole step is
# not yet timed (``fast_master_weights`` beside ``fast_master_weights_torch_ops`` in bench_train_step).
TRITON_ADAPTER_MIN_ROWS = 1 << 20
TRITON_ADAPTER_MIN_ROWS_IN_GRAPH = 12_608
TRITON_ADAPTER_MAX_R = 128
MEASURED_DTYPES = (torch.bfloat16,)


def triton_adapter_pays(x: torch.Tensor, params: AdapterParams, mixed: bool = False) -> bool:
    """The measured rule for the automatic backend on a GPU: what was measured faster, one task's adapter
    (``mixed`` False) with bf16 activations and bf16 parameters, a bottleneck kept on chip,
    and many rows, or fewer in a training step captured as a CUDA graph (its warm-up and capture run under
    ``static_shapes`` with autograd on). Graphed caption decoding, under no_grad, keeps the PyTorch
    adapters, so that its tokens stay those of eager decoding."""
    if mixed or x.dtype not in MEASURED_DTYPES or params.down_weight.dtype != x.dtype:
        return False
    if params.down_weight.shape[-2] > TRITON_ADAPTER_MAX_R:
        return False
    rows = x.numel() // max(1, x.shape[-1])
    # decided by the rows alone where they can (one comparison at a time: under torch.compile with a
    # dynamic batch they are symbolic, and two symbolic truths cannot be compared with each other)
    if rows < TRITON_ADAPTER_MIN_ROWS_IN_GRAPH:
        return False
    if rows >= TRITON_ADAPTER_MIN_ROWS:
        return True
    return torch.is_grad_enabled() and static_shapes_enabled()  # a graphed training step


def _adapter_product_flops(x_shape: Sequence[int], down_weight_shape: Sequence[int]) -> int:
    """FLOPs of one (N, d) @ (d, r) product: x (N, d), down_weight (r, d) or (T, r, d), every row through
    one adapter whichever its task."""
    return matmul_flops(math.prod(x_shape[:-1]), x_shape[-1], down_weight_shape[-2])


def adapter_forward_flops(
    x_shape: Sequence[int],
    ln_weight_shape: Sequence[int],
    ln_bias_shape: Sequence[int],
    down_weight_shape: Sequence[int],
    *args: object,
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """FLOPs of ``famevil_fast::adapter_forward``: the down and up projections, (N, d) @ (d, r) and
    (N, r) @ (r, d), as FlopCounterMode counts the reference's two linear layers."""
    return 2 * _adapter_product_flops(x_shape, down_weight_shape)


def adapter_backward_flops(
    grad_shape: Sequence[int],
    x_shape: Sequence[int],
    ln_weight_shape: Sequence[int],
    ln_bias_shape: Sequence[int],
    down_weight_shape: Sequence[int],
    *args: object,
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """FLOPs of ``famevil_fast::adapter_backward``: the input and the weight gradient of both projections,
    four products of the forward's size (the operator computes every gradient)."""
    return 4 * _adapter_product_flops(x_shape, down_weight_shape)


# Registered on first use of the kernels (``counting_flops``): the operators exist once
# famevil_fast.kernels.custom_ops is imported, which the Triton path does lazily.
ADAPTER_FLOP_FORMULAS = {"adapter_forward": adapter_forward_flops, "adapter_backward": adapter_backward_flops}


def _triton_adapter(
    x: torch.Tensor,
    params: AdapterParams,
    residuals: list[torch.Tensor],
    task_ids: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    from famevil_fast.kernels import custom_ops  # noqa: F401  (registers torch.ops.famevil_fast)

    flat = x.dim() == 2  # already a row matrix: no reshape of the inputs, no view of the output
    d = x.shape[-1]
    rows = (x if flat else x.reshape(-1, d)).contiguous()
    res = [(t if flat else t.reshape(-1, d)).contiguous() for t in residuals]
    ps = tuple([p.contiguous() for p in widened_for(x, params)])
    ids = None if task_ids is None else task_ids.contiguous()
    save = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in ps))
    products = autocast_product_dtype(x)
    # an opaque node of a compiled graph; or the operator a FLOP counter sees, with its formula
    if torch.compiler.is_compiling() or counting_flops(ADAPTER_FLOP_FORMULAS):
        y = torch.ops.famevil_fast.adapter_forward(rows, *ps, res, ids, save, eps, products)[0]
    else:  # the same kernels without the operator dispatch's host cost
        from famevil_fast.kernels.autograd import fused_adapter_eager

        y = fused_adapter_eager(rows, ps, res, ids, save, eps, products)
    return y if flat else y.view(*x.shape)


def autocast_product_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype of the kernels' matrix-product operands when it is not x's: under autocast, whose linear
    layers multiply in its 16-bit dtype, for a float32 x (a float32 residual stream); else None. The kernels
    keep reading and writing x's dtype, and their LayerNorm and accumulations in float32. The fused kernels
    (r <= 128) take it; the split path (r > 128) multiplies in x's dtype."""
    return autocast_dtype(x) if x.dtype == torch.float32 else None


def _scale_as_tensor(scale: torch.Tensor | float, ln_weight: torch.Tensor, per_task: bool) -> torch.Tensor:
    """A Python number as the constant scale tensor that ``ln_weight``'s adapter(s) take, and a single
    adapter's 0-d scale tensor as a (1,) view (its gradient flows back to it); else unchanged."""
    if isinstance(scale, torch.Tensor):
        return scale.reshape(1) if scale.dim() == 0 and not per_task else scale
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not number or not isinstance(ln_weight, torch.Tensor):
        return scale
    lead = ln_weight.shape[:1] if per_task and ln_weight.dim() == 2 else ()
    return torch.full((*lead, 1), float(scale), dtype=ln_weight.dtype, device=ln_weight.device)


def fused_adapter(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scale: torch.Tensor | float,
    residual: Residual = None,
    task_ids: torch.Tensor | None = None,
    backend: str | None = None,
    eps: float = LN_EPS,
    check_task_ids: bool = True,
) -> torch.Tensor:
    """``residual + scale * up(relu(down(layer_norm(x))))`` for x of shape (..., d).

    ``residual`` may be a tensor or a sequence of tensors (the other branches of a block), all summed into
    the output; each has x's shape and dtype. ``scale`` is a (1,) tensor, or 0-d for a single adapter
    (gradients flow to it), or a Python number (a constant). With ``task_ids`` (one integer per row of x)
    every parameter has a leading task dimension and row i uses adapter ``task_ids[i]``. Parameters share
    one dtype, x's or float32.
    ``backend``: "triton", "torch" or None (automatic: on CUDA, Triton where it was measured faster,
    ``triton_adapter_pays``; on the CPU, Triton under TRITON_INTERPRET=1; ``FAMEVIL_FAST_BACKEND``
    overrides the automatic choice). Under autocast a float32 x's matrix products take the autocast dtype
    for r <= 128, as the reference's linear layers do (``autocast_product_dtype``).
    ``check_task_ids=False`` skips the range check of the task ids, the one check that reads a tensor back
    from the device, for callers that built the ids themselves.
    """
    check_backend("fused_adapter", backend, BACKENDS)
    scale = _scale_as_tensor(scale, ln_weight, task_ids is not None)
    params = AdapterParams(ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias, scale)
    check_adapter_args(x, params, task_ids, check_task_ids)
    residuals = promote_under_autocast(x, residual_list(residual))
    check_residuals(x, residuals)
    if adapter_backend(x, params, backend, mixed=task_ids is not None) == "torch":
        return adapter_reference(x, params, residuals or None, task_ids, eps)
    return _triton_adapter(x, params, residuals, task_ids, eps)


def adapter_backend(
    x: torch.Tensor, params: AdapterParams, backend: str | None = None, mixed: bool = False
) -> str:
    """The backend ``fused_adapter`` runs for x and these parameters (``mixed``: rows of several tasks'
    adapters, ``task_ids`` given): "triton" or "torch". The measured rule (``triton_adapter_pays``) is
    consulted only where it decides: an automatic choice on a GPU."""
    return select_backend(
        "fused_adapter", backend, BACKENDS, x, lambda: triton_adapter_pays(x, params, mixed)
    )
