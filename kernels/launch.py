"""Host-side launchers: allocate outputs, choose tiles and launch the kernels in order.

Inputs arrive contiguous and checked (see ``famevil_fast.ops``). Parameters of task-grouped rows carry a
leading task dimension T; a single adapter's parameters may come with or without it (the kernels then
address task 0, so no view is made). Gradients come back in the parameters' own shapes. ``TaskRows``
describes how rows map to tasks.

Everything here runs on every call of a small op, where the host's time can exceed the kernels': tiles and
launch arguments come from caches, and no PyTorch op runs beside the kernels that a kernel can do instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from famevil_fast.kernels import configs
from famevil_fast.kernels.adapter_backward import adapter_bwd_dx_weights_kernel, adapter_dp_kernel
from famevil_fast.kernels.adapter_forward import (
    adapter_fwd_columns_kernel,
    adapter_fwd_fused_kernel,
    adapter_up_residual_kernel,
    scaled_down_weights_kernel,
)
from famevil_fast.kernels.decode_attention import decode_cross_attention_kernel, decode_self_attention_kernel
from famevil_fast.kernels.decode_greedy import greedy_pick_kernel
from famevil_fast.kernels.ln_linear import (
    ACTIVATIONS,
    ln_linear_dx_kernel,
    ln_linear_fwd_kernel,
    ln_linear_row_constants_kernel,
)
from famevil_fast.kernels.weight_grads import weight_grad_epilogue_kernel, weight_grad_partials_kernel

from famevil_fast.capture import capturing


class TaskRows(NamedTuple):
    """Row-to-task grouping: ``order`` (int32, rows stably sorted by task) and ``counts`` (int32, rows per
    task), or both None when every row uses task 0."""

    order: torch.Tensor | None
    counts: torch.Tensor | None
    n_tasks: int

    @property
    def mixed(self) -> bool:
        return self.order is not None

    def extra_blocks(self) -> int:
        """Row blocks beyond cdiv(N, BLOCK_M) that grouping by task can need (one partial block per task)."""
        return self.n_tasks if self.mixed else 0


SINGLE_TASK = TaskRows(None, None, 1)


def group_rows(task_ids: torch.Tensor | None, n_tasks: int) -> TaskRows:
    """Sort rows by task without a host synchronisation. ``task_ids`` must already be in [0, n_tasks)."""
    if task_ids is None:
        return SINGLE_TASK
    ids = task_ids.to(torch.int64)
    order = torch.argsort(ids, stable=True).to(torch.int32)
    counts = torch.zeros(n_tasks, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
    return TaskRows(order, counts, n_tasks)


_DEVICE_CONSTANTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def _device_constant(name: str, device: torch.device) -> torch.Tensor:
    """A one-element tensor the launchers pass on every call, one per (name, device): ``"unused index"`` (an
    int32 passed where the kernels take the task grouping but never read it) or ``"one"`` (a float32 1, the
    scale of a plain linear layer run through the up-projection kernel). Kept only when made outside graph
    capture (a tensor made during a capture belongs to its graph)."""
    key = (name, device)
    value = _DEVICE_CONSTANTS.get(key)
    if value is None:
        if name == "one":
            value = torch.ones(1, dtype=torch.float32, device=device)
        else:
            value = torch.empty(1, dtype=torch.int32, device=device)
        if not capturing():
            _DEVICE_CONSTANTS[key] = value
    return value


def _index_args(rows: TaskRows, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    if rows.mixed:
        return rows.order, rows.counts, rows.n_tasks
    dummy = _device_constant("unused index", like.device)
    return dummy, dummy, 1


def _row_blocks(n_rows: int, block_m: int, rows: TaskRows) -> int:
    return configs.cdiv(n_rows, block_m) + rows.extra_blocks()


def _residual_args(residuals: list[torch.Tensor], like: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    if len(residuals) > configs.MAX_RESIDUALS:
        keep = configs.MAX_RESIDUALS - 1
        rest = residuals[keep:]
        total = rest[0].float()
        for extra in rest[1:]:
            total = total + extra.float()
        residuals = list(residuals[:keep]) + [total.to(like.dtype)]
    count = len(residuals)
    return list(residuals) + [like] * (configs.MAX_RESIDUALS - count), count


def ln_linear_forward_into(
    x: torch.Tensor,
    lnw: torch.Tensor,
    lnb: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    out: torch.Tensor,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
    activation: str | None,
    eps: float,
    rows: TaskRows = SINGLE_TASK,
) -> None:
    """out[pos] = act(LN(x[order[pos]]) W^T + b) for W (T, n_out, d), ``activation`` a key of
    ``ln_linear.ACTIVATIONS``; statistics saved when given."""
    n_rows, d = x.shape
    n_out = w.shape[-2]
    tiles = configs.ln_linear_tiles(n_out, configs.has_few_rows(n_rows))
    order, counts, n_tasks = _index_args(rows, x)
    save = mean is not None
    grid = (_row_blocks(n_rows, tiles.block_m, rows) * configs.cdiv(n_out, tiles.block_n),)
    ln_linear_fwd_kernel[grid](
        x,
        out,
        mean if save else out,
        rstd if save else out,
        lnw,
        lnb,
        w,
        b,
        order,
        counts,
        n_tasks,
        n_rows,
        d,
        n_out,
        eps,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        ACT=ACTIVATIONS[activation],
        MIXED=rows.mixed,
        SAVE_STATS=save,
        **configs.dot_args(x.dtype),
        **tiles.launch(),
    )


def ln_linear_forward(
    x: torch.Tensor,
    lnw: torch.Tensor,
    lnb: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    save: bool,
    eps: float,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(act(LN(x) W^T + b), mean, rstd) for one LayerNorm + linear (parameters without a task dimension);
    the backward (``ln_linear_backward``) exists for ``activation=None``."""
    stats = x.shape[0] if save else 0
    mean = x.new_empty(stats, dtype=torch.float32)
    rstd = x.new_empty(stats, dtype=torch.float32)
    out = ln_linear_output(x, lnw, lnb, w, b, eps, activation, (mean, rstd) if save else None)
    return out, mean, rstd


