"""Forward kernels of the bottleneck adapter ``y = sum(residuals) + s * (relu(LN(x) Wd^T + bd) Wu^T + bu)``.

Two shapes of the computation, chosen by the bottleneck width r:

* ``adapter_fwd_fused_kernel`` (r <= 128): one program owns BLOCK_M rows. It reads its rows once for the
  LayerNorm statistics, streams them again (from L2) through the down projection, keeps the bottleneck
  activation h (BLOCK_M x r, fp32) in registers, and streams the up projection out in column chunks,
  adding the bias, the scale and every residual term before the single store of y. HBM traffic is the
  minimum: x and the residuals read once, y written once (plus h and the row statistics, 2r + 8 bytes a
  row, when a backward pass will need them).

* r > 128: h no longer fits beside the accumulators in one program's registers. The candidate splits
  are (a) materialise the LayerNorm output (N x d) and run two GEMMs, (b) keep h on chip but recompute
  the down projection for every output column chunk (d / BLOCK_N times the down GEMM), or
  (c) materialise h (N x r): ``ln_linear_fwd_kernel`` (LN + down + ReLU) writes h, then
  ``adapter_up_residual_kernel`` reads it for the up projection and the residual epilogue. Split (c)
  moves the fewest bytes: it adds 2r element reads/writes per row, fewer than (a)'s 2d since r <= d
  in every configuration, and (b) multiplies the dominant arithmetic instead. It costs nothing extra in
  training, where the backward pass needs h anyway.

One-pass LayerNorm (``ONE_PASS``, switched by ``configs.ADAPTER_ONE_PASS_LN``): the fused kernel can skip
its statistics pass. With ``W' = Wd diag(g)`` (rounded to the activation dtype by
``scaled_down_weights_kernel``, one small launch per call), ``v = W' 1`` summed from those rounded values
and ``c = bd + Wd beta``,

    LN(x) Wd^T + bd = rstd * (x W'^T - mean * v) + c,

so the down projection multiplies the raw rows while the same loop gathers their mean and variance
(chunks merged with Chan's formula). Each row is read once instead of twice and the statistics no longer
hold up the product. The subtraction ``x W'^T - mean * v`` is exact up to the product's float32
accumulation, because v sums the very values the product multiplies; it runs for 16-bit activations, and for
float32 when TF32 is off (TF32 would round x itself, and with it the mean that the subtraction removes).

Few rows (a decoding step: one token per sequence), one task: ``adapter_fwd_columns_kernel`` spreads the
columns of y over programs. The fused kernel would run one program per 16 rows, so a step's few dozen rows
would stream both projections through a single multiprocessor, one dependent load after another. Here each
program recomputes its rows' bottleneck (the down projection is r / d of the work) and writes one column
tile. It can also add a linear branch ``a W^T + b`` (the MLP's second layer) in its epilogue, which saves
that layer's own launch.

Per-task weights: parameters carry a leading task dimension and every block holds rows of one task (see
``_tiles``); with a single task the offsets are zero.
"""

import triton
import triton.language as tl
from famevil_fast.kernels._tiles import (
    layer_norm_product,
    merge_chunk_stats,
    row_block,
    row_major_tile,
    row_stats,
)


