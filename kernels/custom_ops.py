"""The Triton launchers registered as ``torch.library`` operators (namespace ``famevil_fast``), with fake
(meta) implementations and autograd formulas, so that ``torch.compile`` graphs can hold them as opaque
nodes and ``torch.library.opcheck`` can verify them.

Operators (all tensors 2-D row matrices; adapter parameters with or without a leading task dimension):

* ``adapter_forward(x, ln_w, ln_b, down_w, down_b, up_w, up_b, scale, residuals, task_ids, save, eps,
  product_dtype=None)`` -> (y, h, mean, rstd); h and the statistics are empty unless ``save``;
  ``product_dtype`` the dtype of the products' operands where it is not x's (``launch.adapter_output``).
* ``adapter_backward(dy, x, <7 params>, h, mean, rstd, task_ids, product_dtype=None)`` -> 8 gradients.
* ``ln_linear_forward(x, ln_w, ln_b, w, b, save, eps)`` -> (LN(x) W^T + b, mean, rstd).
* ``ln_linear_backward(dout, out, x, mean, rstd, ln_w, ln_b, w, b)`` -> 5 gradients.
* ``quick_gelu(x)`` -> x * sigmoid(1.702 x) (any shape); ``quick_gelu_backward(grad, x)`` -> its dx.
"""

# No ``from __future__ import annotations`` here: torch.library reads the annotations to build schemas.

import torch
from famevil_fast.kernels import activation, launch

from famevil_fast.capture import host_reads_allowed


def task_rows(
    task_ids: torch.Tensor | None, params: tuple[torch.Tensor, ...], validate: bool = True
) -> launch.TaskRows:
    """The row grouping the kernels take: rows sorted by task on the device, for as many tasks as the
    parameters' leading dimension (after a range check of the ids unless ``validate`` is False or a host
    read is not allowed)."""
    if task_ids is None:
        return launch.SINGLE_TASK
    n_tasks = params[0].shape[0]
    if validate and task_ids.numel() and host_reads_allowed():
        low, high = int(task_ids.min()), int(task_ids.max())
        if low < 0 or high >= n_tasks:
            raise ValueError(
                f"fused_adapter: task_ids must lie in [0, {n_tasks}), got values in [{low}, {high}]"
            )
    return launch.group_rows(task_ids, n_tasks)