def ln_linear_output(
    x: torch.Tensor,
    lnw: torch.Tensor,
    lnb: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    eps: float,
    activation: str | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """act(LN(x) W^T + b) of ``ln_linear_forward``, whose kernel also fills ``stats = (mean, rstd)`` when
    given; without it no statistics are kept or allocated."""
    n_rows = x.shape[0]
    out = x.new_empty(n_rows, w.shape[0])
    if n_rows:
        mean, rstd = stats if stats is not None else (None, None)
        ln_linear_forward_into(x, lnw, lnb, w, b, out, mean, rstd, activation=activation, eps=eps)
    return out


def adapter_forward(
    x: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    residuals: list[torch.Tensor],
    rows: TaskRows,
    save: bool,
    eps: float,
    linear: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    product_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, h, mean, rstd); h and the statistics are empty unless ``save``. ``linear = (a, W, b)`` adds the
    branch ``a W^T + b`` (a (N, k), W (d, k)) to y. ``product_dtype``: see ``adapter_output``.

    h is kept in float32 whatever the activation dtype: it is r elements a row, and the backward's row
    constant ``c2 = dp . (h - cb) / d`` and the up-projection's weight gradient lose accuracy to a rounded h.
    """
    stats = x.shape[0] if save else 0
    h = x.new_empty(stats, params[2].shape[-2], dtype=torch.float32)
    mean = x.new_empty(stats, dtype=torch.float32)
    rstd = x.new_empty(stats, dtype=torch.float32)
    y = adapter_output(
        x, params, residuals, rows, eps, linear, (h, mean, rstd) if save else None, product_dtype
    )
    return y, h, mean, rstd


def adapter_output(
    x: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    residuals: list[torch.Tensor],
    rows: TaskRows,
    eps: float,
    linear: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    product_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """y of ``adapter_forward``, whose kernels also fill ``saved = (h, mean, rstd)`` when given (N rows
    each); without it nothing is kept (evaluation, decoding), and only a bottleneck too wide to stay on chip
    (r > FUSED_MAX_R) still needs h, as scratch. ``product_dtype``: the dtype of the matrix products' operands
    where it is not x's (autocast's bf16 for a float32 x); the kernels still read and write x's dtype and
    keep LayerNorm and the accumulations in float32. The split path (r > FUSED_MAX_R) keeps x's dtype."""
    lnw, lnb, wd, bd, wu, bu, s = params
    n_rows, d = x.shape
    r = wd.shape[-2]
    y = torch.empty_like(x)
    if n_rows == 0:
        return y
    save = saved is not None
    h, mean, rstd = saved if save else (y, y, y)  # not written without SAVE
    columns = _spreads_columns(x, r, rows, linear is not None, product_dtype)
    if linear is not None and not columns:  # the branch as one more term
        a, w, b = linear
        residuals = [*residuals, torch.addmm(b, a, w.t())]
    res, num_res = _residual_args(residuals, x)
    fused_dot = _product_dot(x, r, product_dtype)
    if columns:
        _adapter_columns(x, y, (h, mean, rstd), save, params, res, num_res, linear, eps, fused_dot)
        return y
    order, counts, n_tasks = _index_args(rows, x)
    block_r = configs.padded(r)
    if r <= configs.FUSED_MAX_R:
        tiles = configs.adapter_fused_tiles(block_r, x.element_size(), configs.has_few_rows(n_rows))
        grid = (_row_blocks(n_rows, tiles.block_m, rows),)
        one_pass = _one_pass(x, product_dtype)
        ws, v, c = _scaled_down_weights(params, x.dtype, rows.n_tasks) if one_pass else (x, y, y)
        adapter_fwd_fused_kernel[grid](
            x,
            y,
            h,
            mean,
            rstd,
            lnw,
            lnb,
            wd,
            bd,
            wu,
            bu,
            s,
            *res,
            ws,
            v,
            c,
            order,
            counts,
            n_tasks,
            n_rows,
            d,
            r,
            eps,
            BLOCK_M=tiles.block_m,
            BLOCK_K=tiles.block_k,
            BLOCK_N=tiles.block_n,
            BLOCK_R=block_r,
            NUM_RES=num_res,
            MIXED=rows.mixed,
            SAVE=save,
            ONE_PASS=one_pass,
            **fused_dot,
            **tiles.launch(),
        )
        return y
    h_buf = h if save else x.new_empty(n_rows, r, dtype=torch.float32)
    ln_linear_forward_into(
        x,
        lnw,
        lnb,
        wd,
        bd,
        h_buf,
        mean if save else None,
        rstd if save else None,
        activation="relu",
        eps=eps,
        rows=rows,
    )
    _up_residual(h_buf, y, wu, bu, s, res, num_res, rows, configs.dot_args(x.dtype))
    return y


