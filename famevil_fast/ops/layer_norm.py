"""LayerNorm as the model and the ops' references run it on a 16-bit input under autocast.

Autocast runs every LayerNorm in float32 and writes float32, so a bf16 input is cast up first and the
output cast down again by the product that reads it: two extra passes over the activations. Normalised in
its own dtype instead (the LayerNorm kernels accumulate the statistics in float32; the output is rounded
once to the input's dtype) the casts disappear. CUDA's LayerNorm takes its weight and bias in the input's
dtype only, so they are rounded to it, as the references already rounded them for a 16-bit input. Outside
autocast, or for a float32 input, this is ``F.layer_norm`` with the parameters in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.bfloat16, torch.float16)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The 16-bit dtype autocast computes products in on x's device, or None where autocast is off."""
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return dtype if dtype in LOW_PRECISION else None


def params_dtype_allowed(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the fused ops take parameters of ``dtype`` for ``x``: x's dtype or float32, or, for a float32
    x under autocast, the autocast dtype (a bf16 model's parameters on the float32 residual stream)."""
    return dtype in (x.dtype, torch.float32) or (x.dtype == torch.float32 and dtype == autocast_dtype(x))


def allowed_params_dtypes(name: str = "x") -> str:
    """What ``params_dtype_allowed`` allows, in words, for an input called ``name``."""
    return f"{name}'s dtype, float32, or for a float32 {name} under autocast the autocast dtype"


def widened_for(x: torch.Tensor, params: tuple) -> tuple:
    """``params`` (a tuple or NamedTuple of tensors) as float32 where x is float32 and they are not: the
    Triton kernels take parameters of x's dtype or float32 (the references take them as they are)."""
    if x.dtype != torch.float32 or all(p.dtype == torch.float32 for p in params):
        return params
    return type(params)(*(p.float() for p in params))


def keeps_input_dtype(x: torch.Tensor) -> bool:
    """Whether ``layer_norm_in_dtype`` normalises ``x`` in its own dtype: 16-bit under autocast."""
    return x.dtype in LOW_PRECISION and autocast_dtype(x) is not None


def layer_norm_in_dtype(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x`` with ``weight`` and ``bias`` in x's dtype (gradients
    flow back to them in theirs; None: no affine part). Under autocast a 16-bit ``x`` is normalised in its
    own dtype, which autocast would otherwise promote to float32."""
    shape = (x.shape[-1],)
    weight = None if weight is None else weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if keeps_input_dtype(x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, shape, weight, bias, eps)
    return F.layer_norm(x, shape, weight, bias, eps)
