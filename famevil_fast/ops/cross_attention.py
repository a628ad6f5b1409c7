"""The cross-attention adapter op (XAA): attention from one tower's tokens to the other tower's tokens,
followed by a bottleneck adapter on the attention output.

    out = residual + adapter(MHA(q = LN_q(x) W_q, [k, v] = LN_c(context) W_kv))

There is no output projection: the concatenated heads go straight into the adapter. Owns the public
``cross_attention_adapter`` function, ``context_key_values`` (keys and values of a context, computed once
and reusable, e.g. over a vision memory during caption decoding) and the plain-PyTorch reference.

The Triton path saves passes over memory in three places: each LayerNorm is fused into the projection
that follows it (the normalised activations are never written, forward or backward), the heads come out
of attention already in (B, L, H * Dh) order so merging them costs no copy, and the adapter adds its
output and every residual term in the same pass that writes the block's output. Attention itself is
flash-attn's kernel when that package is importable (CUDA, fp16/bf16, no mask), else PyTorch's
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from famevil_fast.ops._backend import check_backend, counting_flops, matmul_flops, require_int, select_backend
from famevil_fast.ops.adapter import LN_EPS, AdapterParams, Residual, fused_adapter
from famevil_fast.ops.layer_norm import (
    allowed_params_dtypes,
    layer_norm_in_dtype,
    params_dtype_allowed,
    widened_for,
)

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


def _as_dtype(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == like.dtype else t.to(like.dtype)


def layer_norm_linear_reference(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    weight, bias = _as_dtype(weight, x), _as_dtype(bias, x)
    return F.linear(layer_norm_in_dtype(x, ln_weight, ln_bias, eps), weight, bias)


def ln_linear_forward_flops(
    x_shape: Sequence[int],
    ln_weight_shape: Sequence[int],
    ln_bias_shape: Sequence[int],
    weight_shape: Sequence[int],
    *args: object,
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """FLOPs of ``famevil_fast::ln_linear_forward`` (x (N, d), weight (n, d)): the projection
    (N, d) @ (d, n), as FlopCounterMode counts the reference's linear layer."""
    return matmul_flops(math.prod(x_shape[:-1]), x_shape[-1], weight_shape[0])


