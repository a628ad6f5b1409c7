"""LayerNorm as the model and the ops' references run it on a 16-bit input under autocast.

Autocast runs every LayerNorm in float32 and writes float32, so a bf16 input is cast up first and the
output cast down again by the product that reads it: two extra passes over the activations. Normalised in
its own dtype instead (float32 statistics and parameters inside the kernel, the output rounded once to the
input's dtype), the result is the same to within that final rounding and the casts disappear. Outside
autocast, or for a float32 input, this is ``F.layer_norm`` with the parameters in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOW_PRECISION = (torch.bfloat16, torch.float16)


def keeps_input_dtype(x: torch.Tensor) -> bool:
    """Whether ``layer_norm_in_dtype`` normalises ``x`` in its own dtype: 16-bit under autocast."""
    return x.dtype in LOW_PRECISION and torch.is_autocast_enabled(x.device.type)


def layer_norm_in_dtype(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x``. Under autocast a 16-bit ``x`` is normalised in its own
    dtype with ``weight`` and ``bias`` as they are (float32 parameters stay float32); otherwise the
    parameters take x's dtype."""
    shape = (x.shape[-1],)
    if keeps_input_dtype(x):
        if weight.dtype != bias.dtype:
            bias = bias.to(weight.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, shape, weight, bias, eps)
    return F.layer_norm(x, shape, weight.to(x.dtype), bias.to(x.dtype), eps)