def _product_dot(x: torch.Tensor, r: int, product_dtype: torch.dtype | None) -> dict:
    """The fused kernels' ``DOT``/``PRECISION`` arguments: ``product_dtype``'s for a bottleneck kept on chip
    (r <= FUSED_MAX_R), else x's (the split path multiplies in x's dtype)."""
    return configs.dot_args((product_dtype if r <= configs.FUSED_MAX_R else None) or x.dtype)


def _one_pass(x: torch.Tensor, product_dtype: torch.dtype | None) -> bool:
    """Whether the fused forward takes the one-pass LayerNorm: ``configs.one_pass_layer_norm``, and not with
    products in another dtype than x's (the one-pass form multiplies x itself, before normalising)."""
    return configs.one_pass_layer_norm(x.dtype) and product_dtype in (None, x.dtype)


def _spreads_columns(
    x: torch.Tensor, r: int, rows: TaskRows, linear: bool, product_dtype: torch.dtype | None = None
) -> bool:
    """Whether ``adapter_forward`` runs ``adapter_fwd_columns_kernel``: one task, h on chip, the switch
    ``configs.ADAPTER_FEW_ROWS_COLUMNS`` on, and few rows (where the one-pass LayerNorm, a form of the fused
    kernel, is not asked for) or a linear branch to add."""
    if r > configs.FUSED_MAX_R or rows.mixed or not configs.ADAPTER_FEW_ROWS_COLUMNS:
        return False
    return linear or (configs.has_few_rows(x.shape[0]) and not _one_pass(x, product_dtype))


