"""LayerNorm fused into a following linear layer: ``p = LN(x) W^T + b`` (optionally an activation of it:
ReLU for the adapter's down projection, QuickGELU or GELU for an MLP's first layer when decoding), and the
input gradient of that composition (without activation, or with ReLU).

The normalised activations never reach memory: the forward kernel normalises each K chunk of x on its
way into the matrix product, and the backward kernel rebuilds the LayerNorm backward from the output
gradient ``dp`` alone. With ``xhat = (x - mean) * rstd``, ``z = xhat * g + beta`` and ``dz = dp W``:

    dx = rstd * (dz * g - c1 - xhat * c2),  c1 = mean_j(dz_j g_j),  c2 = mean_j(dz_j g_j xhat_j)

and both row constants reduce to r-wide dot products: ``c1 = dp . (W g) / d`` and, because
``sum_j W_kj g_j xhat_j = p_k - b_k - (W beta)_k``, ``c2 = dp . (p - b - W beta) / d``. So a program
needs only its own d-columns of x and W, and the whole gradient is one pass. The two vectors
``v1 = W g`` and ``cb = b + W beta`` come from ``row_constants_block`` (its own launch,
``ln_linear_row_constants_kernel``, or extra programs of the adapter's dp kernel). For a ReLU output the
stored activation relu(p) can stand in for p, because dp is zero wherever p <= 0.

Used for the adapter's down projection when r > 128 and for the query and key/value projections of the
cross-attention adapter.
"""

import triton
import triton.language as tl
from famevil_fast.kernels._tiles import (
    layer_norm_product,
    normalized_tile,
    row_block,
    row_major_tile,
    row_stats,
)

# ``ACT`` of ln_linear_fwd_kernel: the activation applied to LN(x) W^T + b
ACTIVATIONS = {None: 0, "relu": 1, "quick_gelu": 2, "gelu": 3}


