"""Backward kernels of the bottleneck adapter (input side; the weight side is in ``weight_grads``).

With ``t = dy Wu`` (N x r), the bottleneck gradient is ``dp = s * t * [h > 0]``; the input gradient then
follows the LayerNorm-through-linear rule of ``ln_linear`` (``dz = dp Wd``, row constants from r-wide dot
products). Saved from the forward pass: h (N x r) and the LayerNorm statistics (8 bytes a row); the
normalised activations are recomputed from x, which the LayerNorm backward reads anyway. Recomputing h
instead would add the down projection (2dr flops a row) and a second pass over x to save 2r elements of
traffic a row, which is the worse trade for r >= 16.

* ``adapter_bwd_fused_kernel`` (r <= 128): one program per BLOCK_M rows computes t, dp, both row
  constants and dx with dp held on chip; it writes dx and dp (dp feeds the weight gradients).
* ``adapter_dp_kernel`` (r > 128): dp tiles only; ``ln_linear_dx_kernel`` then produces dx.
"""

import triton
import triton.language as tl
from famevil_fast.kernels._tiles import row_block


@triton.jit
def adapter_bwd_fused_kernel(
    dy_ptr, x_ptr, h_ptr, mean_ptr, rstd_ptr, lnw_ptr, wd_ptr, wu_ptr, s_ptr, v1_ptr, cb_ptr,
    dx_ptr, dp_ptr,
    order_ptr, counts_ptr, n_tasks,
    n_rows, d, r,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    MIXED: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dx and dp for BLOCK_M rows (BLOCK_R >= r). ``v1 = Wd g``, ``cb = bd + Wd beta`` per task (fp32)."""
    pid = tl.program_id(0)
    task, pos, rows, mask = row_block(pid, n_rows, order_ptr, counts_ptr, n_tasks, BLOCK_M, MIXED)
    lnw_ptr += task * d
    wd_ptr += task * r * d
    wu_ptr += task * d * r
    s_ptr += task
    v1_ptr += task * r
    cb_ptr += task * r

    rcols = tl.arange(0, BLOCK_R)
    rmask = rcols < r
    rtile = mask[:, None] & rmask[None, :]
    h = tl.load(h_ptr + pos[:, None] * r + rcols[None, :], mask=rtile, other=0.0).to(tl.float32)
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
    s = tl.load(s_ptr).to(tl.float32)
    dp = tl.where(h > 0.0, t * s, 0.0)
    tl.store(dp_ptr + pos[:, None] * r + rcols[None, :], dp, mask=rtile)
    dp = dp.to(dp_ptr.dtype.element_ty).to(tl.float32)

    v1 = tl.load(v1_ptr + rcols, mask=rmask, other=0.0)
    cb = tl.load(cb_ptr + rcols, mask=rmask, other=0.0)
    c1 = tl.sum(dp * v1[None, :], axis=1) / d
    c2 = tl.sum(dp * (h - cb[None, :]), axis=1) / d
    mean = tl.load(mean_ptr + pos, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + pos, mask=mask, other=0.0)
    dpd = dp.to(DOT)
    for k in range(0, d, BLOCK_K):
        kcols = k + tl.arange(0, BLOCK_K)
        kmask = kcols < d
        wd = tl.load(
            wd_ptr + rcols[:, None] * d + kcols[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0
        )
        dz = tl.dot(dpd, wd.to(DOT), input_precision=PRECISION)
        g = tl.load(lnw_ptr + kcols, mask=kmask, other=0.0).to(tl.float32)
        valid = mask[:, None] & kmask[None, :]
        xk = tl.load(x_ptr + rows[:, None] * d + kcols[None, :], mask=valid, other=0.0).to(tl.float32)
        xhat = (xk - mean[:, None]) * rstd[:, None]
        dx = (dz * g[None, :] - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        tl.store(dx_ptr + rows[:, None] * d + kcols[None, :], dx, mask=mask[:, None] & kmask[None, :])


@triton.jit
def adapter_dp_kernel(
    dy_ptr, h_ptr, wu_ptr, s_ptr, dp_ptr,
    order_ptr, counts_ptr, n_tasks,
    n_rows, d, r,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    MIXED: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dp tile (BLOCK_M x BLOCK_R) = s * (dy Wu) * [h > 0] at sorted positions."""
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
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
