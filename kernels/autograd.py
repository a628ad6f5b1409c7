"""Eager-mode entry point of the fused adapter: a ``torch.autograd.Function`` that calls the launchers
directly. It runs the same kernels and gradient formulas as the registered ``famevil_fast::adapter_*``
operators (``custom_ops``) without torch.library's dispatch and argument flattening, which cost more host
time than a small adapter's kernels take on a GPU. ``torch.compile`` graphs use the registered operators.
"""

import torch
from famevil_fast.kernels.custom_ops import adapter_backward_impl, adapter_forward_impl

N_PARAMS = 7


class FusedAdapterFunction(torch.autograd.Function):
    """apply(x, task_ids, save, eps, *params, *residuals) -> y. Arguments are already checked (the task
    ids' range included): ``famevil_fast.ops.fused_adapter`` validates before it calls this."""

    @staticmethod
    def forward(ctx, x, task_ids, save, eps, *tensors):
        params, residuals = tensors[:N_PARAMS], list(tensors[N_PARAMS:])
        y, h, mean, rstd = adapter_forward_impl(x, params, residuals, task_ids, save, eps, validate=False)
        ctx.saved = save
        ctx.task_ids = task_ids
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
            adapter_grads = adapter_backward_impl(
                grad_y.contiguous(), x, tuple(params), h, mean, rstd, ctx.task_ids, validate=False
            )
        return (adapter_grads[0], None, None, None, *adapter_grads[1:], *residual_grads)


def fused_adapter_eager(
    x: torch.Tensor,
    params: list[torch.Tensor],
    residuals: list[torch.Tensor],
    task_ids: torch.Tensor | None,
    save: bool,
    eps: float,
) -> torch.Tensor:
    """``residual sum + adapter(x)`` for row-matrix x through the eager autograd function."""
    return FusedAdapterFunction.apply(x, task_ids, save, eps, *params, *residuals)
