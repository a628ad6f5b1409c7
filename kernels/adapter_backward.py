"""Backward kernels of the bottleneck adapter (input side; the weight side is in ``weight_grads``).

With ``t = dy Wu`` (N x r), the bottleneck gradient is ``dp = s * t * [h > 0]``; the input gradient then
follows the LayerNorm-through-linear rule of ``ln_linear`` (``dz = dp Wd``, row constants from r-wide dot
products). Saved from the forward pass: h (N x r) and the LayerNorm statistics (8 bytes a row); the
normalised activations are recomputed from x, which the LayerNorm backward reads anyway. Recomputing h
instead would add the down projection (2dr flops a row) and a second pass over x to save 2r elements of
traffic a row, which is the worse trade for r >= 16.

* ``adapter_dp_kernel`` computes dp (reads dy and h, writes dp: r elements a row), and in a few extra
  programs the LayerNorm row constants of the dx pass.
* r <= 128: ``adapter_bwd_dx_weights_kernel`` then makes one more pass per (d tile, row segment) that
  writes dx and accumulates the weight-gradient partials together, so x and dy are each read once
  there; the HBM traffic of the backward is dy twice, x once, dx once, plus the r-wide h and dp.
* r > 128: the weight-gradient accumulators for all of r no longer fit beside the dx tile, and the
  products, not the bytes, bound the time. ``ln_linear_dx_kernel`` produces dx (and, for rows of one task,
  stores the normalised activations xhat on the way); the weight gradients' two d x r products over all
  rows, xhat^T dp and dy^T h, are then library GEMMs (``launch.weight_grads``; on a GPU the dp kernel also
  writes h in the activation dtype for the second). Task-grouped rows, whose weights differ per task,
  take ``weight_grads.weight_grad_partials_kernel`` instead.
"""

import triton
import triton.language as tl
from famevil_fast.kernels._tiles import row_block, row_major_tile, task_segment
from famevil_fast.kernels.ln_linear import row_constants_block


