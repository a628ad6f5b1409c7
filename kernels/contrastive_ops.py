"""The contrastive log-sum-exp kernels as ``torch.library`` operators with fake implementations and an
autograd formula (so ``torch.compile`` graphs hold them as opaque nodes), plus their host-side launchers.

* ``famevil_fast::contrastive_lse(a, b, scale, cols)`` -> (lse_rows (M,), lse_cols (N,) or (0,)), float32:
  the log-sum-exp of ``scale * a @ b.T`` along each row, and along each column when ``cols``.
* ``famevil_fast::contrastive_lse_backward(g_rows, g_cols, a, b, scale, lse_rows, lse_cols, cols)`` ->
  (grad_a, grad_b, grad_scale).

Inputs arrive checked by ``famevil_fast.ops.contrastive``: 2-D, contiguous, same float16 / bfloat16 /
float32 dtype and device, the scale a float32 0-d tensor on that device. Called directly, the operators
check shapes, make their inputs contiguous (no copy when they are) and take a one-element scale of any
shape, whose gradient comes back in that shape.
"""

# No ``from __future__ import annotations`` here: torch.library reads the annotations to build schemas.

import math
from typing import NamedTuple

import torch
from famevil_fast.kernels import configs
from famevil_fast.kernels.contrastive import (
    combine_lse_kernel,
    contrastive_lse_grad_kernel,
    contrastive_lse_kernel,
    row_dots_kernel,
)
from famevil_fast.kernels.launch import product_f32

from famevil_fast.ops._backend import once_differentiable_grads


def _lse_tiles(x: torch.Tensor) -> configs.Tiles:
    """The sweep's tiles: over dot products it computes, or over those the library GEMM wrote."""
    if configs.CONTRASTIVE_LIBRARY_LOGITS:
        return configs.contrastive_logits_lse_tiles()
    return configs.contrastive_lse_tiles(x.dtype)


def _sweep(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    col_part: torch.Tensor | None,
    logits: torch.Tensor | None,
    t: configs.Tiles,
) -> torch.Tensor:
    """One launch of ``contrastive_lse_kernel`` over the rows of x (the dot products read from ``logits``
    when given); returns the row log-sum-exps."""
    m, d = x.shape
    n = y.shape[0]
    row_blocks, col_tiles = configs.cdiv(m, t.block_m), configs.cdiv(n, t.block_n)
    wanted = configs.contrastive_column_spans(row_blocks, col_tiles, x.device)
    span = configs.cdiv(col_tiles, wanted) * t.block_n
    spans = configs.cdiv(n, span) if n else 1  # rounding the span up can leave fewer spans
    out = torch.empty((spans, m), dtype=torch.float32, device=x.device)
    contrastive_lse_kernel[(row_blocks, spans)](
        x,
        y,
        out if logits is None else logits,
        scale,
        out,
        out if col_part is None else col_part,
        m,
        n,
        d,
        span,
        BLOCK_M=t.block_m,
        BLOCK_N=t.block_n,
        BLOCK_K=t.block_k,
        COLS=col_part is not None,
        SHARED_COL_SCALE=configs.CONTRASTIVE_SHARED_COLUMN_SCALE,
        FROM_LOGITS=logits is not None,
        **configs.dot_args(x.dtype),
        **t.launch(),
    )
    return out[0] if spans == 1 else launch_combine_lse(out)


