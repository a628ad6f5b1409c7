"""Self-attention of one new token per sequence over its key/value cache, with the cache write, in one kernel.

A decoding step's self-attention has one query per sequence and head against the t + 1 keys so far: far too
little work for a matrix-product kernel, and PyTorch spends two launches on it (the cache write, then the
attention). Here program (b, h) loads the new token's query, key and value from the QKV projection's output,
writes the key and value at position t of the cache (layout (B, 2, H, T, Dh): keys, then values), and runs
an online softmax over the cached positions before t plus the new token itself (kept in registers), so the
write and the reads never touch the same addresses. Arithmetic in float32 whatever the storage dtype; the
scale is 1 / sqrt(Dh), as ``scaled_dot_product_attention``'s.
"""

import triton
import triton.language as tl


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