@triton.jit
def relu(h):
    """max(h, 0) with NaN kept NaN, as torch.relu does (``tl.maximum`` alone returns 0 for NaN)."""
    return tl.maximum(h, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _residual_epilogue(u, s, bu, rows, mask, cols, d, res0_ptr, res1_ptr, res2_ptr, NUM_RES: tl.constexpr):
    """s * (u + bu) plus up to three residual tiles, accumulated in fp32."""
    out = (u + bu[None, :]) * s
    offs = rows[:, None] * d + cols[None, :]
    valid = mask[:, None] & (cols < d)[None, :]
    if NUM_RES >= 1:
        out += tl.load(res0_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if NUM_RES >= 2:
        out += tl.load(res1_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if NUM_RES >= 3:
        out += tl.load(res2_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    return out


@triton.jit
def _down_one_pass(
    x_ptr,
    ws_ptr,
    rows,
    mask,
    rcols,
    rmask,
    d,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(mean, rstd, x W'^T) for BLOCK_M rows in one pass over x: the statistics of each chunk (merged as in
    ``_tiles.row_stats``) and its product with W' from the same load."""
    mean = tl.zeros((BLOCK_M,), tl.float32)
    m2 = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for k in range(0, d, BLOCK_K):
        kcols = k + tl.arange(0, BLOCK_K)
        kmask = kcols < d
        xk = tl.load(
            x_ptr + rows[:, None] * d + kcols[None, :], mask=mask[:, None] & kmask[None, :], other=0.0
        )
        w = tl.load(
            ws_ptr + rcols[None, :] * d + kcols[:, None], mask=rmask[None, :] & kmask[:, None], other=0.0
        )
        acc = tl.dot(xk.to(DOT), w.to(DOT), acc, input_precision=PRECISION)
        mean, m2 = merge_chunk_stats(mean, m2, xk.to(tl.float32), kmask, k, d, BLOCK_K)
    return mean, tl.rsqrt(m2 / d + eps), acc


@triton.jit
def scaled_down_weights_kernel(
    lnw_ptr,
    lnb_ptr,
    wd_ptr,
    bd_ptr,
    ws_ptr,
    v_ptr,
    c_ptr,
    d,
    r,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For outputs [program_id(0) * BLOCK_R, + BLOCK_R) of task ``program_id(1)``: ``W' = Wd diag(g)``
    stored in ``ws``'s dtype, ``v`` = the row sums of the stored W' (float32), ``c = bd + Wd beta``."""
    task = tl.program_id(1).to(tl.int64)
    outs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    omask = outs < r
    v = tl.zeros((BLOCK_R,), tl.float32)
    wbeta = tl.zeros((BLOCK_R,), tl.float32)
    for k in range(0, d, BLOCK_K):
        kcols = k + tl.arange(0, BLOCK_K)
        kmask = kcols < d
        tile = omask[:, None] & kmask[None, :]
        offs = task * r * d + outs[:, None] * d + kcols[None, :]
        w = tl.load(wd_ptr + offs, mask=tile, other=0.0).to(tl.float32)
        g = tl.load(lnw_ptr + task * d + kcols, mask=kmask, other=0.0).to(tl.float32)
        beta = tl.load(lnb_ptr + task * d + kcols, mask=kmask, other=0.0).to(tl.float32)
        ws = (w * g[None, :]).to(ws_ptr.dtype.element_ty)
        tl.store(ws_ptr + offs, ws, mask=tile)
        v += tl.sum(ws.to(tl.float32), axis=1)
        wbeta += tl.sum(w * beta[None, :], axis=1)
    bd = tl.load(bd_ptr + task * r + outs, mask=omask, other=0.0).to(tl.float32)
    tl.store(v_ptr + task * r + outs, v, mask=omask)
    tl.store(c_ptr + task * r + outs, bd + wbeta, mask=omask)


@triton.jit
def adapter_fwd_fused_kernel(
    x_ptr,
    y_ptr,
    h_ptr,
    mean_ptr,
    rstd_ptr,
    lnw_ptr,
    lnb_ptr,
    wd_ptr,
    bd_ptr,
    wu_ptr,
    bu_ptr,
    s_ptr,
    res0_ptr,
    res1_ptr,
    res2_ptr,
    ws_ptr,
    v_ptr,
    c_ptr,
    order_ptr,
    counts_ptr,
    n_tasks,
    n_rows,
    d,
    r,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NUM_RES: tl.constexpr,
    MIXED: tl.constexpr,
    SAVE: tl.constexpr,
    ONE_PASS: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Whole adapter for BLOCK_M rows with h on chip (BLOCK_R >= r, BLOCK_R <= 128). With ONE_PASS the down
    projection takes ``ws`` (W' per task, (T, r, d)), ``v`` and ``c`` ((T, r) float32) from
    ``scaled_down_weights_kernel`` instead of the LayerNorm parameters and Wd, bd."""
    pid = tl.program_id(0)
    task, pos, rows, mask = row_block(pid, n_rows, order_ptr, counts_ptr, n_tasks, BLOCK_M, MIXED)
    wu_ptr += task * d * r
    bu_ptr += task * d
    s_ptr += task
    rcols = tl.arange(0, BLOCK_R)
    rmask = rcols < r
    if ONE_PASS:
        mean, rstd, acc = _down_one_pass(
            x_ptr,
            ws_ptr + task * r * d,
            rows,
            mask,
            rcols,
            rmask,
            d,
            eps,
            BLOCK_M,
            BLOCK_K,
            BLOCK_R,
            DOT,
            PRECISION,
        )
        v = tl.load(v_ptr + task * r + rcols, mask=rmask, other=0.0)
        c = tl.load(c_ptr + task * r + rcols, mask=rmask, other=0.0)
        h = relu((acc - mean[:, None] * v[None, :]) * rstd[:, None] + c[None, :])
    else:
        mean, rstd = row_stats(x_ptr, rows, mask, d, eps, BLOCK_M, BLOCK_K)
        acc = layer_norm_product(
            x_ptr,
            lnw_ptr + task * d,
            lnb_ptr + task * d,
            wd_ptr + task * r * d,
            rows,
            mask,
            rcols,
            rmask,
            mean,
            rstd,
            d,
            BLOCK_M,
            BLOCK_K,
            BLOCK_R,
            DOT,
            PRECISION,
        )
        bd = tl.load(bd_ptr + task * r + rcols, mask=rmask, other=0.0).to(tl.float32)
        h = relu(acc + bd[None, :])
    if SAVE:
        tl.store(h_ptr + pos[:, None] * r + rcols[None, :], h, mask=mask[:, None] & rmask[None, :])
        tl.store(mean_ptr + pos, mean, mask=mask)
        tl.store(rstd_ptr + pos, rstd, mask=mask)

    s = tl.load(s_ptr).to(tl.float32)
    hd = h.to(DOT)
    for n in range(0, d, BLOCK_N):
        ncols = n + tl.arange(0, BLOCK_N)
        nmask = ncols < d
        wu = tl.load(
            wu_ptr + ncols[None, :] * r + rcols[:, None], mask=rmask[:, None] & nmask[None, :], other=0.0
        )
        u = tl.dot(hd, wu.to(DOT), input_precision=PRECISION)
        bu = tl.load(bu_ptr + ncols, mask=nmask, other=0.0).to(tl.float32)
        out = _residual_epilogue(u, s, bu, rows, mask, ncols, d, res0_ptr, res1_ptr, res2_ptr, NUM_RES)
        tl.store(y_ptr + rows[:, None] * d + ncols[None, :], out, mask=mask[:, None] & nmask[None, :])


@triton.jit
def adapter_up_residual_kernel(
    h_ptr,
    y_ptr,
    wu_ptr,
    bu_ptr,
    s_ptr,
    res0_ptr,
    res1_ptr,
    res2_ptr,
    order_ptr,
    counts_ptr,
    n_tasks,
    n_rows,
    d,
    r,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NUM_RES: tl.constexpr,
    MIXED: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y tile (BLOCK_M x BLOCK_N) = s * (h Wu^T + bu) + residuals; h (sorted positions) read from memory.
    One-dimensional grid, d tiles of a row block adjacent (``_tiles.row_major_tile``)."""
    pid_m, pid_n = row_major_tile(tl.program_id(0), d, BLOCK_N)
    task, pos, rows, mask = row_block(pid_m, n_rows, order_ptr, counts_ptr, n_tasks, BLOCK_M, MIXED)
    wu_ptr += task * d * r
    bu_ptr += task * d
    s_ptr += task

    ncols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ncols < d
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, r, BLOCK_K):
        kcols = k + tl.arange(0, BLOCK_K)
        kmask = kcols < r
        h = tl.load(h_ptr + pos[:, None] * r + kcols[None, :], mask=mask[:, None] & kmask[None, :], other=0.0)
        wu = tl.load(
            wu_ptr + ncols[None, :] * r + kcols[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0
        )
        acc = tl.dot(h.to(DOT), wu.to(DOT), acc, input_precision=PRECISION)
    s = tl.load(s_ptr).to(tl.float32)
    bu = tl.load(bu_ptr + ncols, mask=nmask, other=0.0).to(tl.float32)
    out = _residual_epilogue(acc, s, bu, rows, mask, ncols, d, res0_ptr, res1_ptr, res2_ptr, NUM_RES)
    tl.store(y_ptr + rows[:, None] * d + ncols[None, :], out, mask=mask[:, None] & nmask[None, :])


@triton.jit
def adapter_fwd_columns_kernel(
    x_ptr,
    y_ptr,
    h_ptr,
    mean_ptr,
    rstd_ptr,
    lnw_ptr,
    lnb_ptr,
    wd_ptr,
    bd_ptr,
    wu_ptr,
    bu_ptr,
    s_ptr,
    res0_ptr,
    res1_ptr,
    res2_ptr,
    a_ptr,
    w_ptr,
    b_ptr,
    n_rows,
    d,
    r,
    k_lin,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    NUM_RES: tl.constexpr,
    LINEAR: tl.constexpr,
    SAVE: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Tile (row block, column tile) of ``y = s * (relu(LN(x) Wd^T + bd) Wu^T + bu) + residuals``, plus
    ``a W^T + b`` with LINEAR (a (N, k_lin), W (d, k_lin)); one task, BLOCK_R >= r. One-dimensional grid,
    the column tiles of a row block adjacent. Each program recomputes its rows' statistics and h; with
    SAVE the first column tile stores them."""
    pid_m, pid_n = row_major_tile(tl.program_id(0), d, BLOCK_N)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = rows < n_rows
    rows = rows.to(tl.int64)
    rcols = tl.arange(0, BLOCK_R)
    rmask = rcols < r
    mean, rstd = row_stats(x_ptr, rows, mask, d, eps, BLOCK_M, BLOCK_K)
    acc = layer_norm_product(
        x_ptr, lnw_ptr, lnb_ptr, wd_ptr, rows, mask, rcols, rmask, mean, rstd, d,
        BLOCK_M, BLOCK_K, BLOCK_R, DOT, PRECISION,
    )  # fmt: skip
    bd = tl.load(bd_ptr + rcols, mask=rmask, other=0.0).to(tl.float32)
    h = relu(acc + bd[None, :])
    if SAVE:
        if pid_n == 0:
            tl.store(h_ptr + rows[:, None] * r + rcols[None, :], h, mask=mask[:, None] & rmask[None, :])
            tl.store(mean_ptr + rows, mean, mask=mask)
            tl.store(rstd_ptr + rows, rstd, mask=mask)
    ncols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ncols < d
    wu = tl.load(
        wu_ptr + ncols[None, :] * r + rcols[:, None], mask=rmask[:, None] & nmask[None, :], other=0.0
    )
    u = tl.dot(h.to(DOT), wu.to(DOT), input_precision=PRECISION)
    bu = tl.load(bu_ptr + ncols, mask=nmask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr).to(tl.float32)
    out = _residual_epilogue(u, s, bu, rows, mask, ncols, d, res0_ptr, res1_ptr, res2_ptr, NUM_RES)
    if LINEAR:
        lin = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k in range(0, k_lin, BLOCK_K):
            kcols = k + tl.arange(0, BLOCK_K)
            kmask = kcols < k_lin
            a = tl.load(
                a_ptr + rows[:, None] * k_lin + kcols[None, :], mask=mask[:, None] & kmask[None, :], other=0.0
            )
            w = tl.load(
                w_ptr + ncols[None, :] * k_lin + kcols[:, None],
                mask=kmask[:, None] & nmask[None, :],
                other=0.0,
            )
            lin = tl.dot(a.to(DOT), w.to(DOT), lin, input_precision=PRECISION)
        b = tl.load(b_ptr + ncols, mask=nmask, other=0.0).to(tl.float32)
        out += lin + b[None, :]
    tl.store(y_ptr + rows[:, None] * d + ncols[None, :], out, mask=mask[:, None] & nmask[None, :])
