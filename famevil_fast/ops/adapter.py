"""The bottleneck adapter op: ``residual + scale * up(relu(down(layer_norm(x))))``.

Owns the public ``fused_adapter`` function, its argument checks and the plain-PyTorch reference. Fast
backends plug in through ``_BACKENDS``; ``backend="torch"`` always runs the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from famevil_fast.ops._backend import check_backend

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
    total = residual[0]
    for extra in residual[1:]:
        total = total + extra
    return total


def adapter_reference(
    x: torch.Tensor, params: AdapterParams, residual: Residual = None, task_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain PyTorch: one adapter for every row, or row i through adapter ``task_ids[i]``."""
    if task_ids is None:
        y = _single_adapter(x, params)
    else:
        y = _mixed_task_adapter(x, params, task_ids)
    res = sum_residuals(residual)
    return y if res is None else res + y


def _single_adapter(x: torch.Tensor, p: AdapterParams) -> torch.Tensor:
    h = F.layer_norm(x, (x.shape[-1],), p.ln_weight, p.ln_bias, LN_EPS)
    h = F.relu(F.linear(h, p.down_weight, p.down_bias))
    return F.linear(h, p.up_weight, p.up_bias) * p.scale


def _mixed_task_adapter(x: torch.Tensor, params: AdapterParams, task_ids: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_zeros(rows.shape)
    for task in torch.unique(task_ids).tolist():
        idx = (task_ids == task).nonzero(as_tuple=True)[0]
        task_params = AdapterParams(*(p[task] for p in params))
        out = out.index_put((idx,), _single_adapter(rows.index_select(0, idx), task_params))
    return out.reshape(x.shape)


def check_adapter_args(x: torch.Tensor, params: AdapterParams, task_ids: torch.Tensor | None) -> None:
    """Shape, dtype and device checks with messages that name the argument."""
    if x.dim() < 1:
        raise ValueError("fused_adapter: x must have at least one dimension (..., d)")
    d = x.shape[-1]
    lead = () if task_ids is None else (params.ln_weight.shape[0],)
    r = params.down_weight.shape[-2] if params.down_weight.dim() >= 2 else -1
    expected = {
        "ln_weight": lead + (d,),
        "ln_bias": lead + (d,),
        "down_weight": lead + (r, d),
        "down_bias": lead + (r,),
        "up_weight": lead + (d, r),
        "up_bias": lead + (d,),
        "scale": lead + (1,),
    }
    for name, want in expected.items():
        got = tuple(getattr(params, name).shape)
        if got != want:
            raise ValueError(f"fused_adapter: {name} has shape {got}, expected {want} for x of shape {tuple(x.shape)}")
    for name, t in params._asdict().items():
        if t.device != x.device:
            raise ValueError(f"fused_adapter: {name} is on {t.device} but x is on {x.device}")
        if not t.is_floating_point():
            raise ValueError(f"fused_adapter: {name} must be floating point, got {t.dtype}")
    if task_ids is not None:
        rows = x.numel() // max(d, 1)
        if task_ids.shape != (rows,):
            raise ValueError(f"fused_adapter: task_ids has shape {tuple(task_ids.shape)}, expected ({rows},): one per row")
        if task_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"fused_adapter: task_ids must be int32 or int64, got {task_ids.dtype}")
        if task_ids.device != x.device:
            raise ValueError(f"fused_adapter: task_ids is on {task_ids.device} but x is on {x.device}")


_BACKENDS: dict[str, object] = {}


def fused_adapter(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    scale: torch.Tensor,
    residual: Residual = None,
    task_ids: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``residual + scale * up(relu(down(layer_norm(x))))`` for x of shape (..., d).

    ``residual`` may be a tensor or a sequence of tensors (the other branches of a block), all summed into
    the output. With ``task_ids`` (one integer per row of x) every parameter has a leading task dimension
    and row i uses adapter ``task_ids[i]``. ``backend``: "triton", "torch" or None (automatic).
    """
    check_backend("fused_adapter", backend, BACKENDS)
    params = AdapterParams(ln_weight, ln_bias, down_weight, down_bias, up_weight, up_bias, scale)
    check_adapter_args(x, params, task_ids)
    return adapter_reference(x, params, residual, task_ids)
