"""Eager-mode entry points of the fused kernels: ``torch.autograd.Function`` classes that call the
launchers directly. They run the same kernels and gradient formulas as the registered
``famevil_fast::adapter_*`` and ``famevil_fast::ln_linear_*`` operators (``custom_ops``) without
torch.library's dispatch and argument flattening, which cost more host time than a small op's kernels
take on a GPU. ``torch.compile`` graphs use the registered operators.
"""

import torch
from famevil_fast.kernels import launch
from famevil_fast.kernels.custom_ops import adapter_forward_impl, task_rows

from famevil_fast.ops._backend import once_differentiable_grads

N_PARAMS = 7


class FusedAdapterFunction(torch.autograd.Function):
    """apply(x, task_ids, save, eps, *params, *residuals) -> y. Arguments are already checked (the task
    ids' range included): ``famevil_fast.ops.fused_adapter`` validates before it calls this. Rows are
    grouped by task once, in the forward pass; the backward reuses that grouping."""

    @staticmethod
    def forward(ctx, x, task_ids, save, eps, *tensors):
        params, residuals = tensors[:N_PARAMS], list(tensors[N_PARAMS:])
        rows = task_rows(task_ids, params, validate=False)
        y, h, mean, rstd = launch.adapter_forward(x, params, residuals, rows, save, eps)
        ctx.saved = save
        ctx.rows = rows
        ctx.num_residuals = len(residuals)
        if save:
            ctx.save_for_backward(x, *params, h, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        residual_grads = (grad_y,) * ctx.num_residuals
        adapter_grads = (None,) * (1 + N_PARAMS)
        needs = ctx.needs_input_grad
        if ctx.saved and (needs[0] or any(needs[4 : 4 + N_PARAMS])):
            x, *params, h, mean, rstd = ctx.saved_tensors
            with torch.no_grad():
                adapter_grads = launch.adapter_backward(
                    grad_y.contiguous(), x, tuple(params), h, mean, rstd, ctx.rows
                )
            depends = (grad_y, x, *params)
            adapter_grads = once_differentiable_grads("fused_adapter", tuple(adapter_grads), depends)
        return (adapter_grads[0], None, None, None, *adapter_grads[1:], *residual_grads)


def fused_adapter_eager(
    x: torch.Tensor,
    params: list[torch.Tensor],
    residuals: list[torch.Tensor],
    task_ids: torch.Tensor | None,
    save: bool,
    eps: float,
) -> torch.Tensor:
    """``residual sum + adapter(x)`` for row-matrix x through the eager autograd function; under no_grad
    (evaluation, decoding) the launchers run alone, without an autograd node."""
    if not torch.is_grad_enabled():
        return adapter_forward_impl(x, tuple(params), residuals, task_ids, False, eps, validate=False)[0]
    return FusedAdapterFunction.apply(x, task_ids, save, eps, *params, *residuals)


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
        with torch.no_grad():
            grads = launch.ln_linear_backward(grad_out.contiguous(), out, x, mean, rstd, *params)
        depends = (grad_out, x, *params)
        dx, *param_grads = once_differentiable_grads("layer_norm_linear", tuple(grads), depends)
        return (dx, None, None, *param_grads)


def layer_norm_linear_eager(
    x: torch.Tensor, params: list[torch.Tensor], save: bool, eps: float
) -> torch.Tensor:
    """``LN(x) W^T + b`` for row-matrix x through the eager autograd function (the launcher alone under
    no_grad)."""
    if not torch.is_grad_enabled():
        return launch.ln_linear_forward(x, *params, False, eps)[0]
    return LayerNormLinearFunction.apply(x, save, eps, *params)
