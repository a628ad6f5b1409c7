"""Multi-head attention kernels used by every attention layer of the model.

``attention(q, k, v, ...)`` takes (B, H, L, Dh) tensors and dispatches to flash-attn (when installed and the
inputs allow it), PyTorch's ``scaled_dot_product_attention``, or an explicit softmax ("eager", the faithful
reference that materialises the score matrix).
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

# known at import: a torch.compile trace of ``attention`` reads a constant instead of the cached import
FLASH_ATTN_INSTALLED = importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


def flash_attn_applicable(q: torch.Tensor, mask: torch.Tensor | None, dropout_p: float) -> bool:
    return (
        FLASH_ATTN_INSTALLED
        and _flash_attn_func() is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and mask is None
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
        and dropout_p == 0.0
    )


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None
) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Softmax attention over (B, H, L, Dh) inputs; ``mask`` is bool, True = attend, broadcastable to
    (B, H, Lq, Lk). ``causal`` aligns the last query with the last key (as when decoding with a cache)."""
    if impl == "eager":
        return eager_attention(q, k, v, causal, mask)
    if impl in ("auto", "flash") and flash_attn_applicable(q, None if causal else mask, 0.0) and mask is None:
        out = _flash_attn_func()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)
    if impl == "flash" and _flash_attn_func() is None:
        raise ValueError("attention='flash' needs the flash_attn package, which is not installed")
    if causal and mask is not None:
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask & keep)
    if causal and q.shape[-2] != k.shape[-2]:
        lq, lk = q.shape[-2], k.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