def _adapter_columns(
    x: torch.Tensor,
    y: torch.Tensor,
    saved: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    save: bool,
    params: tuple[torch.Tensor, ...],
    res: list[torch.Tensor],
    num_res: int,
    linear: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    eps: float,
    dot: dict,
) -> None:
    """``adapter_fwd_columns_kernel``: one task's adapter with the columns of y spread over programs (and
    the linear branch, if any); with ``save`` h and the statistics stored into ``saved = (h, mean, rstd)``
    (placeholders otherwise); ``dot`` the products' launch arguments (``configs.dot_args``)."""
    lnw, lnb, wd, bd, wu, bu, s = params
    n_rows, d = x.shape
    r = wd.shape[-2]
    block_r = configs.padded(r)
    tiles = configs.adapter_columns_tiles(block_r, configs.has_few_rows(n_rows))
    a, w, b = linear if linear is not None else (x, x, x)
    grid = (configs.cdiv(n_rows, tiles.block_m) * configs.cdiv(d, tiles.block_n),)
    adapter_fwd_columns_kernel[grid](
        x,
        y,
        *saved,
        lnw,
        lnb,
        wd,
        bd,
        wu,
        bu,
        s,
        *res,
        a,
        w,
        b,
        n_rows,
        d,
        r,
        a.shape[1],
        eps,
        BLOCK_M=tiles.block_m,
        BLOCK_K=tiles.block_k,
        BLOCK_N=tiles.block_n,
        BLOCK_R=block_r,
        NUM_RES=num_res,
        LINEAR=linear is not None,
        SAVE=save,
        **dot,
        **tiles.launch(),
    )


