"""Weight gradients of a LayerNorm -> linear (-> ReLU -> linear) stack, reduced over the rows.

Everything reduces to two d x r products over the rows plus column sums (the ``ln_linear`` notation,
``p = z W^T + b``, ``z = xhat * g + beta``; for the adapter also ``y = s * (h Wu^T + bu)``):

    M = xhat^T dp   (d x r),  csp = colsum(dp)  (r)      -- always
    G = dy^T h      (d x r),  cs  = colsum(dy)  (d)      -- adapter only (HAS_G)

from which, per task,

    dW = (M * g)^T + csp beta^T    db = csp     dg = sum_k W_kj M_jk     dbeta = csp W
    dWu = s G                       dbu = s cs   ds = sum(Wu * G) + bu . cs

``weight_grad_partials_kernel`` computes M, G and the column sums for one (d tile, r tile, row segment);
segments never cross a task boundary, so every partial belongs to one task. (For r <= 128 the adapter's
``adapter_bwd_dx_weights_kernel`` writes the same partials while it computes dx; for rows of one task and
wider outputs, library GEMMs give M and G as a single segment, see ``launch.weight_grads``.)
``weight_grad_epilogue_kernel`` sums a task's segment partials in a fixed order (deterministic, no atomics)
and applies the formulas above, writing every gradient in its parameter's dtype; the scale gradient comes
out as one fp32 partial per d tile. A task without rows has empty segments and receives exact zeros.
"""

import triton
import triton.language as tl
from famevil_fast.kernels._tiles import task_segment


