"""Triton kernels of the fused InfoNCE loss: the log-sum-exp of the logits ``scale * X @ Y.T`` along rows,
and the tiles of its gradient, with the M x N logits never in memory.

InfoNCE needs, per row (and per column for the two-way loss), the log-sum-exp of the logits and sums of
logits over the row's positives (or over all columns, for label smoothing). Those sums are linear in the
features, so PyTorch computes them in O((M + N) D) (``famevil_fast.ops.contrastive_triton``); only the
log-sum-exp needs every entry of the matrix, and only it lives here.

* ``contrastive_lse_kernel``: one program per BLOCK_M rows of X and one span of Y's rows sweeps that span
  BLOCK_N rows at a time. Each tile of dot products comes from ``tl.dot`` (tensor cores for 16-bit inputs,
  float32 accumulation) and feeds an online (running max, sum of exponentials) per row, in base 2; the
  program writes its rows' log-sum-exp over its span, and ``combine_lse_kernel`` completes them.
  Spans exist to fill the card: with every column in one program there would be one program per 128
  rows, a single wave on 132 multiprocessors at 16,384 rows, each program's exponentials and reductions
  then stalling its own matrix products. With COLS it also writes, per program, the log-sum-exp of every
  column of its span over its own rows, which the same combination over row blocks completes: the two-way
  statistics in one sweep, at 4 bytes per column per row block (16 MiB at 16,384 x 16,384). Where that
  buffer would pass its budget, the column statistics are the same kernel with X and Y swapped.
  It can also read the dot products from memory (FROM_LOGITS): a chunk of rows at a time, computed by the
  library GEMM, which runs the products near the card's peak where the sweep's own products, interleaved
  with its exponentials and reductions, do not; each chunk costs a write and a read of 4 bytes a logit
  (``configs.CONTRASTIVE_LIBRARY_LOGITS`` switches it; bench/bench_tiles.py times both).
* ``combine_lse_kernel`` completes the statistics from the sweep's partial log-sum-exps (over spans, or over
  row blocks for the columns) in one pass.
* ``row_dots_kernel``: the float32 dot product of each row of X with its positive row of Y (the same row,
  or one given by an index), for the forward value of the loss.
* ``contrastive_lse_grad_kernel``: given the upstream gradients gx (per row of X) and gy (per row of Y) of
  the two log-sum-exps, one program per tile recomputes the dot products and writes
  ``G = scale * (gx_i softmax_j(l_i.) + gy_j softmax_i(l_.j))`` for a block of rows of X and of Y, plus
  the tile's partial sum of ``G_ij (x_i . y_j)`` for the scale's gradient. The host multiplies each block
  with cuBLAS: ``dX += G Y`` and ``dY += G^T X``. Blocks span all of Y's rows while that leaves at least
  1,024 rows of X per block (up to about 128k columns in bf16), and are square beyond. A
  flash-attention-style fused dX would keep a BLOCK_M x D float32 accumulator per program, 256 KiB for
  128 x 512: more than a multiprocessor's registers. Going through
  memory instead costs writing and twice reading G (6 bytes per logit in bf16), against the 3 GEMMs of
  2 D flops per logit that the backward needs anyway, and lets cuBLAS run the two products at full rate.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def dot_tile(
    x_ptr,
    y_ptr,
    rows64,
    rmask,
    cols64,
    cmask,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """float32 (BLOCK_M, BLOCK_N) tile of x_i . y_j over the feature dimension in BLOCK_K chunks; rows and
    columns outside their masks contribute zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, d, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        kmask = ks < d
        xt = tl.load(
            x_ptr + rows64[:, None] * d + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        yt = tl.load(
            y_ptr + cols64[:, None] * d + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0
        )
        acc = tl.dot(xt.to(DOT), tl.trans(yt.to(DOT)), acc, input_precision=PRECISION)
    return acc


@triton.jit
def column_lse_exact(t, rmask):
    """Natural log-sum-exp over the valid rows of each column of a tile of base-2 logits ``t``, each
    column stabilised by its own maximum (a reduction across the tile's rows, then one exponential per
    entry)."""
    tc = tl.where(rmask[:, None], t, float("-inf"))
    col_max = tl.max(tc, axis=0)
    col_sum = tl.sum(tl.exp2(tc - col_max[None, :]), axis=0)
    return (col_max + tl.log2(col_sum)) * 0.6931471805599453


@triton.jit
def column_lse_shared(t, e, row_max, rmask, cmask):
    """``column_lse_exact`` from the row pass's exponentials ``e = exp2(t - row_max)``: every column is
    stabilised by the tile's largest logit R, as ``sum_i e_ij * exp2(row_max_i - R)``, which saves the
    column maxima and a second exponential per entry. Every term is at most 1, so nothing overflows, and
    terms below the float32 normal range (2^-126) are lost. Where a column's sum falls under 2^-100 (its
    largest logit more than 100 below R, in base 2), those losses could exceed 2^-19 of it, so a tile with
    such a column takes the exact path."""
    tiny = 7.888609052210118e-31  # 2^-100
    valid_max = tl.where(rmask, row_max, float("-inf"))
    top = tl.max(valid_max, axis=0)
    col_sum = tl.where(cmask, tl.sum(e * tl.exp2(valid_max - top)[:, None], axis=0), 1.0)
    col_lse = (top + tl.log2(tl.where(col_sum == 0.0, tiny, col_sum))) * 0.6931471805599453  # NaN stays
    if tl.min(col_sum, axis=0) < tiny:
        col_lse = column_lse_exact(t, rmask)
    return col_lse


@triton.jit
def contrastive_lse_kernel(
    x_ptr,
    y_ptr,
    logits_ptr,
    scale_ptr,
    lse_ptr,
    col_part_ptr,
    m,
    n,
    d,
    span,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    COLS: tl.constexpr,
    SHARED_COL_SCALE: tl.constexpr,
    FROM_LOGITS: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (pid_m, pid_n) takes the BLOCK_M rows of X of row block pid_m and the rows
    [pid_n * span, (pid_n + 1) * span) of Y (span a multiple of BLOCK_N). lse[pid_n, i] = log sum_j
    exp(scale * x_i . y_j) over that span; with COLS also col_part[pid_m, j] = log sum_i exp(scale * x_i .
    y_j) over the block's rows (``combine_lse_kernel`` reduces both kinds of partials).

    With SHARED_COL_SCALE the column sums reuse the row-stabilised exponentials (``column_lse_shared``)
    instead of a stabiliser and an exponential of their own per column (``column_lse_exact``). With
    FROM_LOGITS the dot products are read from ``logits`` (m x n float32, a library GEMM's output) instead
    of computed; X, Y and d are not read."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < m
    rows64 = rows.to(tl.int64)
    scale2 = tl.load(scale_ptr).to(tl.float32) * 1.4426950408889634
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    n_start = pid_n * span
    n_end = tl.minimum(n_start + span, n)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < n_end
        cols64 = cols.to(tl.int64)
        if FROM_LOGITS:
            acc = tl.load(
                logits_ptr + rows64[:, None] * n + cols64[None, :],
                mask=rmask[:, None] & cmask[None, :],
                other=0.0,
            )
        else:
            acc = dot_tile(
                x_ptr, y_ptr, rows64, rmask, cols64, cmask, d, BLOCK_M, BLOCK_N, BLOCK_K, DOT, PRECISION
            )
        t = tl.where(cmask[None, :], acc * scale2, float("-inf"))
        tile_max = tl.max(t, axis=1)
        new_max = tl.maximum(run_max, tile_max)
        if COLS and SHARED_COL_SCALE:
            e = tl.exp2(t - tile_max[:, None])  # in (0, 1]; 0 in masked columns
            row_part = tl.sum(e, axis=1) * tl.exp2(tile_max - new_max)
            col_lse = column_lse_shared(acc * scale2, e, tile_max, rmask, cmask)
            tl.store(col_part_ptr + pid.to(tl.int64) * n + cols64, col_lse, mask=cmask)
        else:
            if COLS:
                col_lse = column_lse_exact(acc * scale2, rmask)
                tl.store(col_part_ptr + pid.to(tl.int64) * n + cols64, col_lse, mask=cmask)
            row_part = tl.sum(tl.exp2(t - new_max[:, None]), axis=1)
        run_sum = run_sum * tl.exp2(run_max - new_max) + row_part
        run_max = new_max
    lse = (run_max + tl.log2(run_sum)) * 0.6931471805599453
    tl.store(lse_ptr + pid_n.to(tl.int64) * m + rows, lse, mask=rmask)


@triton.jit
def contrastive_lse_grad_kernel(
    x_ptr,
    y_ptr,
    scale_ptr,
    lse_x_ptr,
    g_x_ptr,
    lse_y_ptr,
    g_y_ptr,
    out_ptr,
    ds_part_ptr,
    row_key_ptr,
    col_key_ptr,
    row_share_ptr,
    col_share_ptr,
    smoothing,
    row_uniform,
    col_uniform,
    row0,
    row_end,
    col0,
    col_end,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_Y: tl.constexpr,
    TARGETS: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of the block of G for rows [row0, row_end) of X and rows [col0, col_end) of Y:
    out[i - row0, j - col0] = scale * (gx_i exp(l_ij - lse_x_i) + gy_j exp(l_ij - lse_y_j)) (the second
    term only with HAS_Y; out has col_end - col0 columns), and ds_part[tile] = sum G_ij / scale *
    (x_i . y_j) over the tile.

    With TARGETS, G is the gradient of the whole InfoNCE loss rather than of its log-sum-exps: each
    direction's target distribution is subtracted from its softmax, ``q_ij = (1 - smoothing) *
    [row_key_i == col_key_j] * row_share_i + smoothing * row_uniform`` for the rows (row_share = 1 / the
    row's positives, row_uniform = 1 / N) and likewise for the columns."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local
    rmask = rows < row_end
    rows64 = rows.to(tl.int64)
    local_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = col0 + local_cols
    cmask = cols < col_end
    cols64 = cols.to(tl.int64)
    acc = dot_tile(x_ptr, y_ptr, rows64, rmask, cols64, cmask, d, BLOCK_M, BLOCK_N, BLOCK_K, DOT, PRECISION)
    scale = tl.load(scale_ptr).to(tl.float32)
    t = acc * (scale * 1.4426950408889634)
    lse_x = tl.load(lse_x_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
    g_x = tl.load(g_x_ptr + rows, mask=rmask, other=0.0)
    g = g_x[:, None] * tl.exp2(t - lse_x[:, None])
    if HAS_Y:
        lse_y = tl.load(lse_y_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
        g_y = tl.load(g_y_ptr + cols, mask=cmask, other=0.0)
        g += g_y[None, :] * tl.exp2(t - lse_y[None, :])
    if TARGETS:  # per entry: one key comparison, a select and three additions
        row_key = tl.load(row_key_ptr + rows, mask=rmask, other=-1)
        col_key = tl.load(col_key_ptr + cols, mask=cmask, other=-2)
        row_pos = g_x * (1.0 - smoothing) * tl.load(row_share_ptr + rows, mask=rmask, other=0.0)
        row_flat = g_x * (smoothing * row_uniform)
        col_pos = tl.zeros((BLOCK_N,), tl.float32)
        col_flat = tl.zeros((BLOCK_N,), tl.float32)
        if HAS_Y:
            col_pos = g_y * (1.0 - smoothing) * tl.load(col_share_ptr + cols, mask=cmask, other=0.0)
            col_flat = g_y * (smoothing * col_uniform)
        flat = row_flat[:, None] + col_flat[None, :]
        g -= tl.where(row_key[:, None] == col_key[None, :], row_pos[:, None] + col_pos[None, :], 0.0) + flat
    valid = rmask[:, None] & cmask[None, :]
    g = tl.where(valid, g, 0.0)
    tl.store(ds_part_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(g * acc, axis=1), axis=0))
    out = out_ptr + local.to(tl.int64)[:, None] * (col_end - col0) + local_cols[None, :]
    tl.store(out, (g * scale).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def row_dots_kernel(
    x_ptr,
    y_ptr,
    index_ptr,
    dots_ptr,
    m,
    d,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INDEXED: tl.constexpr,
):
    """dots[i] = x_i . y_{index[i]} (y_i without INDEXED) in float32, BLOCK_M rows per program: the positive
    logits of the forward pass, read in the inputs' dtype without float32 copies of either."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < m
    rows64 = rows.to(tl.int64)
    other = rows64
    if INDEXED:
        other = tl.load(index_ptr + rows, mask=rmask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for k in range(0, d, BLOCK_D):
        ks = k + tl.arange(0, BLOCK_D)
        tile = rmask[:, None] & (ks < d)[None, :]
        xt = tl.load(x_ptr + rows64[:, None] * d + ks[None, :], mask=tile, other=0.0).to(tl.float32)
        yt = tl.load(y_ptr + other[:, None] * d + ks[None, :], mask=tile, other=0.0).to(tl.float32)
        acc += tl.sum(xt * yt, axis=1)
    tl.store(dots_ptr + rows, acc, mask=rmask)


@triton.jit
def combine_lse_kernel(
    part_ptr,
    lse_ptr,
    parts,
    n,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """lse[j] = log sum_p exp(part[p, j]) over the ``parts`` rows of a (parts, n) float32 array of partial
    log-sum-exps, for the BLOCK_N columns of each program, in one pass (``torch.logsumexp`` over dim 0 is
    about nine kernels). Infinite partials give what ``torch.logsumexp`` gives (-inf only when every
    partial is -inf, +inf when any is +inf); a NaN gives NaN."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n
    run_max = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_N,), tl.float32)
    for p0 in range(0, parts, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        tile_mask = (ps < parts)[:, None] & cmask[None, :]
        offsets = ps.to(tl.int64)[:, None] * n + cols[None, :]
        tile = tl.load(part_ptr + offsets, mask=tile_mask, other=float("-inf"))
        new_max = tl.maximum(run_max, tl.max(tile, axis=0))
        shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(tile - shift[None, :]), axis=0)
        run_max = new_max
    shift = tl.where(tl.abs(run_max) == float("inf"), 0.0, run_max)
    tl.store(lse_ptr + cols, tl.log(tl.where(cmask, run_sum, 1.0)) + shift, mask=cmask)
