"""QuickGELU, ``y = x * sigmoid(1.702 x)`` (the activation of CLIP's MLPs), one pass over memory each way.

PyTorch runs it as three elementwise kernels forward (``1.702 x``, its sigmoid, the product) and five
backward, each reading and writing tensors of the MLP's hidden width. Here the forward reads x and writes y,
and the backward reads x and dy and writes dx, recomputing the sigmoid instead of storing it:

    dx = dy * (s + 1.702 x s (1 - s)),  s = sigmoid(1.702 x)

Arithmetic is in float32 whatever the dtype of x (float32, float16 or bfloat16), rounded once on the store.
Tensors arrive contiguous (``famevil_fast.ops.activation``) and are addressed as flat arrays with 64-bit
offsets, so any element count works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from famevil_fast.kernels import configs

from famevil_fast.ops.activation import QUICK_GELU_ALPHA


@triton.jit
def _flat_block(n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < n_elements


@triton.jit
def quick_gelu_fwd_kernel(x_ptr, y_ptr, n_elements, ALPHA: tl.constexpr, BLOCK: tl.constexpr):
    offsets, mask = _flat_block(n_elements, BLOCK)
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    y = x / (1.0 + tl.exp(-ALPHA * x))
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def quick_gelu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n_elements, ALPHA: tl.constexpr, BLOCK: tl.constexpr):
    offsets, mask = _flat_block(n_elements, BLOCK)
    x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
    dy = tl.load(dy_ptr + offsets, mask=mask).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-ALPHA * x))
    dx = dy * (s + ALPHA * x * s * (1.0 - s))
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _grid(n: int, block: int) -> tuple[int]:
    return (configs.cdiv(n, block),)


def quick_gelu_forward(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` for contiguous x."""
    y = torch.empty_like(x)
    n = x.numel()
    if n:
        tiles = configs.elementwise_tiles()
        quick_gelu_fwd_kernel[_grid(n, tiles.block_m)](
            x, y, n, ALPHA=QUICK_GELU_ALPHA, BLOCK=tiles.block_m, **tiles.launch()
        )
    return y


def quick_gelu_backward(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The input gradient of ``quick_gelu_forward`` for contiguous dy and x of one shape and dtype."""
    dx = torch.empty_like(x)
    n = x.numel()
    if n:
        tiles = configs.elementwise_tiles()
        quick_gelu_bwd_kernel[_grid(n, tiles.block_m)](
            dy, x, dx, n, ALPHA=QUICK_GELU_ALPHA, BLOCK=tiles.block_m, **tiles.launch()
        )
    return dx
