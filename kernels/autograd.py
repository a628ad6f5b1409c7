"""Eager-mode entry points of the fused kernels: ``torch.autograd.Function`` classes that call the
launchers directly. They run the same kernels and gradient formulas as the registered
``famevil_fast::adapter_*``, ``famevil_fast::ln_linear_*`` and ``famevil_fast::quick_gelu*`` operators
(``custom_ops``) without torch.library's dispatch and argument flattening, which cost more host time than
a small op's kernels take on a GPU. ``torch.compile`` graphs use the registered operators.
"""

from collections.abc import Callable
from typing import TypeVar

import torch
from famevil_fast.kernels import activation, launch
from famevil_fast.kernels.custom_ops import task_rows

from famevil_fast.ops._backend import once_differentiable_grads

N_PARAMS = 7
T = TypeVar("T")


def without_grad(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` with autograd off: a backward's launchers run with it off already (unless the backward
    builds a graph, ``create_graph=True``), and then the mode is not switched at all."""
    if not torch.is_grad_enabled():
        return fn(*args)
    with torch.no_grad():
        return fn(*args)


class FusedAdapterFunction(torch.autograd.Function):
    """apply(x, task_ids, save, eps, product_dtype, *params, *residuals) -> y. Arguments are already checked
    (the task ids' range included): ``famevil_fast.ops.fused_adapter`` validates before it calls this. Rows
    are grouped by task once, in the forward pass; the backward reuses that grouping and the forward's
    product dtype (``launch.adapter_output``)."""

    @staticmethod
    def forward(ctx, x, task_ids, save, eps, product_dtype, *tensors):
        params, residuals = tensors[:N_PARAMS], list(tensors[N_PARAMS:])
        rows = task_rows(task_ids, params, validate=False)
        y, h, mean, rstd = launch.adapter_forward(
            x, params, residuals, rows, save, eps, product_dtype=product_dtype
        )
        ctx.saved = save
        ctx.rows = rows
        ctx.product_dtype = product_dtype
        ctx.num_residuals = len(residuals)
        if save:
            ctx.save_for_backward(x, *params, h, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        residual_grads = (grad_y,) * ctx.num_residuals
        needs = ctx.needs_input_grad
        if not (ctx.saved and (needs[0] or any(needs[5 : 5 + N_PARAMS]))):
            return (None,) * (5 + N_PARAMS) + residual_grads
        saved = ctx.saved_tensors
        x, params, (h, mean, rstd) = saved[0], saved[1 : 1 + N_PARAMS], saved[1 + N_PARAMS :]
        backward = launch.adapter_backward
        grads = without_grad(
            backward, grad_y.contiguous(), x, params, h, mean, rstd, ctx.rows, ctx.product_dtype
        )
        grads = once_differentiable_grads("fused_adapter", grads, (grad_y, x, *params))
        return (grads[0], None, None, None, None, *grads[1:], *residual_grads)


def fused_adapter_eager(
    x: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    residuals: list[torch.Tensor],
    task_ids: torch.Tensor | None,
    save: bool,
    eps: float,
    product_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``residual sum + adapter(x)`` for row-matrix x through the eager autograd function; under no_grad
    (evaluation, decoding) the launchers run alone, without an autograd node. ``product_dtype``: see
    ``launch.adapter_output``."""
    if not torch.is_grad_enabled():
        rows = task_rows(task_ids, params, validate=False)
        return launch.adapter_output(x, params, residuals, rows, eps, product_dtype=product_dtype)
    return FusedAdapterFunction.apply(x, task_ids, save, eps, product_dtype, *params, *residuals)


class LayerNormLinearFunction(torch.autograd.Function):
    """apply(x, save, eps, ln_weight, ln_bias, weight, bias) -> LN(x) W^T + b for row-matrix x."""

    @staticmethod
    def forward(ctx, x, save, eps, ln_weight, ln_bias, weight, bias):
        out, mean, rstd = launch.ln_linear_forward(x, ln_weight, ln_bias, weight, bias, save, eps)
        ctx.saved = save
        if save:
            ctx.save_for_backward(out, x, mean, rstd, ln_weight, ln_bias, weight, bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.saved:
            return (None,) * 7
        out, x, mean, rstd, *params = ctx.saved_tensors
        grads = without_grad(launch.ln_linear_backward, grad_out.contiguous(), out, x, mean, rstd, *params)
        depends = (grad_out, x, *params)
        dx, *param_grads = once_differentiable_grads("layer_norm_linear", grads, depends)
        return (dx, None, None, *param_grads)


def layer_norm_linear_eager(
    x: torch.Tensor, params: list[torch.Tensor], save: bool, eps: float
) -> torch.Tensor:
    """``LN(x) W^T + b`` for row-matrix x through the eager autograd function (the launcher alone under
    no_grad)."""
    if not torch.is_grad_enabled():
        return launch.ln_linear_output(x, *params, eps)
    return LayerNormLinearFunction.apply(x, save, eps, *params)


class QuickGELUFunction(torch.autograd.Function):
    """apply(x) -> x * sigmoid(1.702 x) for contiguous x; the backward recomputes the sigmoid from x."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return activation.quick_gelu_forward(x)

    @staticmethod
    def backward(ctx, grad_y):
        (x,) = ctx.saved_tensors
        dx = without_grad(activation.quick_gelu_backward, grad_y.contiguous(), x)
        return once_differentiable_grads("quick_gelu", (dx,), (grad_y, x))[0]


def quick_gelu_eager(x: torch.Tensor) -> torch.Tensor:
    """QuickGELU of contiguous x through the eager autograd function (the launcher alone under no_grad or
    when x needs no gradient)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return activation.quick_gelu_forward(x)
    return QuickGELUFunction.apply(x)