def ln_linear_backward_flops(
    grad_shape: Sequence[int],
    forward_out_shape: Sequence[int],
    x_shape: Sequence[int],
    mean_shape: Sequence[int],
    rstd_shape: Sequence[int],
    ln_weight_shape: Sequence[int],
    ln_bias_shape: Sequence[int],
    weight_shape: Sequence[int],
    *args: object,
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """FLOPs of ``famevil_fast::ln_linear_backward``: the projection's input and weight gradients, two
    products of the forward's size (the operator computes both)."""
    return 2 * matmul_flops(math.prod(x_shape[:-1]), x_shape[-1], weight_shape[0])


# Registered on first use of the kernels (``counting_flops``), as the adapter's.
LN_LINEAR_FLOP_FORMULAS = {
    "ln_linear_forward": ln_linear_forward_flops,
    "ln_linear_backward": ln_linear_backward_flops,
}


def layer_norm_linear_triton(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """``LN(x) W^T + b`` in one kernel, x of shape (..., d): in a torch.compile graph (and while a
    FlopCounterMode counts) the registered ``torch.ops.famevil_fast.ln_linear_forward``, in eager mode the
    same launchers without the dispatch."""
    from famevil_fast.kernels import custom_ops  # noqa: F401  (registers torch.ops.famevil_fast)

    flat = x.dim() == 2  # already a row matrix: no reshape, no view of the output
    rows = (x if flat else x.reshape(-1, x.shape[-1])).contiguous()
    params = [t.contiguous() for t in (ln_weight, ln_bias, weight, bias)]
    save = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
    if torch.compiler.is_compiling() or counting_flops(LN_LINEAR_FLOP_FORMULAS):
        out = torch.ops.famevil_fast.ln_linear_forward(rows, *params, save, eps)[0]
    else:
        from famevil_fast.kernels.autograd import layer_norm_linear_eager

        out = layer_norm_linear_eager(rows, params, save, eps)
    return out if flat else out.view(*x.shape[:-1], weight.shape[0])


def _split_key_values(kv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Lc, 2d) keys-then-values -> two (B, H, Lc, Dh) views."""
    b, n, width = kv.shape
    k, v = kv.view(b, n, 2, num_heads, width // (2 * num_heads)).unbind(2)
    return k.transpose(1, 2), v.transpose(1, 2)


# The automatic choice on a GPU: the fused LayerNorm-projection kernels and the fused block ran at 0.2-0.6x
# the speed of PyTorch's (cuBLAS, SDPA) path on an H200 in bf16 at batch 64 (bench/RESULTS.md), so PyTorch
# runs unless backend="triton" is asked for.
TRITON_XAA_PAYS = False


def context_key_values(
    context: torch.Tensor,
    attn: CrossAttentionParams,
    num_heads: int,
    backend: str | None = None,
    eps: float = LN_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (B, H, Lc, Dh) of a context (B, Lc, c). ``backend="triton"`` fuses the LayerNorm
    into the key/value projection."""
    op = "context_key_values"
    check_backend(op, backend, BACKENDS)
    attn = CrossAttentionParams(*attn)
    num_heads = require_int(op, "num_heads", num_heads)
    d = attn.kv_weight.shape[0] // 2 if attn.kv_weight.dim() == 2 else 0
    if attn.kv_weight.dim() != 2 or attn.kv_weight.shape[0] != 2 * d or d == 0:
        raise ValueError(f"{op}: kv_weight must be (2d, c), got {tuple(attn.kv_weight.shape)}")
    _check_heads(op, d, num_heads)
    if not isinstance(context, torch.Tensor) or context.dim() != 3:
        got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
        raise ValueError(f"{op}: context must be (B, Lc, c), got {got}")
    _check_context(op, context, attn)
    args = (context, attn.ctx_ln_weight, attn.ctx_ln_bias, attn.kv_weight, attn.kv_bias, eps)
    if select_backend(op, backend, BACKENDS, context, TRITON_XAA_PAYS) == "triton":
        kv = layer_norm_linear_triton(*args)
    else:
        kv = layer_norm_linear_reference(*args)
    return _split_key_values(kv, num_heads)


def attention_mask_from_context(context_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, Lc) bool, True = attend  ->  (B, 1, 1, Lc) for scaled_dot_product_attention."""
    return None if context_mask is None else context_mask[:, None, None, :]


def _import_flash_attention() -> Callable | None:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    return flash_attn_func


# Resolved once, at import: a torch.compile trace of ``attention`` reads a constant instead of attempting
# an import (which dynamo cannot trace: a graph break at every cross-attention adapter).
_FLASH_ATTN_FUNC = _import_flash_attention() if importlib.util.find_spec("flash_attn") is not None else None


def flash_attention() -> Callable | None:
    """flash-attn's ``flash_attn_func`` when the package is importable, else None."""
    return _FLASH_ATTN_FUNC


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    context_mask: torch.Tensor | None,
    use_flash: bool = True,
) -> torch.Tensor:
    """Multi-head attention of q (B, H, L, Dh) over k, v (B, H, Lc, Dh); returns merged heads (B, L, H*Dh).

    flash-attn is consulted only for CUDA fp16/bf16 inputs without a mask (the cheap checks come first)."""
    if (
        use_flash
        and context_mask is None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and flash_attention() is not None
    ):
        out = flash_attention()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        b, n, h, dh = out.shape
        return out.reshape(b, n, h * dh)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask_from_context(context_mask))
    return merge_heads(out)


def cross_attention_reference(
    x: torch.Tensor,
    attn: CrossAttentionParams,
    adapter: AdapterParams,
    num_heads: int,
    context: torch.Tensor | None = None,
    context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    context_mask: torch.Tensor | None = None,
    residual: Residual = None,
    eps: float = LN_EPS,
) -> torch.Tensor:
    if context_kv is None:
        context_kv = context_key_values(context, attn, num_heads, backend="torch", eps=eps)
    k, v = context_kv
    q = layer_norm_linear_reference(x, attn.q_ln_weight, attn.q_ln_bias, attn.q_weight, attn.q_bias, eps)
    o = merge_heads(
        F.scaled_dot_product_attention(
            split_heads(q, num_heads), k, v, attn_mask=attention_mask_from_context(context_mask)
        )
    )
    return fused_adapter(o, *adapter, residual=residual, backend="torch", eps=eps)