@triton.jit
def weight_grad_partials_kernel(
    x_ptr,
    mean_ptr,
    rstd_ptr,
    dp_ptr,
    dy_ptr,
    h_ptr,
    m_part_ptr,
    csp_part_ptr,
    g_part_ptr,
    cs_part_ptr,
    order_ptr,
    counts_ptr,
    n_rows,
    d,
    n_out,
    n_segments,
    n_rtiles,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_G: tl.constexpr,
    MIXED: tl.constexpr,
    DOT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partials of segment ``program_id(1)`` for d tile ``pid0 // n_rtiles`` and r tile ``pid0 % n_rtiles``.

    Partials are fp32 arrays indexed [segment, d, r] (M, G), [segment, r] (csp) and [segment, d] (cs).
    """
    pid = tl.program_id(0)
    seg = tl.program_id(1)
    pid_d = pid // n_rtiles
    pid_r = pid % n_rtiles
    task, first, last = task_segment(seg, n_rows, counts_ptr, n_segments, MIXED)

    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    rcols = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    dmask = dcols < d
    rmask = rcols < n_out
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
        mean = tl.load(mean_ptr + pos, mask=mask, other=0.0)
        rstd = tl.load(rstd_ptr + pos, mask=mask, other=0.0)
        xhat = tl.where(
            mask[:, None] & dmask[None, :],
            (
                tl.load(
                    x_ptr + rows[:, None] * d + dcols[None, :], mask=mask[:, None] & dmask[None, :], other=0.0
                ).to(tl.float32)
                - mean[:, None]
            )
            * rstd[:, None],
            0.0,
        )
        rtile = mask[:, None] & rmask[None, :]
        dp = tl.load(dp_ptr + pos[:, None] * n_out + rcols[None, :], mask=rtile, other=0.0)
        acc_m = tl.dot(tl.trans(xhat.to(DOT)), dp.to(DOT), acc_m, input_precision=PRECISION)
        csp += tl.sum(dp.to(tl.float32), axis=0)
        if HAS_G:
            dy = tl.load(
                dy_ptr + rows[:, None] * d + dcols[None, :], mask=mask[:, None] & dmask[None, :], other=0.0
            )
            h = tl.load(h_ptr + pos[:, None] * n_out + rcols[None, :], mask=rtile, other=0.0)
            acc_g = tl.dot(tl.trans(dy.to(DOT)), h.to(DOT), acc_g, input_precision=PRECISION)
            cs += tl.sum(dy.to(tl.float32), axis=0)

    seg64 = seg.to(tl.int64)
    dr_offs = seg64 * d * n_out + dcols[:, None] * n_out + rcols[None, :]
    dr_mask = dmask[:, None] & rmask[None, :]
    tl.store(m_part_ptr + dr_offs, acc_m, mask=dr_mask)
    tl.store(csp_part_ptr + seg64 * n_out + rcols, csp, mask=rmask & (pid_d == 0))
    if HAS_G:
        tl.store(g_part_ptr + dr_offs, acc_g, mask=dr_mask)
        tl.store(cs_part_ptr + seg64 * d + dcols, cs, mask=dmask & (pid_r == 0))


@triton.jit
def weight_grad_epilogue_kernel(
    m_part_ptr,
    csp_part_ptr,
    g_part_ptr,
    cs_part_ptr,
    lnw_ptr,
    lnb_ptr,
    w_ptr,
    wu_ptr,
    bu_ptr,
    s_ptr,
    dlnw_ptr,
    dlnb_ptr,
    dw_ptr,
    db_ptr,
    dwu_ptr,
    dbu_ptr,
    ds_part_ptr,
    d,
    n_out,
    n_segments,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    HAS_G: tl.constexpr,
):
    """All parameter gradients of task ``program_id(1)`` for the d columns of tile ``program_id(0)``.

    W is (n_out, d) (the down projection), Wu is (d, n_out); per-task parameters are contiguous.
    """
    pid_d = tl.program_id(0)
    task = tl.program_id(1)
    n_dtiles = tl.num_programs(0)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    g = tl.load(lnw_ptr + task * d + dcols, mask=dmask, other=0.0).to(tl.float32)
    beta = tl.load(lnb_ptr + task * d + dcols, mask=dmask, other=0.0).to(tl.float32)
    seg0 = (task * n_segments).to(tl.int64)
    dr_stride = d * n_out
    dg = tl.zeros((BLOCK_D,), tl.float32)
    dbeta = tl.zeros((BLOCK_D,), tl.float32)
    ds = tl.zeros((BLOCK_D,), tl.float32)
    s = 0.0
    if HAS_G:
        s = tl.load(s_ptr + task).to(tl.float32)
    for r0 in range(0, n_out, BLOCK_R):
        rcols = r0 + tl.arange(0, BLOCK_R)
        rmask = rcols < n_out
        tile = dmask[:, None] & rmask[None, :]
        dr_offs = seg0 * dr_stride + dcols[:, None] * n_out + rcols[None, :]
        r_offs = seg0 * n_out + rcols
        m = tl.zeros((BLOCK_D, BLOCK_R), tl.float32)
        csp = tl.zeros((BLOCK_R,), tl.float32)
        for i in range(0, n_segments):
            m += tl.load(m_part_ptr + dr_offs + i * dr_stride, mask=tile, other=0.0)
            csp += tl.load(csp_part_ptr + r_offs + i * n_out, mask=rmask, other=0.0)
        w_offs = task * n_out * d + rcols[None, :] * d + dcols[:, None]
        w = tl.load(w_ptr + w_offs, mask=tile, other=0.0).to(tl.float32)
        tl.store(dw_ptr + w_offs, m * g[:, None] + beta[:, None] * csp[None, :], mask=tile)
        dg += tl.sum(w * m, axis=1)
        dbeta += tl.sum(w * csp[None, :], axis=1)
        tl.store(db_ptr + task * n_out + rcols, csp, mask=rmask & (pid_d == 0))
        if HAS_G:
            gg = tl.zeros((BLOCK_D, BLOCK_R), tl.float32)
            for i in range(0, n_segments):
                gg += tl.load(g_part_ptr + dr_offs + i * dr_stride, mask=tile, other=0.0)
            wu_offs = task * d * n_out + dcols[:, None] * n_out + rcols[None, :]
            wu = tl.load(wu_ptr + wu_offs, mask=tile, other=0.0).to(tl.float32)
            tl.store(dwu_ptr + wu_offs, gg * s, mask=tile)
            ds += tl.sum(wu * gg, axis=1)
    tl.store(dlnw_ptr + task * d + dcols, dg, mask=dmask)
    tl.store(dlnb_ptr + task * d + dcols, dbeta, mask=dmask)
    if HAS_G:
        cs = tl.zeros((BLOCK_D,), tl.float32)
        for i in range(0, n_segments):
            cs += tl.load(cs_part_ptr + (seg0 + i) * d + dcols, mask=dmask, other=0.0)
        bu = tl.load(bu_ptr + task * d + dcols, mask=dmask, other=0.0).to(tl.float32)
        tl.store(dbu_ptr + task * d + dcols, cs * s, mask=dmask)
        ds += bu * cs
        tl.store(ds_part_ptr + task * n_dtiles + pid_d, tl.sum(ds, axis=0))