@triton.jit
def _activation(p, ACT: tl.constexpr):
    """ReLU (1), QuickGELU p * sigmoid(1.702 p) (2) or the erf form of GELU (3); p itself for 0."""
    if ACT == 1:
        p = tl.maximum(p, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 2:
        p = p / (1.0 + tl.exp(-1.702 * p))
    elif ACT == 3:
        p = 0.5 * p * (1.0 + tl.math.erf(p * 0.7071067811865476))
    return p


@triton.jit
def ln_linear_fwd_kernel(
    x_ptr,
    out_ptr,
    mean_ptr,
    rstd_ptr,
    lnw_ptr,
    lnb_ptr,
    w_ptr,
    b_ptr,
    order_ptr,
    counts_ptr,
    n_tasks,
    n_rows,
    d,
    n_out,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACT: tl.constexpr,
    MIXED: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """out tile (BLOCK_M x BLOCK_N) of LN(x) W^T + b at sorted positions; W is (n_out, d). One-dimensional
    grid, column tiles of a row block adjacent (``_tiles.row_major_tile``)."""
    pid_m, pid_n = row_major_tile(tl.program_id(0), n_out, BLOCK_N)
    task, pos, rows, mask = row_block(pid_m, n_rows, order_ptr, counts_ptr, n_tasks, BLOCK_M, MIXED)
    lnw_ptr += task * d
    lnb_ptr += task * d
    w_ptr += task * n_out * d
    b_ptr += task * n_out

    mean, rstd = row_stats(x_ptr, rows, mask, d, eps, BLOCK_M, BLOCK_K)
    ncols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ncols < n_out
    acc = layer_norm_product(
        x_ptr,
        lnw_ptr,
        lnb_ptr,
        w_ptr,
        rows,
        mask,
        ncols,
        nmask,
        mean,
        rstd,
        d,
        BLOCK_M,
        BLOCK_K,
        BLOCK_N,
        DOT,
        PRECISION,
    )
    b = tl.load(b_ptr + ncols, mask=nmask, other=0.0).to(tl.float32)
    acc = _activation(acc + b[None, :], ACT)
    tl.store(out_ptr + pos[:, None] * n_out + ncols[None, :], acc, mask=mask[:, None] & nmask[None, :])
    if SAVE_STATS:
        first = mask & (pid_n == 0)
        tl.store(mean_ptr + pos, mean, mask=first)
        tl.store(rstd_ptr + pos, rstd, mask=first)


@triton.jit
def ln_linear_dx_kernel(
    dp_ptr,
    p_ptr,
    x_ptr,
    mean_ptr,
    rstd_ptr,
    lnw_ptr,
    w_ptr,
    v1_ptr,
    cb_ptr,
    dx_ptr,
    xhat_ptr,
    order_ptr,
    counts_ptr,
    n_tasks,
    n_rows,
    d,
    n_out,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MIXED: tl.constexpr,
    SAVE_XHAT: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dx tile (BLOCK_M x BLOCK_N) from dp (n_rows x n_out, sorted positions).

    ``v1 = W g`` and ``cb = b + W beta`` (n_out each, per task, fp32) give the row constants c1, c2.
    One-dimensional grid, d tiles of a row block adjacent. With SAVE_XHAT the tile's normalised
    activations are also stored (activation dtype, original rows) for the weight-gradient products.
    """
    pid_m, pid_n = row_major_tile(tl.program_id(0), d, BLOCK_N)
    task, pos, rows, mask = row_block(pid_m, n_rows, order_ptr, counts_ptr, n_tasks, BLOCK_M, MIXED)
    lnw_ptr += task * d
    w_ptr += task * n_out * d
    v1_ptr += task * n_out
    cb_ptr += task * n_out

    ncols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ncols < d
    c1 = tl.zeros((BLOCK_M,), tl.float32)
    c2 = tl.zeros((BLOCK_M,), tl.float32)
    dz = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, n_out, BLOCK_K):
        kcols = k + tl.arange(0, BLOCK_K)
        kmask = kcols < n_out
        tile = mask[:, None] & kmask[None, :]
        dp = tl.load(dp_ptr + pos[:, None] * n_out + kcols[None, :], mask=tile, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + pos[:, None] * n_out + kcols[None, :], mask=tile, other=0.0).to(tl.float32)
        v1 = tl.load(v1_ptr + kcols, mask=kmask, other=0.0)
        cb = tl.load(cb_ptr + kcols, mask=kmask, other=0.0)
        c1 += tl.sum(dp * v1[None, :], axis=1)
        c2 += tl.sum(dp * (p - cb[None, :]), axis=1)
        w = tl.load(
            w_ptr + kcols[:, None] * d + ncols[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0
        )
        dz = tl.dot(dp.to(DOT), w.to(DOT), dz, input_precision=PRECISION)
    c1 = c1 / d
    c2 = c2 / d
    mean = tl.load(mean_ptr + pos, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + pos, mask=mask, other=0.0)
    xhat = normalized_tile(x_ptr, rows, mask, ncols, d, mean, rstd)
    g = tl.load(lnw_ptr + ncols, mask=nmask, other=0.0).to(tl.float32)
    dx = (dz * g[None, :] - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
    offs = rows[:, None] * d + ncols[None, :]
    tl.store(dx_ptr + offs, dx, mask=mask[:, None] & nmask[None, :])
    if SAVE_XHAT:
        tl.store(xhat_ptr + offs, xhat, mask=mask[:, None] & nmask[None, :])


@triton.jit
def row_constants_block(
    lnw_ptr,
    lnb_ptr,
    w_ptr,
    b_ptr,
    v1_ptr,
    cb_ptr,
    task,
    pid_r,
    d,
    n_out,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Stores ``v1 = W g`` and ``cb = b + W beta`` (fp32) for outputs [pid_r * BLOCK_R, + BLOCK_R) of
    ``task``. W is (n_out, d) per task; a matrix-vector product needs no tensor cores, so the K loop
    multiplies and sums in fp32 registers."""
    task = task.to(tl.int64)
    lnw_ptr += task * d
    lnb_ptr += task * d
    w_ptr += task * n_out * d
    b_ptr += task * n_out
    v1_ptr += task * n_out
    cb_ptr += task * n_out

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_out
    v1 = tl.zeros((BLOCK_R,), tl.float32)
    wbeta = tl.zeros((BLOCK_R,), tl.float32)
    for k in range(0, d, BLOCK_K):
        kcols = k + tl.arange(0, BLOCK_K)
        kmask = kcols < d
        w = tl.load(
            w_ptr + rows[:, None] * d + kcols[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
        ).to(tl.float32)
        g = tl.load(lnw_ptr + kcols, mask=kmask, other=0.0).to(tl.float32)
        beta = tl.load(lnb_ptr + kcols, mask=kmask, other=0.0).to(tl.float32)
        v1 += tl.sum(w * g[None, :], axis=1)
        wbeta += tl.sum(w * beta[None, :], axis=1)
    b = tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(v1_ptr + rows, v1, mask=rmask)
    tl.store(cb_ptr + rows, b + wbeta, mask=rmask)


@triton.jit
def ln_linear_row_constants_kernel(
    lnw_ptr,
    lnb_ptr,
    w_ptr,
    b_ptr,
    v1_ptr,
    cb_ptr,
    d,
    n_out,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``v1`` and ``cb`` of ``row_constants_block`` for BLOCK_R outputs of task ``program_id(1)``."""
    row_constants_block(
        lnw_ptr,
        lnb_ptr,
        w_ptr,
        b_ptr,
        v1_ptr,
        cb_ptr,
        tl.program_id(1),
        tl.program_id(0),
        d,
        n_out,
        BLOCK_R,
        BLOCK_K,
    )
