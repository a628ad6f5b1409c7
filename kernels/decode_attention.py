"""Attention kernels of a decoding step, where each sequence has one new query.

``decode_self_attention_kernel``: self-attention of one new token per sequence over its key/value cache,
with the cache write, in one kernel. A decoding step's self-attention has one query per sequence and head
against the t + 1 keys so far: far too little work for a matrix-product kernel, and PyTorch spends two
launches on it (the cache write, then the attention). Here program (b, h) loads the new token's query, key
and value from the QKV projection's output, writes the key and value at position t of the cache (layout
(B, 2, H, T, Dh): keys, then values), and runs an online softmax over the cached positions before t plus the
new token itself (kept in registers), so the write and the reads never touch the same addresses.

``decode_cross_attention_kernel``: the cross-attention adapter's query side for a few rows, in one kernel:
program (row, h) normalises its row (LayerNorm), projects it onto head h's query (Dh rows of W_q) and runs
an online softmax over the context's keys and values (computed once per image), instead of a LayerNorm +
projection kernel followed by an attention kernel.

Arithmetic in float32 whatever the storage dtype; the scale is 1 / sqrt(Dh), as
``scaled_dot_product_attention``'s.
"""

import triton
import triton.language as tl
from famevil_fast.kernels._tiles import merge_chunk_stats


@triton.jit
def decode_self_attention_kernel(
    qkv_ptr,
    cache_ptr,
    out_ptr,
    position,
    heads,
    width,
    max_tokens,
    scale,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (b, h): out[b, h * Dh : (h + 1) * Dh] = softmax(q K^T * scale) V over positions 0..position,
    with qkv (B, 3 * width) rows of [q | k | v] and Dh = width / heads <= BLOCK_D."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    dh = width // heads
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < dh
    row = qkv_ptr + b * 3 * width + h * dh
    q = tl.load(row + dcols, mask=dmask, other=0.0).to(tl.float32)
    k_new = tl.load(row + width + dcols, mask=dmask, other=0.0)
    v_new = tl.load(row + 2 * width + dcols, mask=dmask, other=0.0)
    keys = cache_ptr + ((b * 2) * heads + h) * max_tokens * dh
    values = cache_ptr + ((b * 2 + 1) * heads + h) * max_tokens * dh
    tl.store(keys + position * dh + dcols, k_new, mask=dmask)
    tl.store(values + position * dh + dcols, v_new, mask=dmask)

    run_max = tl.sum(q * k_new.to(tl.float32), axis=0) * scale  # the new token opens the running softmax
    run_sum = run_max * 0.0 + 1.0
    acc = v_new.to(tl.float32)
    for t0 in range(0, position, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        tmask = ts < position
        tile = tmask[:, None] & dmask[None, :]
        k = tl.load(keys + ts[:, None] * dh + dcols[None, :], mask=tile, other=0.0).to(tl.float32)
        scores = tl.where(tmask, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(scores, axis=0))
        alpha = tl.exp(run_max - new_max)
        p = tl.exp(scores - new_max)
        v = tl.load(values + ts[:, None] * dh + dcols[None, :], mask=tile, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        run_sum = run_sum * alpha + tl.sum(p, axis=0)
        run_max = new_max
    tl.store(out_ptr + b * width + h * dh + dcols, acc / run_sum, mask=dmask)


@triton.jit
def decode_cross_attention_kernel(
    x_ptr,
    lnw_ptr,
    lnb_ptr,
    wq_ptr,
    bq_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    rows_per_batch,
    width,
    heads,
    length,
    k_stride_b,
    k_stride_h,
    k_stride_t,
    v_stride_b,
    v_stride_h,
    v_stride_t,
    eps,
    scale,
    BLOCK_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (row, h): q = LN(x[row]) W_q[h]^T + b_q[h] (W_q (width, width), head h's Dh rows), then
    out[row, h * Dh : (h + 1) * Dh] = softmax(q K^T * scale) V over the ``length`` context positions of
    batch row // rows_per_batch (K, V addressed by strides, unit stride along Dh; Dh <= BLOCK_D)."""
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    b = row // rows_per_batch
    dh = width // heads
    dcols = tl.arange(0, BLOCK_D)
    dmask = dcols < dh
    x_row = x_ptr + row * width
    mean = tl.zeros((1,), tl.float32)
    m2 = tl.zeros((1,), tl.float32)
    for k in range(0, width, BLOCK_K):
        kcols = k + tl.arange(0, BLOCK_K)
        kmask = kcols < width
        xk = tl.load(x_row + kcols, mask=kmask, other=0.0).to(tl.float32)
        mean, m2 = merge_chunk_stats(mean, m2, xk[None, :], kmask, k, width, BLOCK_K)
    rstd = tl.rsqrt(m2 / width + eps)
    w_rows = wq_ptr + (h * dh + dcols)[:, None] * width
    q = tl.zeros((BLOCK_D,), tl.float32)
    for k in range(0, width, BLOCK_K):
        kcols = k + tl.arange(0, BLOCK_K)
        kmask = kcols < width
        xk = tl.load(x_row + kcols, mask=kmask, other=0.0).to(tl.float32)
        g = tl.load(lnw_ptr + kcols, mask=kmask, other=0.0).to(tl.float32)
        beta = tl.load(lnb_ptr + kcols, mask=kmask, other=0.0).to(tl.float32)
        z = tl.where(kmask, (xk - mean) * rstd * g + beta, 0.0)
        w = tl.load(w_rows + kcols[None, :], mask=dmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        q += tl.sum(w * z[None, :], axis=1)
    q = (q + tl.load(bq_ptr + h * dh + dcols, mask=dmask, other=0.0).to(tl.float32)) * scale

    keys = k_ptr + b * k_stride_b + h * k_stride_h
    values = v_ptr + b * v_stride_b + h * v_stride_h
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for t0 in range(0, length, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        tmask = ts < length
        tile = tmask[:, None] & dmask[None, :]
        kt = tl.load(keys + ts[:, None] * k_stride_t + dcols[None, :], mask=tile, other=0.0).to(tl.float32)
        scores = tl.where(tmask, tl.sum(kt * q[None, :], axis=1), float("-inf"))
        new_max = tl.maximum(run_max, tl.max(scores, axis=0))
        alpha = tl.exp(run_max - new_max)
        p = tl.exp(scores - new_max)
        vt = tl.load(values + ts[:, None] * v_stride_t + dcols[None, :], mask=tile, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        run_sum = run_sum * alpha + tl.sum(p, axis=0)
        run_max = new_max
    out = acc / run_sum
    tl.store(out_ptr + row * width + h * dh + dcols, out.to(out_ptr.dtype.element_ty), mask=dmask)