def cross_attention_triton(
    x: torch.Tensor,
    attn: CrossAttentionParams,
    adapter: AdapterParams,
    num_heads: int,
    context: torch.Tensor | None = None,
    context_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    context_mask: torch.Tensor | None = None,
    residual: Residual = None,
    eps: float = LN_EPS,
    fuse_projections: bool = True,
) -> torch.Tensor:
    """The XAA block with fused kernels; ``fuse_projections=False`` keeps LayerNorm and the Q/KV projections
    as separate PyTorch (cuBLAS) calls and fuses only the adapter and its residual sum."""
    projection = layer_norm_linear_triton if fuse_projections else layer_norm_linear_reference
    if context_kv is None:
        kv = projection(context, attn.ctx_ln_weight, attn.ctx_ln_bias, attn.kv_weight, attn.kv_bias, eps)
        context_kv = _split_key_values(kv, num_heads)
    k, v = context_kv
    q = projection(x, attn.q_ln_weight, attn.q_ln_bias, attn.q_weight, attn.q_bias, eps)
    o = attention(split_heads(q, num_heads), k, v, context_mask)
    return fused_adapter(o, *adapter, residual=residual, backend="triton", eps=eps)


def _check_params(op: str, x: torch.Tensor, attn: CrossAttentionParams) -> None:
    device, dtype = x.device, attn.q_weight.dtype
    for name, t in zip(CrossAttentionParams._fields, attn):
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")
    if any(t.dtype != dtype for t in attn):
        dtypes = {t.dtype for t in attn}
        raise ValueError(f"{op}: the attention parameters mix dtypes {sorted(map(str, dtypes))}")
    if not params_dtype_allowed(x, dtype):
        raise ValueError(
            f"{op}: attention parameters are {dtype} but x is {x.dtype} (allowed: {allowed_params_dtypes()})"
        )
    d, c = x.shape[-1], attn.kv_weight.shape[-1]
    shapes = (
        ("q_ln_weight", attn.q_ln_weight, (d,)),
        ("q_ln_bias", attn.q_ln_bias, (d,)),
        ("ctx_ln_weight", attn.ctx_ln_weight, (c,)),
        ("ctx_ln_bias", attn.ctx_ln_bias, (c,)),
        ("q_bias", attn.q_bias, (d,)),
        ("kv_bias", attn.kv_bias, (2 * d,)),
    )
    for name, t, want in shapes:
        if t.shape != want:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {want}")


def _check_heads(op: str, width: int, num_heads: int) -> None:
    if num_heads <= 0 or width % num_heads:
        raise ValueError(f"{op}: width {width} is not divisible by num_heads={num_heads}")


def _check_context(op: str, context: torch.Tensor, attn: CrossAttentionParams) -> None:
    """The context's width against kv_weight (2d, c), its LayerNorm's and kv_bias's shapes, its device
    and dtype against the parameters' (which may be float32 under a lower-precision context)."""
    c = attn.kv_weight.shape[1]
    if c == 0:
        raise ValueError(f"{op}: the context has no features (width 0) to normalise")
    if context.shape[-1] != c:
        raise ValueError(
            f"{op}: context width {context.shape[-1]} does not match kv_weight {tuple(attn.kv_weight.shape)}"
        )
    want = (
        ("ctx_ln_weight", attn.ctx_ln_weight, (c,)),
        ("ctx_ln_bias", attn.ctx_ln_bias, (c,)),
        ("kv_bias", attn.kv_bias, (attn.kv_weight.shape[0],)),
    )
    for name, t, shape in want:
        if t.shape != shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {shape}")
    if not context.is_floating_point():
        raise ValueError(f"{op}: context must be a floating-point tensor, got {context.dtype}")
    device, kv_dtype = context.device, attn.kv_weight.dtype
    named = (
        ("ctx_ln_weight", attn.ctx_ln_weight),
        ("ctx_ln_bias", attn.ctx_ln_bias),
        ("kv_weight", attn.kv_weight),
        ("kv_bias", attn.kv_bias),
    )
    for name, t in named:
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the context is on {device}")
        if not params_dtype_allowed(context, t.dtype) or t.dtype != kv_dtype:
            raise ValueError(
                f"{op}: {name} is {t.dtype} but the context is {context.dtype} (allowed: "
                f"{allowed_params_dtypes('the context')}, the same for every parameter)"
            )