@torch.library.custom_op("famevil_fast::adapter_forward", mutates_args=())
def adapter_forward(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scale: torch.Tensor,
    residuals: list[torch.Tensor],
    task_ids: torch.Tensor | None,
    save: bool,
    eps: float,
    product_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    params = (ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias, scale)
    check_adapter_shapes(x, params, residuals, task_ids)
    x, params, residuals = x.contiguous(), _contiguous(params), list(_contiguous(residuals))
    rows = task_rows(task_ids, params)
    return launch.adapter_forward(x, params, residuals, rows, save, eps, product_dtype=product_dtype)


def _contiguous(tensors) -> tuple[torch.Tensor, ...]:
    """The kernels address rows as contiguous (no copy for a tensor that already is)."""
    return tuple(t.contiguous() for t in tensors)


def _shape_error(op: str, what: str, got: torch.Tensor, want: object) -> ValueError:
    return ValueError(f"{op}: {what} has shape {tuple(got.shape)}, expected {want}")


def check_adapter_shapes(
    x: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    residuals: list[torch.Tensor],
    task_ids: torch.Tensor | None,
) -> None:
    """Shapes only (no read of values): x (N, d); the parameters (ln_w (d,), ln_b (d,), down_w (r, d),
    down_b (r,), up_w (d, r), up_b (d,), scale (1,)) all with, or all without, one leading task dimension T
    (with it when ``task_ids`` (N,) is given); every residual (N, d)."""
    op = "famevil_fast::adapter_forward"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (N, d), got shape {tuple(x.shape)}")
    n, d = x.shape
    r = params[2].shape[-2] if params[2].dim() >= 2 else -1
    lead = tuple(params[0].shape[:-1])
    if len(lead) > 1 or (task_ids is not None and len(lead) != 1):
        raise _shape_error(op, "ln_weight", params[0], ("T", d) if task_ids is not None else (d,))
    names = ("ln_weight", "ln_bias", "down_weight", "down_bias", "up_weight", "up_bias", "scale")
    for name, p, want in zip(names, params, ((d,), (d,), (r, d), (r,), (d, r), (d,), (1,))):
        if tuple(p.shape) != lead + want:
            raise _shape_error(op, name, p, f"{lead + want} for x of shape {tuple(x.shape)}")
    for i, res in enumerate(residuals):
        if res.shape != x.shape:
            raise _shape_error(op, f"residuals[{i}]", res, (n, d))
    if task_ids is not None and tuple(task_ids.shape) != (n,):
        raise _shape_error(op, "task_ids", task_ids, (n,))


@adapter_forward.register_fake
def _(
    x, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias, scale, residuals, task_ids, save, eps,
    product_dtype=None,
):  # fmt: skip
    rows = x.shape[0] if save else 0
    r = down_weight.shape[-2]
    stats = x.new_empty((rows,), dtype=torch.float32)
    y = x.new_empty(x.shape)  # contiguous, as the launcher's (the op makes x contiguous)
    return y, x.new_empty((rows, r), dtype=torch.float32), stats, torch.empty_like(stats)


@torch.library.custom_op("famevil_fast::adapter_backward", mutates_args=())
def adapter_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scale: torch.Tensor,
    h: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    task_ids: torch.Tensor | None,
    product_dtype: torch.dtype | None = None,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    if h.shape[0] != x.shape[0]:
        raise ValueError("fused_adapter backward: the forward pass did not save its activations (save=False)")
    params = _contiguous((ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias, scale))
    grad, x, h, mean, rstd = _contiguous((grad, x, h, mean, rstd))
    rows = task_rows(task_ids, params)
    return launch.adapter_backward(grad, x, params, h, mean, rstd, rows, product_dtype)


@adapter_backward.register_fake
def _(
    grad, x, ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias, scale, h, mean, rstd, task_ids,
    product_dtype=None,
):  # fmt: skip
    params = (ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias, scale)
    return tuple(t.new_empty(t.shape) for t in (x, *params))


def _adapter_setup_context(ctx, inputs, output) -> None:
    x, *params, residuals, task_ids, save, _eps, product_dtype = inputs
    _y, h, mean, rstd = output
    ctx.save_for_backward(x, *params, h, mean, rstd, task_ids)
    ctx.product_dtype = product_dtype
    ctx.num_residuals = len(residuals)
    ctx.saved_activations = save
    ctx.mark_non_differentiable(h, mean, rstd)


def _adapter_backward_rule(ctx, grad_y, _grad_h, _grad_mean, _grad_rstd):
    """Residual terms pass the output gradient through; the adapter's own gradients need the saved
    activations, which the forward pass keeps whenever x or a parameter requires a gradient."""
    x, *params, h, mean, rstd, task_ids = ctx.saved_tensors
    residual_grads = [grad_y] * ctx.num_residuals
    if not ctx.saved_activations:
        if any(ctx.needs_input_grad[: 1 + len(params)]):
            raise ValueError(
                "adapter_forward backward: x or a parameter needs a gradient, but the forward pass did not "
                "save its activations (save=False)"
            )
        return (None,) * (1 + len(params)) + (residual_grads, None, None, None, None)
    grads = adapter_backward(grad_y.contiguous(), x, *params, h, mean, rstd, task_ids, ctx.product_dtype)
    return (*grads, residual_grads, None, None, None, None)


adapter_forward.register_autograd(_adapter_backward_rule, setup_context=_adapter_setup_context)


@torch.library.custom_op("famevil_fast::ln_linear_forward", mutates_args=())
def ln_linear_forward(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    save: bool,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "famevil_fast::ln_linear_forward"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (N, d), got shape {tuple(x.shape)}")
    d, n_out = x.shape[1], weight.shape[0] if weight.dim() == 2 else -1
    names = ("ln_weight", "ln_bias", "weight", "bias")
    for name, p, want in zip(names, (ln_weight, ln_bias, weight, bias), ((d,), (d,), (n_out, d), (n_out,))):
        if tuple(p.shape) != want:
            raise _shape_error(op, name, p, f"{want} for x of shape {tuple(x.shape)}")
    x, ln_weight, ln_bias, weight, bias = _contiguous((x, ln_weight, ln_bias, weight, bias))
    return launch.ln_linear_forward(x, ln_weight, ln_bias, weight, bias, save, eps)


@ln_linear_forward.register_fake
def _(x, ln_weight, ln_bias, weight, bias, save, eps):
    rows = x.shape[0] if save else 0
    stats = x.new_empty((rows,), dtype=torch.float32)
    return x.new_empty((x.shape[0], weight.shape[0])), stats, torch.empty_like(stats)


@torch.library.custom_op("famevil_fast::ln_linear_backward", mutates_args=())
def ln_linear_backward(
    grad: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if mean.shape[0] != x.shape[0]:
        raise ValueError("ln_linear backward: the forward pass did not save its statistics (save=False)")
    tensors = _contiguous((grad, out, x, mean, rstd, ln_weight, ln_bias, weight, bias))
    return launch.ln_linear_backward(*tensors)


@ln_linear_backward.register_fake
def _(grad, out, x, mean, rstd, ln_weight, ln_bias, weight, bias):
    return tuple(t.new_empty(t.shape) for t in (x, ln_weight, ln_bias, weight, bias))


def _ln_linear_setup_context(ctx, inputs, output) -> None:
    x, ln_weight, ln_bias, weight, bias, _save, _eps = inputs
    out, mean, rstd = output
    ctx.save_for_backward(out, x, mean, rstd, ln_weight, ln_bias, weight, bias)
    ctx.mark_non_differentiable(mean, rstd)


def _ln_linear_backward_rule(ctx, grad_out, _grad_mean, _grad_rstd):
    out, x, mean, rstd, *params = ctx.saved_tensors
    grads = ln_linear_backward(grad_out.contiguous(), out, x, mean, rstd, *params)
    return (*grads, None, None)


ln_linear_forward.register_autograd(_ln_linear_backward_rule, setup_context=_ln_linear_setup_context)


def _check_same_layout(op: str, grad: torch.Tensor, x: torch.Tensor) -> None:
    if grad.shape != x.shape or grad.dtype != x.dtype or grad.device != x.device:
        raise ValueError(
            f"{op}: grad ({tuple(grad.shape)}, {grad.dtype}, {grad.device}) must match x "
            f"({tuple(x.shape)}, {x.dtype}, {x.device})"
        )


@torch.library.custom_op("famevil_fast::quick_gelu", mutates_args=())
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return activation.quick_gelu_forward(x.contiguous())


@quick_gelu.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("famevil_fast::quick_gelu_backward", mutates_args=())
def quick_gelu_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    _check_same_layout("famevil_fast::quick_gelu_backward", grad, x)
    return activation.quick_gelu_backward(grad.contiguous(), x.contiguous())


@quick_gelu_backward.register_fake
def _(grad, x):
    _check_same_layout("famevil_fast::quick_gelu_backward", grad, x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _quick_gelu_setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


def _quick_gelu_backward_rule(ctx, grad):
    return torch.ops.famevil_fast.quick_gelu_backward(grad, ctx.saved_tensors[0])


quick_gelu.register_autograd(_quick_gelu_backward_rule, setup_context=_quick_gelu_setup_context)