def _logits_chunk_rows(n: int, block_m: int) -> int:
    """Rows of X per chunk of library-GEMM dot products: float32 (rows, n) within
    CONTRASTIVE_LOGITS_CHUNK_BYTES, a whole number of row blocks (one block at least)."""
    rows = configs.CONTRASTIVE_LOGITS_CHUNK_BYTES // (4 * max(n, 1))
    return max(block_m, rows // block_m * block_m)


def launch_lse(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, col_part: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 (M,): log-sum-exp over j of scale * x_i . y_j. With ``col_part`` (row blocks, N) float32,
    also each row block's log-sum-exp of every column. With ``configs.CONTRASTIVE_LIBRARY_LOGITS`` the dot
    products come from the library GEMM, a chunk of rows at a time, and the sweep reads them."""
    t = _lse_tiles(x)
    if not configs.CONTRASTIVE_LIBRARY_LOGITS:
        return _sweep(x, y, scale, col_part, None, t)
    m, n = x.shape[0], y.shape[0]
    chunk = _logits_chunk_rows(n, t.block_m)
    if m <= chunk:
        return _sweep(x, y, scale, col_part, product_f32(x, y.t(), exact=True), t)
    lse = torch.empty(m, dtype=torch.float32, device=x.device)
    for start in range(0, m, chunk):
        rows = x[start : start + chunk]
        part = None if col_part is None else col_part[start // t.block_m :]
        lse[start : start + chunk] = _sweep(rows, y, scale, part, product_f32(rows, y.t(), exact=True), t)
    return lse


def launch_two_way_lse(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column log-sum-exps: one sweep with per-block column partials when they fit in
    CONTRASTIVE_COL_PARTIAL_BYTES, else two sweeps."""
    blocks = configs.cdiv(x.shape[0], _lse_tiles(x).block_m)
    if blocks * y.shape[0] * 4 > configs.CONTRASTIVE_COL_PARTIAL_BYTES:
        return launch_lse(x, y, scale), launch_lse(y, x, scale)
    col_part = torch.empty((blocks, y.shape[0]), dtype=torch.float32, device=x.device)
    rows = launch_lse(x, y, scale, col_part)
    return rows, launch_combine_lse(col_part)


def _float32_per_index(length: int, device: torch.device, launch) -> torch.Tensor:
    """A float32 vector of ``length`` that ``launch(out)`` fills (not called when empty)."""
    out = torch.empty(length, dtype=torch.float32, device=device)
    if length:
        launch(out)
    return out


def launch_combine_lse(parts: torch.Tensor) -> torch.Tensor:
    """float32 (N,): ``torch.logsumexp(parts, dim=0)`` of contiguous float32 (P, N) partials, one kernel."""
    p, n = parts.shape
    t = configs.combine_lse_tiles()

    def launch(out: torch.Tensor) -> None:
        combine_lse_kernel[(configs.cdiv(n, t.block_n),)](
            parts, out, p, n, BLOCK_P=t.block_m, BLOCK_N=t.block_n, **t.launch()
        )

    return _float32_per_index(n, parts.device, launch)


def launch_row_dots(x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """float32 (M,): x_i . y_i, or x_i . y_{index[i]} with an index (int32 or int64, already in range)."""
    m, d = x.shape
    t = configs.row_dots_tiles()

    def launch(out: torch.Tensor) -> None:
        others = out if index is None else index  # not read without INDEXED
        row_dots_kernel[(configs.cdiv(m, t.block_m),)](
            x,
            y,
            others,
            out,
            m,
            d,
            BLOCK_M=t.block_m,
            BLOCK_D=t.block_n,
            INDEXED=index is not None,
            **t.launch(),
        )

    return _float32_per_index(m, x.device, launch)


def gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """Element type of the materialised gradient block G. bfloat16 keeps float32's exponent range; in
    float16 the entries (about 1 / M each) would fall below the normal range at large M, so G is float32
    there, as for float32 inputs."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


MIN_BLOCK_ROWS = 1024  # rows of X per block of G below which blocks stop spanning every column


def gradient_blocks(m: int, n: int, dtype: torch.dtype, block_m: int, block_n: int) -> tuple[int, int]:
    """(rows, columns) of each block of G within CONTRASTIVE_GRAD_CHUNK_BYTES: every column while that
    leaves MIN_BLOCK_ROWS rows (one pass over Y's gradient per row block), else square blocks, so that both
    products keep an inner dimension in the thousands. Multiples of the tile sizes."""
    budget = configs.CONTRASTIVE_GRAD_CHUNK_BYTES // dtype.itemsize
    cols = n
    if budget // max(n, 1) < min(MIN_BLOCK_ROWS, m):
        cols = min(n, max(block_n, math.isqrt(budget) // block_n * block_n))
    rows = max(block_m, (budget // cols) // block_m * block_m)
    return min(rows, m), cols


def _gradient_buffer(like: torch.Tensor, exact: bool) -> torch.Tensor:
    """Where one block's product is the whole gradient (``exact``), the gradient itself; else a float32
    running sum."""
    return (
        torch.empty_like(like) if exact else torch.zeros(like.shape, dtype=torch.float32, device=like.device)
    )


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, exact: bool) -> None:
    """out = a @ b (``exact``, written in place when the dtypes agree) or out += a @ b."""
    if not exact:
        out += a @ b
    elif out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


class LossTargets(NamedTuple):
    """What turns G from the gradient of the log-sum-exps into that of the InfoNCE loss: positive(i, j) <=>
    row_key[i] == col_key[j] (int32), each direction's share of a positive (float32, 1 / its positives;
    0 where it has none) and label smoothing with its uniform share (1 / the direction's width)."""

    row_key: torch.Tensor
    col_key: torch.Tensor
    row_share: torch.Tensor
    col_share: torch.Tensor
    smoothing: float
    row_uniform: float
    col_uniform: float


def launch_lse_backward(
    g_rows: torch.Tensor,
    g_cols: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    lse_rows: torch.Tensor,
    lse_cols: torch.Tensor,
    cols: bool,
    targets: LossTargets | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i g_rows[i] lse_rows[i] + sum_j g_cols[j] lse_cols[j] (the column term only when
    ``cols``) with respect to x, y and the scale, through blocks of G (see ``kernels.contrastive``). With
    ``targets``, of sum_i g_rows[i] (lse_rows[i] - sum_j q_ij l_ij) and its column twin instead: the whole
    InfoNCE loss, whose target terms then need no gradient of their own."""
    m, d = x.shape
    n = y.shape[0]
    tile_choice = configs.contrastive_grad_tiles if targets is None else configs.contrastive_loss_grad_tiles
    t = tile_choice(x.dtype)
    g_dtype = gradient_dtype(x.dtype)
    x_mm, y_mm = (x, y) if g_dtype == x.dtype else (x.to(g_dtype), y.to(g_dtype))
    row_step, col_step = gradient_blocks(m, n, g_dtype, t.block_m, t.block_n)
    x_exact, y_exact = col_step >= n, row_step >= m  # one block of G covers each gradient row
    grad_x, grad_y = _gradient_buffer(x, x_exact), _gradient_buffer(y, y_exact)
    grad_scale = torch.zeros((), dtype=torch.float32, device=x.device)
    g = torch.empty(row_step * col_step, dtype=g_dtype, device=x.device)
    tiles = configs.cdiv(row_step, t.block_m) * configs.cdiv(col_step, t.block_n)
    ds_part = torch.empty(tiles, dtype=torch.float32, device=x.device)
    y_stats = (lse_cols, g_cols) if cols else (lse_rows, g_rows)  # never read without HAS_Y
    if targets is None:  # never read without TARGETS
        target_args = (lse_rows, lse_rows, lse_rows, lse_rows, 0.0, 0.0, 0.0)
    else:
        target_args = tuple(targets)
    for row0 in range(0, m, row_step):
        row_span = slice(row0, min(row0 + row_step, m))
        for col0 in range(0, n, col_step):
            col_span = slice(col0, min(col0 + col_step, n))
            shape = (row_span.stop - row0, col_span.stop - col0)
            block = _leading(g, shape[0] * shape[1]).view(shape)
            grid = (configs.cdiv(shape[0], t.block_m), configs.cdiv(shape[1], t.block_n))
            contrastive_lse_grad_kernel[grid](
                x,
                y,
                scale,
                lse_rows,
                g_rows,
                *y_stats,
                block,
                ds_part,
                *target_args,
                row0,
                row_span.stop,
                col0,
                col_span.stop,
                d,
                BLOCK_M=t.block_m,
                BLOCK_N=t.block_n,
                BLOCK_K=t.block_k,
                HAS_Y=cols,
                TARGETS=targets is not None,
                **configs.dot_args(x.dtype),
                **t.launch(),
            )
            grad_scale += _leading(ds_part, grid[0] * grid[1]).sum()
            x_rows, y_rows = _rows(x_mm, row_span), _rows(y_mm, col_span)
            _add_product(_rows(grad_x, row_span), block, y_rows, x_exact)
            _add_product(_rows(grad_y, col_span), block.T, x_rows, y_exact)
    return _as_dtype(grad_x, x.dtype), _as_dtype(grad_y, y.dtype), grad_scale


def _leading(t: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` elements of a flat tensor (the tensor itself when that is all of it: no view)."""
    return t if t.shape[0] == count else t[:count]


def _rows(t: torch.Tensor, span: slice) -> torch.Tensor:
    """Rows ``span`` of t (t itself when the span covers every row: no view)."""
    return t if span.start == 0 and span.stop == t.shape[0] else t[span]


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def lse_forward(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, cols: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row log-sum-exps, column log-sum-exps or an empty tensor): the operator's forward."""
    if cols:
        return launch_two_way_lse(a, b, scale)
    return launch_lse(a, b, scale), a.new_empty((0,), dtype=torch.float32)


@torch.library.custom_op("famevil_fast::contrastive_lse", mutates_args=())
def contrastive_lse(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, cols: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_lse_args("famevil_fast::contrastive_lse", a, b, scale)
    return lse_forward(a.contiguous(), b.contiguous(), scale.contiguous(), cols)


def _check_lse_args(op: str, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
    """Shapes, dtypes and devices only (no read of values): a (M, D) and b (N, D) alike, a one-element
    scale (any shape: its gradient takes the same shape)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{op}: a and b must be (M, D) and (N, D), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{op}: a is {a.dtype} on {a.device} but b is {b.dtype} on {b.device}")
    if scale.numel() != 1 or scale.device != a.device:
        raise ValueError(
            f"{op}: scale must be a one-element tensor on {a.device}, got shape {tuple(scale.shape)} on "
            f"{scale.device}"
        )


@contrastive_lse.register_fake
def _(a, b, scale, cols):
    return a.new_empty((a.shape[0],), dtype=torch.float32), a.new_empty(
        (b.shape[0] if cols else 0,), dtype=torch.float32
    )


@torch.library.custom_op("famevil_fast::contrastive_lse_backward", mutates_args=())
def contrastive_lse_backward(
    g_rows: torch.Tensor,
    g_cols: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    lse_rows: torch.Tensor,
    lse_cols: torch.Tensor,
    cols: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_lse_args("famevil_fast::contrastive_lse_backward", a, b, scale)
    tensors = (g_rows, g_cols, a, b, scale, lse_rows, lse_cols)
    grad_a, grad_b, grad_scale = launch_lse_backward(*(t.contiguous() for t in tensors), cols)
    return grad_a, grad_b, grad_scale.reshape(scale.shape).to(scale.dtype)


@contrastive_lse_backward.register_fake
def _(g_rows, g_cols, a, b, scale, lse_rows, lse_cols, cols):
    return tuple(t.new_empty(t.shape) for t in (a, b, scale))


def _setup_context(ctx, inputs, output) -> None:
    a, b, scale, cols = inputs
    lse_rows, lse_cols = output
    ctx.save_for_backward(a, b, scale, lse_rows, lse_cols)
    ctx.cols = cols


def _backward_rule(ctx, grad_rows, grad_cols):
    a, b, scale, lse_rows, lse_cols = ctx.saved_tensors
    grads = contrastive_lse_backward(
        grad_rows.contiguous(), grad_cols.contiguous(), a, b, scale, lse_rows, lse_cols, ctx.cols
    )
    return (*grads, None)


contrastive_lse.register_autograd(_backward_rule, setup_context=_setup_context)


class ContrastiveLseFunction(torch.autograd.Function):
    """The eager-mode twin of ``famevil_fast::contrastive_lse``: the same launchers and gradient, without
    torch.library's dispatch (host time that a 4,096-row loss's kernels do not cover on a GPU).
    ``torch.compile`` graphs use the registered operator."""

    @staticmethod
    def forward(ctx, a, b, scale, cols):
        lse_rows, lse_cols = lse_forward(a, b, scale, cols)
        ctx.save_for_backward(a, b, scale, lse_rows, lse_cols)
        ctx.cols = cols
        return lse_rows, lse_cols

    @staticmethod
    def backward(ctx, grad_rows, grad_cols):
        a, b, scale, lse_rows, lse_cols = ctx.saved_tensors
        with torch.no_grad():
            grad_a, grad_b, grad_scale = launch_lse_backward(
                grad_rows.contiguous(), grad_cols.contiguous(), a, b, scale, lse_rows, lse_cols, ctx.cols
            )
        grads = (grad_a, grad_b, grad_scale.reshape(scale.shape).to(scale.dtype))
        depends = (grad_rows, grad_cols, a, b, scale)
        return *once_differentiable_grads("contrastive_loss", grads, depends), None


def contrastive_lse_eager(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, cols: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``famevil_fast::contrastive_lse`` outside torch.compile: the launchers alone under no_grad, else
    through ``ContrastiveLseFunction``."""
    if not torch.is_grad_enabled():
        return lse_forward(a, b, scale, cols)
    return ContrastiveLseFunction.apply(a, b, scale, cols)