def check_context_kv(
    op: str, x: torch.Tensor, context_kv: tuple[torch.Tensor, torch.Tensor], num_heads: int
) -> None:
    b, _, d = x.shape
    if len(context_kv) != 2:
        raise ValueError(f"{op}: context_kv must be a (keys, values) pair")
    k, v = context_kv
    for name, t in (("keys", k), ("values", v)):
        if t.dim() != 4 or t.shape[0] != b or t.shape[1] != num_heads or t.shape[3] != d // num_heads:
            raise ValueError(
                f"{op}: context {name} must be (B={b}, H={num_heads}, Lc, {d // num_heads}), "
                f"got {tuple(t.shape)}"
            )
        if t.device != x.device or t.dtype != x.dtype:
            raise ValueError(
                f"{op}: context {name} are {t.dtype} on {t.device} but x is {x.dtype} on {x.device}"
            )
    if k.shape != v.shape:
        raise ValueError(f"{op}: keys {tuple(k.shape)} and values {tuple(v.shape)} differ in shape")


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
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    b, _, d = x.shape
    if d == 0:
        raise ValueError(f"{op}: x has no features (width 0) to normalise")
    if (context is None) == (context_kv is None):
        raise ValueError(f"{op}: pass exactly one of context and context_kv")
    _check_heads(op, d, require_int(op, "num_heads", num_heads))
    if attn.q_weight.shape != (d, d) or attn.kv_weight.dim() != 2 or attn.kv_weight.shape[0] != 2 * d:
        raise ValueError(
            f"{op}: q_weight {tuple(attn.q_weight.shape)} / kv_weight {tuple(attn.kv_weight.shape)} "
            f"do not match width {d} (expected ({d}, {d}) and ({2 * d}, c))"
        )
    _check_params(op, x, attn)
    if context is not None:
        if context.dim() != 3 or context.shape[0] != b:
            raise ValueError(f"{op}: context must be (B={b}, Lc, c), got shape {tuple(context.shape)}")
        _check_context(op, context, attn)
        if context.dtype != x.dtype:
            raise ValueError(f"{op}: context is {context.dtype} but x is {x.dtype}")
    else:
        check_context_kv(op, x, context_kv, num_heads)
    length = context.shape[1] if context is not None else context_kv[0].shape[2]
    if length == 0:
        raise ValueError(f"{op}: the context has no positions to attend")
    if context_mask is not None:
        if context_mask.shape != (b, length) or context_mask.dtype != torch.bool:
            raise ValueError(
                f"{op}: context_mask must be bool of shape ({b}, {length}), got {context_mask.dtype} "
                f"{tuple(context_mask.shape)}"
            )
        if context_mask.device != x.device:
            raise ValueError(f"{op}: context_mask is on {context_mask.device} but x is on {x.device}")


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
    eps: float = LN_EPS,
    fuse_projections: bool = True,
) -> torch.Tensor:
    """XAA block: ``residual + adapter(MHA(LN_q(x), LN_c(context)))`` for x (B, L, d), context (B, Lc, c).

    ``context_kv`` replaces ``context`` with precomputed keys and values (see ``context_key_values``).
    ``context_mask`` (B, Lc) bool marks the context positions that may be attended (True = keep); a row
    that keeps none attends nothing (a zero attention output, as PyTorch's SDPA gives on the CPU). The
    context has at least one position.
    ``backend``: "triton", "torch" or None (automatic: PyTorch on a GPU, where it was measured faster
    (``TRITON_XAA_PAYS``); Triton on the CPU under TRITON_INTERPRET=1). ``fuse_projections`` (Triton
    backend): fuse each LayerNorm into its projection (True) or leave both to PyTorch.
    """
    check_backend("cross_attention_adapter", backend, BACKENDS)
    autocast = torch.is_autocast_enabled("cuda" if x.is_cuda else x.device.type)
    if autocast:  # the two towers' streams may differ in dtype under autocast
        if context is not None and context.is_floating_point() and context.dtype != x.dtype:
            context = context.to(x.dtype)
        if context_kv is not None and context_kv[0].dtype != x.dtype:
            context_kv = (context_kv[0].to(x.dtype), context_kv[1].to(x.dtype))
    check_cross_attention_args(x, context, context_kv, context_mask, attn, num_heads)
    on_torch = select_backend("cross_attention_adapter", backend, BACKENDS, x, TRITON_XAA_PAYS) == "torch"
    if not on_torch:  # the kernels take parameters of x's dtype or float32
        attn, adapter = widened_for(x, attn), widened_for(x, adapter)
    args = (x, attn, adapter, num_heads, context, context_kv, context_mask, residual, eps)
    if on_torch:
        return cross_attention_reference(*args)
    return cross_attention_triton(*args, fuse_projections=fuse_projections)