@triton.jit
def adapter_bwd_dx_weights_kernel(
    dy_ptr,
    x_ptr,
    h_ptr,
    dp_ptr,
    mean_ptr,
    rstd_ptr,
    lnw_ptr,
    wd_ptr,
    v1_ptr,
    cb_ptr,
    dx_ptr,
    m_part_ptr,
    csp_part_ptr,
    g_part_ptr,
    cs_part_ptr,
    order_ptr,
    counts_ptr,
    n_rows,
    d,
    r,
    n_segments,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    MIXED: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dx for the d columns of tile ``program_id(0)`` and the weight-gradient partials of row segment
    ``program_id(1)`` (layout of ``weight_grads.weight_grad_partials_kernel`` with one r tile).

    BLOCK_R >= r. The program's slice of Wd stays on chip for all its rows; per row block it reads x, dy,
    dp and h once each and writes dx once. ``v1 = Wd g`` and ``cb = bd + Wd beta`` per task (fp32).
    """
    pid_d = tl.program_id(0)
    seg = tl.program_id(1)
    task, first, last = task_segment(seg, n_rows, counts_ptr, n_segments, MIXED)
    lnw_ptr += task * d
    wd_ptr += task * r * d
    v1_ptr += task * r
    cb_ptr += task * r

    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rcols = tl.arange(0, BLOCK_R)
    dmask = dcols < d
    rmask = rcols < r
    wd = tl.load(
        wd_ptr + rcols[:, None] * d + dcols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0
    )
    wd = wd.to(DOT)
    g = tl.load(lnw_ptr + dcols, mask=dmask, other=0.0).to(tl.float32)
    v1 = tl.load(v1_ptr + rcols, mask=rmask, other=0.0)
    cb = tl.load(cb_ptr + rcols, mask=rmask, other=0.0)
    acc_m = tl.zeros((BLOCK_D, BLOCK_R), tl.float32)
    acc_g = tl.zeros((BLOCK_D, BLOCK_R), tl.float32)
    csp = tl.zeros((BLOCK_R,), tl.float32)
    cs = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(first, last, BLOCK_M):
        pos = start + tl.arange(0, BLOCK_M)
        mask = pos < last
        if MIXED:
            rows = tl.load(order_ptr + pos, mask=mask, other=0).to(tl.int64)
        else:
            rows = pos.to(tl.int64)
        pos = pos.to(tl.int64)
        rtile = mask[:, None] & rmask[None, :]
        dtile = mask[:, None] & dmask[None, :]
        dp = tl.load(dp_ptr + pos[:, None] * r + rcols[None, :], mask=rtile, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + pos[:, None] * r + rcols[None, :], mask=rtile, other=0.0).to(tl.float32)
        c1 = tl.sum(dp * v1[None, :], axis=1) / d
        c2 = tl.sum(dp * (h - cb[None, :]), axis=1) / d
        mean = tl.load(mean_ptr + pos, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + pos, mask=mask, other=0.0)
        xk = tl.load(x_ptr + rows[:, None] * d + dcols[None, :], mask=dtile, other=0.0).to(tl.float32)
        xhat = tl.where(dtile, (xk - mean[:, None]) * rstd[:, None], 0.0)
        dpd = dp.to(DOT)
        dz = tl.dot(dpd, wd, input_precision=PRECISION)
        dx = (dz * g[None, :] - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * d + dcols[None, :], dx, mask=dtile)
        acc_m = tl.dot(tl.trans(xhat.to(DOT)), dpd, acc_m, input_precision=PRECISION)
        dy = tl.load(dy_ptr + rows[:, None] * d + dcols[None, :], mask=dtile, other=0.0)
        acc_g = tl.dot(tl.trans(dy.to(DOT)), h.to(DOT), acc_g, input_precision=PRECISION)
        cs += tl.sum(dy.to(tl.float32), axis=0)
        csp += tl.sum(dp, axis=0)

    seg64 = seg.to(tl.int64)
    dr_offs = seg64 * d * r + dcols[:, None] * r + rcols[None, :]
    dr_mask = dmask[:, None] & rmask[None, :]
    tl.store(m_part_ptr + dr_offs, acc_m, mask=dr_mask)
    tl.store(g_part_ptr + dr_offs, acc_g, mask=dr_mask)
    tl.store(cs_part_ptr + seg64 * d + dcols, cs, mask=dmask)
    tl.store(csp_part_ptr + seg64 * r + rcols, csp, mask=rmask & (pid_d == 0))


@triton.jit
def adapter_dp_kernel(
    dy_ptr,
    h_ptr,
    wu_ptr,
    s_ptr,
    dp_ptr,
    h_low_ptr,
    lnw_ptr,
    lnb_ptr,
    wd_ptr,
    bd_ptr,
    v1_ptr,
    cb_ptr,
    order_ptr,
    counts_ptr,
    n_tasks,
    n_rows,
    n_row_blocks,
    d,
    r,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIXED: tl.constexpr,
    SAVE_H: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """dp tile (BLOCK_M x BLOCK_R) = s * (dy Wu) * [h > 0] at sorted positions, for row blocks
    ``pid_m < n_row_blocks``. The n_tasks programs after them compute the LayerNorm row constants
    ``v1 = Wd g`` and ``cb = bd + Wd beta`` of one task each (``ln_linear.row_constants_block``), which the
    dx kernel needs next: one launch serves both, and a small adapter's backward is bound by launches.
    One-dimensional grid, the r tiles of a row block adjacent (``_tiles.row_major_tile``). With SAVE_H the
    program also stores its tile of h in the activation dtype (``h_low``), the operand of the up
    projection's weight-gradient product."""
    pid_m, pid_r = row_major_tile(tl.program_id(0), r, BLOCK_R)
    if pid_m >= n_row_blocks:
        row_constants_block(
            lnw_ptr,
            lnb_ptr,
            wd_ptr,
            bd_ptr,
            v1_ptr,
            cb_ptr,
            pid_m - n_row_blocks,
            pid_r,
            d,
            r,
            BLOCK_R,
            BLOCK_N,
        )
    else:
        task, pos, rows, mask = row_block(pid_m, n_rows, order_ptr, counts_ptr, n_tasks, BLOCK_M, MIXED)
        wu_ptr += task * d * r
        s_ptr += task

        rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rcols < r
        t = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
        for n in range(0, d, BLOCK_N):
            ncols = n + tl.arange(0, BLOCK_N)
            nmask = ncols < d
            dy = tl.load(
                dy_ptr + rows[:, None] * d + ncols[None, :], mask=mask[:, None] & nmask[None, :], other=0.0
            )
            wu = tl.load(
                wu_ptr + ncols[:, None] * r + rcols[None, :], mask=nmask[:, None] & rmask[None, :], other=0.0
            )
            t = tl.dot(dy.to(DOT), wu.to(DOT), t, input_precision=PRECISION)
        rtile = mask[:, None] & rmask[None, :]
        h = tl.load(h_ptr + pos[:, None] * r + rcols[None, :], mask=rtile, other=0.0).to(tl.float32)
        s = tl.load(s_ptr).to(tl.float32)
        dp = tl.where(h > 0.0, t * s, 0.0)
        tl.store(dp_ptr + pos[:, None] * r + rcols[None, :], dp, mask=rtile)
        if SAVE_H:
            tl.store(h_low_ptr + pos[:, None] * r + rcols[None, :], h, mask=rtile)
