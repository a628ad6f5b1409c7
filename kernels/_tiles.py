"""Triton device functions shared by the kernels: which rows a program owns, LayerNorm row statistics and
normalised tiles. (Inside loops the kernels mostly spell tile arithmetic out instead of calling these: each
device call costs the interpreter a re-patch of triton.language.)

Row addressing. A token matrix has ``n_rows`` rows of width ``d`` (contiguous). Without task grouping,
program ``pid`` owns rows ``[pid * BLOCK_M, (pid + 1) * BLOCK_M)``. With task grouping (``MIXED``), rows are
visited in the order of a stable sort by task: ``order[pos]`` is the row at sorted position ``pos`` and
``counts[t]`` the number of rows of task t. Every block then holds rows of one task only, so one set of
weights serves the whole tile; tasks without rows own no block. Per-row intermediates (bottleneck
activations, their gradients, LayerNorm statistics) are stored at sorted positions, token tensors at
their original rows.
"""

import triton
import triton.language as tl


@triton.jit
def task_block(pid, counts_ptr, n_tasks, BLOCK_M: tl.constexpr):
    """(task, first, last) sorted positions of block ``pid`` when blocks are laid out task after task.

    Task t owns ``cdiv(counts[t], BLOCK_M)`` consecutive blocks. A ``pid`` past the last block gets an
    empty range (first == last == 0).
    """
    task = pid * 0
    first = pid * 0
    last = pid * 0
    blocks_before = pid * 0
    rows_before = pid * 0
    for t in range(0, n_tasks):
        count = tl.load(counts_ptr + t)
        n_blocks = tl.cdiv(count, BLOCK_M)
        local = pid - blocks_before
        inside = (local >= 0) & (local < n_blocks)
        first = tl.where(inside, rows_before + local * BLOCK_M, first)
        last = tl.where(inside, tl.minimum(rows_before + (local + 1) * BLOCK_M, rows_before + count), last)
        task = tl.where(inside, t, task)
        blocks_before += n_blocks
        rows_before += count
    return task, first, last


@triton.jit
def row_block(pid, n_rows, order_ptr, counts_ptr, n_tasks, BLOCK_M: tl.constexpr, MIXED: tl.constexpr):
    """(task, pos, rows, mask) of the rows owned by program ``pid``: sorted positions, original row
    indices (both int64) and the valid-row mask."""
    if MIXED:
        task, first, last = task_block(pid, counts_ptr, n_tasks, BLOCK_M)
        pos = first + tl.arange(0, BLOCK_M)
        mask = pos < last
        rows = tl.load(order_ptr + pos, mask=mask, other=0)
    else:
        task = pid * 0
        pos = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = pos < n_rows
        rows = pos
    return task, pos.to(tl.int64), rows.to(tl.int64), mask


@triton.jit
def row_major_tile(pid, width, BLOCK_N: tl.constexpr):
    """(row block, column tile) of program ``pid`` in a one-dimensional grid whose column tiles of one row
    block are adjacent. Programs run roughly in grid order, so the tiles that read the same rows (of x,
    h, dp or dy) run together and all but the first read them from L2; with the row block as the fast
    grid axis each column tile would fetch every row from memory again."""
    n_tiles = tl.cdiv(width, BLOCK_N)
    return pid // n_tiles, pid % n_tiles


@triton.jit
def task_segment(seg, n_rows, counts_ptr, n_segments, MIXED: tl.constexpr):
    """(task, first, last) sorted positions of reduction segment ``seg``.

    Each task's rows are cut into ``n_segments`` nearly equal consecutive segments; segment ``seg``
    belongs to task ``seg // n_segments``. Without task grouping there is one task of ``n_rows`` rows.
    """
    task = seg // n_segments
    part = seg % n_segments
    if MIXED:
        offset = seg * 0
        for t in range(0, task):
            offset += tl.load(counts_ptr + t)
        count = tl.load(counts_ptr + task)
    else:
        offset = seg * 0
        count = seg * 0 + n_rows
    length = tl.cdiv(count, n_segments)
    first = offset + part * length
    last = tl.minimum(first + length, offset + count)
    return task, first, last


@triton.jit
def row_stats(x_ptr, rows, mask, d, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Mean and 1/sqrt(var + eps) of each row, in one pass over chunks merged with Chan's formula."""
    mean = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.zeros((BLOCK_M,), tl.float32)
    for k in range(0, d, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        cmask = cols < d
        xk = tl.load(
            x_ptr + rows[:, None] * d + cols[None, :], mask=mask[:, None] & cmask[None, :], other=0.0
        )
        mean, m2 = merge_chunk_stats(mean, m2, xk.to(tl.float32), cmask, k, d, BLOCK_K)
    rstd = tl.rsqrt(m2 / d + eps)
    return mean, rstd


@triton.jit
def merge_chunk_stats(mean, m2, xf, cmask, k, d, BLOCK_K: tl.constexpr):
    """Running per-row (mean, sum of squared deviations) after the chunk ``xf`` (BLOCK_M x BLOCK_K, columns
    [k, k + BLOCK_K) of d, ``cmask`` the valid ones), merged with Chan's formula."""
    n_prev = k * 1.0
    n_k = tl.minimum(d - k, BLOCK_K) * 1.0
    mean_k = tl.sum(xf, axis=1) / n_k
    diff = tl.where(cmask[None, :], xf - mean_k[:, None], 0.0)
    total = n_prev + n_k
    delta = mean_k - mean
    mean_out = mean + delta * (n_k / total)
    m2_out = m2 + tl.sum(diff * diff, axis=1) + delta * delta * (n_prev * n_k / total)
    return mean_out, m2_out


@triton.jit
def layer_norm_product(
    x_ptr,
    lnw_ptr,
    lnb_ptr,
    w_ptr,
    rows,
    mask,
    cols,
    cmask,
    mean,
    rstd,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """``LN(x) W^T`` (no bias) for BLOCK_M rows and the outputs ``cols`` of W (n_out x d, row-major), each
    chunk of x normalised on its way into the product (fp32 accumulator)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, d, BLOCK_K):
        kcols = k + tl.arange(0, BLOCK_K)
        kmask = kcols < d
        valid = mask[:, None] & kmask[None, :]
        xk = tl.load(x_ptr + rows[:, None] * d + kcols[None, :], mask=valid, other=0.0).to(tl.float32)
        g = tl.load(lnw_ptr + kcols, mask=kmask, other=0.0).to(tl.float32)
        beta = tl.load(lnb_ptr + kcols, mask=kmask, other=0.0).to(tl.float32)
        z = tl.where(valid, (xk - mean[:, None]) * rstd[:, None] * g[None, :] + beta[None, :], 0.0)
        w = tl.load(
            w_ptr + cols[None, :] * d + kcols[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0
        )
        acc = tl.dot(z.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
    return acc


@triton.jit
def normalized_tile(x_ptr, rows, mask, cols, d, mean, rstd):
    """(x - mean) * rstd for the rows x cols tile; zero outside the valid rows and columns."""
    valid = mask[:, None] & (cols < d)[None, :]
    xk = tl.load(x_ptr + rows[:, None] * d + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    return tl.where(valid, (xk - mean[:, None]) * rstd[:, None], 0.0)