def _scaled_down_weights(
    params: tuple[torch.Tensor, ...], dtype: torch.dtype, n_tasks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(W' = Wd diag(g) in ``dtype``, its row sums v and c = bd + Wd beta in float32), each per task, for the
    one-pass LayerNorm of ``adapter_fwd_fused_kernel``."""
    lnw, lnb, wd, bd = params[:4]
    r, d = wd.shape[-2:]
    ws = torch.empty((n_tasks, r, d), dtype=dtype, device=wd.device)
    v = torch.empty((n_tasks, r), dtype=torch.float32, device=wd.device)
    c = torch.empty_like(v)
    tiles = configs.row_constants_tiles()
    scaled_down_weights_kernel[(configs.cdiv(r, tiles.block_m), n_tasks)](
        lnw, lnb, wd, bd, ws, v, c, d, r, BLOCK_R=tiles.block_m, BLOCK_K=tiles.block_k, **tiles.launch()
    )
    return ws, v, c


def _up_residual(
    h: torch.Tensor,
    y: torch.Tensor,
    wu: torch.Tensor,
    bu: torch.Tensor,
    s: torch.Tensor,
    res: list[torch.Tensor],
    num_res: int,
    rows: TaskRows,
    dot: dict,
) -> None:
    """y = s * (h Wu^T + bu) + residuals, h (N x r) at sorted positions, y (N x d)."""
    n_rows, r = h.shape
    d = y.shape[-1]
    order, counts, n_tasks = _index_args(rows, y)
    tiles = configs.up_residual_tiles(configs.has_few_rows(n_rows))
    grid = (_row_blocks(n_rows, tiles.block_m, rows) * configs.cdiv(d, tiles.block_n),)
    adapter_up_residual_kernel[grid](
        h,
        y,
        wu,
        bu,
        s,
        *res,
        order,
        counts,
        n_tasks,
        n_rows,
        d,
        r,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        NUM_RES=num_res,
        MIXED=rows.mixed,
        **dot,
        **tiles.launch(),
    )


def linear_residual(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, residual: torch.Tensor
) -> torch.Tensor:
    """``residual + x W^T + b`` for x (N, k), W (d, k), residual (N, d): one pass that adds the residual
    stream in the product's epilogue (the up-projection kernel with scale 1). No autograd."""
    y = torch.empty_like(residual)
    if x.shape[0]:
        res, num_res = _residual_args([residual], residual)
        _up_residual(
            x,
            y,
            w,
            b,
            _device_constant("one", x.device),
            res,
            num_res,
            SINGLE_TASK,
            configs.dot_args(x.dtype),
        )
    return y


def decode_self_attention(qkv: torch.Tensor, cache: torch.Tensor, position: int, heads: int) -> torch.Tensor:
    """(B, width) attention output of one new token per sequence; writes its key and value at ``position``
    of ``cache`` (B, 2, H, T, Dh). qkv: (B, 3 * width), contiguous. No autograd."""
    batch, width = qkv.shape[0], qkv.shape[1] // 3
    out = qkv.new_empty((batch, width))
    if batch:
        head_dim = width // heads
        tiles = configs.decode_attention_tiles(head_dim)
        decode_self_attention_kernel[(batch, heads)](
            qkv,
            cache,
            out,
            position,
            heads,
            width,
            cache.shape[3],
            head_dim**-0.5,
            BLOCK_T=tiles.block_m,
            BLOCK_D=tiles.block_n,
            **tiles.launch(),
        )
    return out


def decode_cross_attention(
    x: torch.Tensor,
    rows_per_batch: int,
    lnw: torch.Tensor,
    lnb: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """(N, width) attention of ``LN(x) W_q^T + b_q`` (x (N, width), contiguous) over keys and values
    (B, H, Lc, Dh) with unit stride along Dh; row i belongs to batch i // rows_per_batch. No autograd."""
    n_rows, width = x.shape
    heads, head_dim = keys.shape[1], keys.shape[3]
    out = torch.empty_like(x)
    if n_rows:
        tiles = configs.decode_cross_attention_tiles(head_dim)
        decode_cross_attention_kernel[(n_rows, heads)](
            x,
            lnw,
            lnb,
            wq,
            bq,
            keys,
            values,
            out,
            rows_per_batch,
            width,
            heads,
            keys.shape[2],
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            values.stride(0),
            values.stride(1),
            values.stride(2),
            eps,
            head_dim**-0.5,
            BLOCK_K=tiles.block_k,
            BLOCK_T=tiles.block_m,
            BLOCK_D=tiles.block_n,
            **tiles.launch(),
        )
    return out


def greedy_pick(
    logits: torch.Tensor,
    shortlist: torch.Tensor | None,
    tokens: torch.Tensor,
    done: torch.Tensor,
    column: int,
    end_token: int,
    embedding: tuple[torch.Tensor, torch.Tensor, int] | None,
) -> torch.Tensor | None:
    """Writes each row's greedy token at ``column`` of ``tokens`` (B, W) and updates ``done`` (B,); with
    ``embedding = (token_embed (V, width), pos_embed (T, width), position)`` returns the next step's input
    (B, width). All contiguous. No autograd."""
    batch, n_logits = logits.shape
    token_embed, pos_embed, position = embedding if embedding is not None else (logits, logits, 0)
    width = token_embed.shape[1] if embedding is not None else 1  # no embedding: one tile shape for any V
    embedded = token_embed.new_empty((batch, width)) if embedding is not None else None
    if batch == 0:
        return embedded
    tiles = configs.greedy_pick_tiles(width)
    greedy_pick_kernel[(batch,)](
        logits,
        tokens if shortlist is None else shortlist,
        tokens,
        done,
        token_embed,
        pos_embed,
        logits if embedded is None else embedded,
        n_logits,
        column,
        tokens.shape[1],
        width,
        position,
        end_token,
        BLOCK_V=tiles.block_m,
        BLOCK_W=tiles.block_n,
        SHORTLIST=shortlist is not None,
        EMBED=embedding is not None,
        **tiles.launch(),
    )
    return embedded


def _row_constant_buffers(n_tasks: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Uninitialised fp32 (n_tasks, n_out) buffers for v1 = W g and cb = b + W beta."""
    v1 = torch.empty(n_tasks, n_out, dtype=torch.float32, device=device)
    return v1, torch.empty_like(v1)


def _row_constants(w: torch.Tensor, lnw: torch.Tensor, lnb: torch.Tensor, b: torch.Tensor, n_tasks: int):
    """v1 = W g and cb = b + W beta (n_tasks, n_out) in fp32, for the LayerNorm backward's row constants."""
    d = lnw.shape[-1]
    n_out = w.shape[-2]
    v1, cb = _row_constant_buffers(n_tasks, n_out, w.device)
    tiles = configs.row_constants_tiles()
    ln_linear_row_constants_kernel[(configs.cdiv(n_out, tiles.block_m), n_tasks)](
        lnw, lnb, w, b, v1, cb, d, n_out, BLOCK_R=tiles.block_m, BLOCK_K=tiles.block_k, **tiles.launch()
    )
    return v1, cb


def _ln_linear_dx(
    dp, p, x, mean, rstd, lnw, w, v1, cb, rows: TaskRows, xhat: torch.Tensor | None = None
) -> torch.Tensor:
    """dx of LN -> linear from dp; with ``xhat`` (N x d, x's dtype) also stores the normalised rows there."""
    n_rows, d = x.shape
    n_out = w.shape[-2]
    dx = torch.empty_like(x)
    tiles = configs.dx_tiles(n_out)
    order, counts, n_tasks = _index_args(rows, x)
    grid = (_row_blocks(n_rows, tiles.block_m, rows) * configs.cdiv(d, tiles.block_n),)
    ln_linear_dx_kernel[grid](
        dp,
        p,
        x,
        mean,
        rstd,
        lnw,
        w,
        v1,
        cb,
        dx,
        dx if xhat is None else xhat,
        order,
        counts,
        n_tasks,
        n_rows,
        d,
        n_out,
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        MIXED=rows.mixed,
        SAVE_XHAT=xhat is not None,
        **configs.dot_args(x.dtype),
        **tiles.launch(),
    )
    return dx


class Partials(NamedTuple):
    """fp32 weight-gradient partials per (task, segment), contiguous: M and G are [segment, d, n_out], csp
    [segment, n_out], cs [segment, d] (G and cs only for the adapter; a single segment may come without its
    axis)."""

    m: torch.Tensor
    csp: torch.Tensor
    g: torch.Tensor
    cs: torch.Tensor
    segments: int


def _partials(n_seg: int, segments: int, d: int, n_out: int, has_g: bool, device: torch.device) -> Partials:
    f32 = torch.float32
    m = torch.empty(n_seg, d, n_out, dtype=f32, device=device)
    csp = torch.empty(n_seg, n_out, dtype=f32, device=device)
    g = torch.empty(n_seg, d, n_out, dtype=f32, device=device) if has_g else m
    cs = torch.empty(n_seg, d, dtype=f32, device=device) if has_g else csp
    return Partials(m, csp, g, cs, segments)


def _weight_epilogue(
    parts: Partials,
    n_tasks: int,
    lnw: torch.Tensor,
    lnb: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    up: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> tuple[torch.Tensor, ...]:
    """(dlnw, dlnb, dW, db) and, with ``up = (Wu, bu, s)``, also (dWu, dbu, ds), from the partials."""
    d = lnw.shape[-1]
    n_out = w.shape[-2]
    has_g = up is not None
    wu, bu, s = up if has_g else (w, b, b)
    ep = configs.epilogue_tiles(n_out)
    n_ep = configs.cdiv(d, ep.block_n)
    dlnw, dlnb, dw, db = map(torch.empty_like, (lnw, lnb, w, b))
    dwu, dbu = (torch.empty_like(wu), torch.empty_like(bu)) if has_g else (dw, db)
    ds_part = torch.empty(n_tasks, n_ep, dtype=torch.float32, device=lnw.device)
    weight_grad_epilogue_kernel[(n_ep, n_tasks)](
        parts.m,
        parts.csp,
        parts.g,
        parts.cs,
        lnw,
        lnb,
        w,
        wu,
        bu,
        s,
        dlnw,
        dlnb,
        dw,
        db,
        dwu,
        dbu,
        ds_part,
        d,
        n_out,
        parts.segments,
        BLOCK_D=ep.block_n,
        BLOCK_R=ep.block_k,
        HAS_G=has_g,
        **ep.launch(),
    )
    if not has_g:
        return dlnw, dlnb, dw, db
    return dlnw, dlnb, dw, db, dwu, dbu, _scale_grad(ds_part, s)


def _scale_grad(ds_part: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The scale's gradient from its per-d-tile partials (n_tasks, tiles): summed, in s's dtype and shape
    ((1,) or (T, 1)); the conversion and the reshape only where they change something."""
    ds = ds_part.sum(dim=1, keepdim=s.dim() == 2)
    if ds.dtype != s.dtype:
        ds = ds.to(s.dtype)
    return ds if ds.shape == s.shape else ds.view(s.shape)


MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch.mm(a, b, out_dtype=...), torch >= 2.8


def product_f32(a: torch.Tensor, b: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """a @ b with a float32 result and float32 accumulation, for operands of one dtype. On a GPU 16-bit
    operands go through the library GEMM with a float32 output (``torch.mm``'s ``out_dtype``; an older
    torch rounds the product to the operands' dtype first, or with ``exact`` widens the operands instead);
    the CPU only runs this under the interpreter, where 16-bit operands are widened first."""
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    if a.is_cuda and not exact:
        return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


def _product_partials(
    xhat: torch.Tensor, dp: torch.Tensor, dy_h: tuple[torch.Tensor, torch.Tensor] | None
) -> Partials:
    """The partials of ``weight_grads`` for rows of one task, as one segment: M = xhat^T dp and
    G = dy^T h by library GEMMs (each a d x r product reduced over all N rows), and the column sums;
    without the segment axis (the same contiguous layout, read only by the epilogue kernel)."""
    m = product_f32(xhat.t(), dp)
    csp = dp.sum(0, dtype=torch.float32)
    if dy_h is None:
        return Partials(m, csp, m, csp, 1)
    dy, h = dy_h
    g = product_f32(dy.t(), h)
    return Partials(m, csp, g, dy.sum(0, dtype=torch.float32), 1)


def weight_grads(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dp: torch.Tensor,
    lnw: torch.Tensor,
    lnb: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
    rows: TaskRows,
    up: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    xhat: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dlnw, dlnb, dW, db) and, with ``up = (dy, h, Wu, bu, s)``, also (dWu, dbu, ds).

    With ``xhat`` (rows of one task; the normalised x, stored by the dx kernel in x's dtype, and h in that
    dtype too) the two d x r products are library GEMMs: r > 128 makes them the bulk of the backward's
    arithmetic, where a tuned GEMM beats the row-segment reduction of ``weight_grad_partials_kernel``
    (which serves task-grouped rows, whose weights differ per task)."""
    has_g = up is not None
    if xhat is not None:
        parts = _product_partials(xhat, dp, up[:2] if has_g else None)
        return _weight_epilogue(parts, 1, lnw, lnb, w, b, up[2:] if has_g else None)
    n_rows, d = x.shape
    n_out = w.shape[-2]
    tiles = configs.weight_tiles(n_out)
    n_dtiles = configs.cdiv(d, tiles.block_n)
    n_rtiles = configs.cdiv(n_out, tiles.block_k)
    segments = configs.reduction_segments(n_rows, rows.n_tasks, n_dtiles * n_rtiles, tiles.block_m, x.device)
    parts = _partials(rows.n_tasks * segments, segments, d, n_out, has_g, x.device)
    dy, h = up[:2] if has_g else (x, dp)
    order, counts, _ = _index_args(rows, x)
    weight_grad_partials_kernel[(n_dtiles * n_rtiles, rows.n_tasks * segments)](
        x,
        mean,
        rstd,
        dp,
        dy,
        h,
        parts.m,
        parts.csp,
        parts.g,
        parts.cs,
        order,
        counts,
        n_rows,
        d,
        n_out,
        segments,
        n_rtiles,
        BLOCK_M=tiles.block_m,
        BLOCK_D=tiles.block_n,
        BLOCK_R=tiles.block_k,
        HAS_G=has_g,
        MIXED=rows.mixed,
        **configs.dot_args(x.dtype),
        **tiles.launch(),
    )
    return _weight_epilogue(parts, rows.n_tasks, lnw, lnb, w, b, up[2:] if has_g else None)


def rounds_h_for_products(x: torch.Tensor) -> bool:
    """Whether the split adapter's backward hands the up projection's weight-gradient product a copy of h
    in the activation dtype (written by the dp kernel) rather than the saved float32 h: on a GPU for 16-bit
    activations, where the GEMM takes two operands of one 16-bit type. The interpreter multiplies 16-bit
    tiles in float32 (``configs.dot_dtype``), and the CPU products do likewise with the float32 h."""
    return x.is_cuda and x.dtype != torch.float32


def adapter_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    h: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    rows: TaskRows,
    product_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, ...]:
    """(dx, dlnw, dlnb, dWd, dbd, dWu, dbu, ds), each in its parameter's shape; ``product_dtype`` as in
    ``adapter_output`` (the forward's)."""
    lnw, lnb, wd, bd, wu, bu, s = params
    n_rows, d = x.shape
    r = wd.shape[-2]
    if n_rows == 0:
        return (torch.empty_like(x), *(torch.zeros_like(p) for p in params))
    order, counts, n_tasks = _index_args(rows, x)
    dot = _product_dot(x, r, product_dtype)
    dp = x.new_empty(n_rows, r)
    # r > 128, one task: the weight gradients are library GEMMs over xhat and h
    products = r > configs.FUSED_MAX_R and not rows.mixed
    save_h = products and rounds_h_for_products(x)
    h_low = x.new_empty(n_rows, r) if save_h else h
    v1, cb = _row_constant_buffers(n_tasks, r, x.device)  # filled by the dp kernel's extra programs
    tiles = configs.dp_tiles(r)
    row_blocks = _row_blocks(n_rows, tiles.block_m, rows)
    grid = ((row_blocks + n_tasks) * configs.cdiv(r, tiles.block_n),)  # + a row-constants program a task
    adapter_dp_kernel[grid](
        dy,
        h,
        wu,
        s,
        dp,
        h_low,
        lnw,
        lnb,
        wd,
        bd,
        v1,
        cb,
        order,
        counts,
        n_tasks,
        n_rows,
        row_blocks,
        d,
        r,
        BLOCK_M=tiles.block_m,
        BLOCK_R=tiles.block_n,
        BLOCK_N=tiles.block_k,
        MIXED=rows.mixed,
        SAVE_H=save_h,
        **dot,
        **tiles.launch(),
    )
    if r > configs.FUSED_MAX_R:
        xhat = torch.empty_like(x) if products else None
        dx = _ln_linear_dx(dp, h, x, mean, rstd, lnw, wd, v1, cb, rows, xhat)
        grads = weight_grads(x, mean, rstd, dp, lnw, lnb, wd, bd, rows, up=(dy, h_low, wu, bu, s), xhat=xhat)
        return (dx, *grads)
    block_r = configs.padded(r)
    tiles = configs.dx_weight_tiles(block_r)
    n_dtiles = configs.cdiv(d, tiles.block_n)
    segments = configs.reduction_segments(n_rows, n_tasks, n_dtiles, tiles.block_m, x.device)
    parts = _partials(n_tasks * segments, segments, d, r, True, x.device)
    dx = torch.empty_like(x)
    adapter_bwd_dx_weights_kernel[(n_dtiles, n_tasks * segments)](
        dy,
        x,
        h,
        dp,
        mean,
        rstd,
        lnw,
        wd,
        v1,
        cb,
        dx,
        parts.m,
        parts.csp,
        parts.g,
        parts.cs,
        order,
        counts,
        n_rows,
        d,
        r,
        segments,
        BLOCK_M=tiles.block_m,
        BLOCK_D=tiles.block_n,
        BLOCK_R=block_r,
        MIXED=rows.mixed,
        **dot,
        **tiles.launch(),
    )
    return (dx, *_weight_epilogue(parts, n_tasks, lnw, lnb, wd, bd, (wu, bu, s)))


def ln_linear_backward(
    dp: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    lnw: torch.Tensor,
    lnb: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """(dx, dlnw, dlnb, dW, db) of ``p = LN(x) W^T + b`` (parameters without a task dimension)."""
    if x.shape[0] == 0:
        return (torch.empty_like(x), *(torch.zeros_like(t) for t in (lnw, lnb, w, b)))
    v1, cb = _row_constants(w, lnw, lnb, b, 1)
    xhat = torch.empty_like(x)
    dx = _ln_linear_dx(dp, p, x, mean, rstd, lnw, w, v1, cb, SINGLE_TASK, xhat)
    return (dx, *weight_grads(x, mean, rstd, dp, lnw, lnb, w, b, SINGLE_TASK, xhat=xhat))
