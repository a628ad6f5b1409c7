"""The cross-attention adapter op (XAA): attention from one tower's tokens to the other tower's tokens,
followed by a bottleneck adapter on the attention output.

    out = residual + adapter(MHA(q = LN_q(x) W_q, [k, v] = LN_c(context) W_kv))

There is no output projection: the concatenated heads go straight into the adapter. Owns the public
``cross_attention_adapter`` function, ``context_key_values`` (keys and values of a context, computed once
and reusable, e.g. over a vision memory during caption decoding) and the plain-PyTorch reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from famevil_fast.ops._backend import check_backend
from famevil_fast.ops.adapter import LN_EPS, AdapterParams, Residual, fused_adapter

BACKENDS = ("torch", "triton")


class CrossAttentionParams(NamedTuple):
    q_ln_weight: torch.Tensor  # (d,)
    q_ln_bias: torch.Tensor  # (d,)
    ctx_ln_weight: torch.Tensor  # (c,)
    ctx_ln_bias: torch.Tensor  # (c,)
    q_weight: torch.Tensor  # (d, d)
    q_bias: torch.Tensor  # (d,)
    kv_weight: torch.Tensor  # (2d, c): keys then values
    kv_bias: torch.Tensor  # (2d,)


def split_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, H*Dh) -> (B, H, L, Dh)."""
    b, n, width = t.shape
    return t.view(b, n, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, L, Dh) -> (B, L, H*Dh)."""
    b, h, n, dh = t.shape
    return t.transpose(1, 2).reshape(b, n, h * dh)


def context_key_values(
    context: torch.Tensor, attn: CrossAttentionParams, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, H, Lc, Dh) of a context (B, Lc, c)."""
    c = context.shape[-1]
    kv = F.linear(F.layer_norm(context, (c,), attn.ctx_ln_weight, attn.ctx_ln_bias, LN_EPS), attn.kv_weight, attn.kv_bias)
    k, v = kv.chunk(2, dim=-1)
    return split_heads(k, num_heads), split_heads(v, num_heads)


def attention_mask_from_context(context_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, Lc) bool, True = attend  ->  (B, 1, 1, Lc) for scaled_dot_product_attention."""
    return None if context_mask is None else context_mask[:, None, None, :]


def cross_attention_reference(
    x: torch.Tensor,
    attn: CrossAttentionParams,
    adapter: AdapterParams,
    num_heads: int,
    context: torch.Tensor | None = None,
    context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    context_mask: torch.Tensor | None = None,
    residual: Residual = None,
) -> torch.Tensor:
    d = x.shape[-1]
    if context_kv is None:
        context_kv = context_key_values(context, attn, num_heads)
    k, v = context_kv
    q = split_heads(F.linear(F.layer_norm(x, (d,), attn.q_ln_weight, attn.q_ln_bias, LN_EPS), attn.q_weight, attn.q_bias), num_heads)
    o = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask_from_context(context_mask)))
    return fused_adapter(x=o, **adapter._asdict(), residual=residual, backend="torch")


def check_cross_attention_args(
    x: torch.Tensor,
    context: torch.Tensor | None,
    context_kv: tuple[torch.Tensor, torch.Tensor] | None,
    context_mask: torch.Tensor | None,
    attn: CrossAttentionParams,
    num_heads: int,
) -> None:
    op = "cross_attention_adapter"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (B, L, d), got shape {tuple(x.shape)}")
    b, _, d = x.shape
    if (context is None) == (context_kv is None):
        raise ValueError(f"{op}: pass exactly one of context and context_kv")
    if num_heads <= 0 or d % num_heads:
        raise ValueError(f"{op}: width {d} is not divisible by num_heads={num_heads}")
    if attn.q_weight.shape != (d, d) or attn.kv_weight.shape[0] != 2 * d:
        raise ValueError(
            f"{op}: q_weight {tuple(attn.q_weight.shape)} / kv_weight {tuple(attn.kv_weight.shape)} "
            f"do not match width {d} (expected ({d}, {d}) and ({2 * d}, c))"
        )
    if context is not None:
        if context.dim() != 3 or context.shape[0] != b:
            raise ValueError(f"{op}: context must be (B={b}, Lc, c), got shape {tuple(context.shape)}")
        if context.shape[-1] != attn.kv_weight.shape[1]:
            raise ValueError(
                f"{op}: context width {context.shape[-1]} does not match kv_weight {tuple(attn.kv_weight.shape)}"
            )
        if context.device != x.device or context.dtype != x.dtype:
            raise ValueError(
                f"{op}: context is {context.dtype} on {context.device} but x is {x.dtype} on {x.device}"
            )
    length = context.shape[1] if context is not None else context_kv[0].shape[2]
    if context_mask is not None:
        if context_mask.shape != (b, length) or context_mask.dtype != torch.bool:
            raise ValueError(
                f"{op}: context_mask must be bool of shape ({b}, {length}), got {context_mask.dtype} "
                f"{tuple(context_mask.shape)}"
            )


def cross_attention_adapter(
    x: torch.Tensor,
    attn: CrossAttentionParams,
    adapter: AdapterParams,
    num_heads: int,
    context: torch.Tensor | None = None,
    context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    context_mask: torch.Tensor | None = None,
    residual: Residual = None,
    backend: str | None = None,
) -> torch.Tensor:
    """XAA block: ``residual + adapter(MHA(LN_q(x), LN_c(context)))`` for x (B, L, d), context (B, Lc, c).

    ``context_kv`` replaces ``context`` with precomputed keys and values (see ``context_key_values``).
    ``context_mask`` (B, Lc) bool marks the context positions that may be attended (True = keep).
    ``backend``: "triton", "torch" or None (automatic).
    """
    check_backend("cross_attention_adapter", backend, BACKENDS)
    check_cross_attention_args(x, context, context_kv, context_mask, attn, num_heads)
    return cross_attention_reference(x, attn, adapter, num_heads, context, context_kv, context_mask, residual)
