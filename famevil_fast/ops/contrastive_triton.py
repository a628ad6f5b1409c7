"""The Triton path of ``contrastive_loss``: log-sum-exp statistics from the kernels, the rest in PyTorch.

Row i's InfoNCE loss is ``lse_i - (1 - eps) * mean of its positive logits - eps / N * sum of its logits``
(and likewise per column). Only the log-sum-exp needs the whole M x N matrix; it comes from the
``famevil_fast::contrastive_lse`` operator (``famevil_fast.kernels.contrastive_ops``), which never stores
the matrix. The positive and plain sums are linear in the features:

* positives: ``sum_{j positive for i} s a_i . b_j = s a_i . (sum of b over row i's positive group)``,
  with the group sums from ``index_add`` (the diagonal and single labels are special cases);
* plain sums: ``s a_i . sum_j b_j``.

Both cost O((M + N) D). In the eager path their dot products come from one kernel each, which reads the
features in their own dtype and sums in float32; the group sums are float32. In eager mode the loss is one
autograd node (``InfoNceFunction``): their gradients come out of the kernels' gradient tiles, which
subtract each direction's target distribution from its softmax. Inside ``torch.compile`` the
log-sum-exps are an opaque operator and the linear terms take their gradients through autograd; so they
do while ``torch.utils.flop_counter.FlopCounterMode`` counts, which then sees the operators and their FLOP
formulas (here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from famevil_fast.ops._backend import counting_flops, matmul_flops, once_differentiable_grads
from famevil_fast.ops.contrastive import Groups, _as_scale, direction_loss, positive_keys

GROUP_SUM_CHUNK_ROWS = 16384  # rows of a 16-bit input converted to float32 at a time for its group sums


def _group_sums(x: torch.Tensor, keys: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(n_keys, D) float32: the sum of the rows of x sharing each key (differentiable). A 16-bit x is
    converted at most GROUP_SUM_CHUNK_ROWS rows at a time: no float32 copy of the whole input."""
    out = torch.zeros((n_keys, x.shape[1]), dtype=torch.float32, device=x.device)
    keys = keys.long()
    step = x.shape[0] if x.dtype == torch.float32 else GROUP_SUM_CHUNK_ROWS
    for start in range(0, x.shape[0], step):
        out.index_add_(0, keys[start : start + step], x[start : start + step].float())
    return out


def _positive_dots(
    a: torch.Tensor,
    b: torch.Tensor,
    labels: torch.Tensor | None,
    groups: Groups | None,
    row_key: torch.Tensor,
    col_key: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the sum of a_i . b_j over its positive columns; per column, over its positive rows."""
    if labels is None and groups is None:
        diagonal = (a * b).sum(dim=1)
        return diagonal, diagonal
    if groups is None:
        rows = (a * b[labels]).sum(dim=1)
        cols = (b * _group_sums(a, labels, b.shape[0])).sum(dim=1)
        return rows, cols
    n_keys = a.shape[0] + b.shape[0]  # positive_keys numbers the groups below M + N
    rows = (a * _group_sums(b, col_key, n_keys)[row_key.long()]).sum(dim=1)
    cols = (b * _group_sums(a, row_key, n_keys)[col_key.long()]).sum(dim=1)
    return rows, cols


def contrastive_lse_flops(
    a_shape: Sequence[int], b_shape: Sequence[int], *args: object, out_shape: object = None, **kwargs: object
) -> int:
    """FLOPs of ``famevil_fast::contrastive_lse`` (a (M, D), b (N, D)): the logits a @ b.T, once whether or
    not the column statistics come too, as FlopCounterMode counts the reference's product."""
    return matmul_flops(a_shape[0], a_shape[1], b_shape[0])


def contrastive_lse_backward_flops(
    g_rows_shape: Sequence[int],
    g_cols_shape: Sequence[int],
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *args: object,
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """FLOPs of ``famevil_fast::contrastive_lse_backward``: the gradients of a and b, G @ b and G^T @ a (the
    operator computes both; its recomputation of the logits inside the gradient tiles is not model work
    and is not counted)."""
    return 2 * matmul_flops(a_shape[0], a_shape[1], b_shape[0])


# Registered on first use of the kernels (``counting_flops``): the operators exist once
# famevil_fast.kernels.contrastive_ops is imported, which the Triton path does lazily.
LSE_FLOP_FORMULAS = {
    "contrastive_lse": contrastive_lse_flops,
    "contrastive_lse_backward": contrastive_lse_backward_flops,
}


# Eager calls run as one autograd node with the target terms inside the gradient tiles (InfoNceFunction);
# False composes the loss from the log-sum-exp node and autograd over the linear terms, as torch.compile
# graphs do (bench/bench_contrastive.py times both).
TARGETS_IN_KERNEL = True


def triton_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float | torch.Tensor,
    labels: torch.Tensor | None,
    groups: Groups | None,
    two_way: bool,
    eps: float,
) -> torch.Tensor:
    """``contrastive_loss`` with checked arguments (float16, bfloat16 or float32 inputs)."""
    from famevil_fast.kernels import contrastive_ops  # registers the operators

    m, n = a.shape[0], b.shape[0]
    s = _as_scale(scale, a)
    a, b = a.contiguous(), b.contiguous()
    row_key, col_key, row_counts, col_counts = positive_keys(m, n, labels, groups, a.device)
    keys = (row_key, col_key, row_counts, col_counts)
    # the log-sum-exps as an opaque operator of a compiled graph; or as the operator (and its backward) a
    # FLOP counter sees, the linear terms through autograd (products of vectors, which it does not count)
    if torch.compiler.is_compiling() or counting_flops(LSE_FLOP_FORMULAS):
        lse_rows, lse_cols = torch.ops.famevil_fast.contrastive_lse(a, b, s, two_way)
    elif TARGETS_IN_KERNEL:  # one autograd node, the target terms inside the kernels' G
        return InfoNceFunction.apply(a, b, s, labels, groups, keys, two_way, eps)
    else:  # the same launchers without torch.library's dispatch
        lse_rows, lse_cols = contrastive_ops.contrastive_lse_eager(a, b, s, two_way)
    return _loss_from_statistics(a, b, s, lse_rows, lse_cols, labels, groups, keys, two_way, eps)


def _loss_from_statistics(
    a, b, s, lse_rows, lse_cols, labels, groups, keys, two_way: bool, eps: float, differentiable: bool = True
):
    """The mean loss from the log-sum-exps and the linear terms (positive and plain sums of logits). Without
    ``differentiable`` the positive dots come from ``row_dots_kernel``, without float32 copies."""
    row_key, col_key, row_counts, col_counts = keys
    m, n = a.shape[0], b.shape[0]
    if differentiable:
        pos_rows, pos_cols = _positive_dots(a.float(), b.float(), labels, groups, row_key, col_key)
        plain_sums = _plain_sums
    else:
        pos_rows, pos_cols = _positive_dots_in_kernels(a, b, labels, groups, row_key, col_key)
        plain_sums = _plain_sums_in_kernels
    plain_rows = s * plain_sums(a, b) if eps else None
    loss = direction_loss(lse_rows, s * pos_rows, plain_rows, row_counts, eps, n)
    if not two_way:
        return loss
    plain_cols = s * plain_sums(b, a) if eps else None
    return 0.5 * (loss + direction_loss(lse_cols, s * pos_cols, plain_cols, col_counts, eps, m))


def _plain_sums(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """float32 (rows of x,): x_i . sum_j other_j, differentiable."""
    return x.float() @ other.sum(dim=0, dtype=torch.float32)


def _plain_sums_in_kernels(x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``_plain_sums`` (no autograd) from ``row_dots_kernel``, x read in its own dtype."""
    from famevil_fast.kernels import contrastive_ops

    total = other.sum(dim=0, dtype=torch.float32)[None]
    every_row_to_it = torch.zeros(x.shape[0], dtype=torch.int32, device=x.device)
    return contrastive_ops.launch_row_dots(x, total, every_row_to_it)


def _positive_dots_in_kernels(a, b, labels, groups, row_key, col_key) -> tuple[torch.Tensor, torch.Tensor]:
    """``_positive_dots`` (no autograd) with the per-row dot products in one kernel each, read in the
    inputs' dtype: the diagonal needs one pass; labels one more over the label groups' float32 sums; groups
    one per side over the other side's group sums."""
    from famevil_fast.kernels import contrastive_ops

    row_dots = contrastive_ops.launch_row_dots
    if groups is not None:
        n_keys = a.shape[0] + b.shape[0]  # positive_keys numbers the groups below M + N
        rows = row_dots(a, _group_sums(b, col_key, n_keys), row_key)
        return rows, row_dots(b, _group_sums(a, row_key, n_keys), col_key)
    if labels is None:
        diagonal = row_dots(a, b)
        return diagonal, diagonal
    rows = row_dots(a, b, row_key)  # row_key holds the labels
    return rows, row_dots(b, _group_sums(a, labels, b.shape[0]))


def _row_weights(counts: torch.Tensor | None, rows: int, like: torch.Tensor, half: bool) -> torch.Tensor:
    """d loss / d (row loss): the mean over the rows that have a positive, halved for a two-way loss."""
    factor = 0.5 if half else 1.0
    if counts is None:
        return torch.full((rows,), factor / rows, dtype=torch.float32, device=like.device)
    keep = (counts > 0).float()
    return keep * (factor / keep.sum())


def _shares(counts: torch.Tensor | None, rows: int, like: torch.Tensor) -> torch.Tensor:
    """Each row's share of one positive: 1 / its positives (1 for one positive each; 0 without any)."""
    if counts is None:
        return torch.ones(rows, dtype=torch.float32, device=like.device)
    return torch.where(counts > 0, 1.0 / counts.clamp_min(1).float(), 0.0)


class InfoNceFunction(torch.autograd.Function):
    """The whole Triton InfoNCE loss as one autograd node. Forward: the log-sum-exp sweep, then the linear
    terms without autograd. Backward: the gradient tiles of ``kernels.contrastive`` with the target terms
    (positives, label smoothing) subtracted inside them (TARGETS), so G is d loss / d logits and the two
    products with the features give every gradient, the scale's included: no float32 copies of the
    features and no elementwise chain of the linear terms."""

    @staticmethod
    def forward(ctx, a, b, s, labels, groups, keys, two_way, eps):
        from famevil_fast.kernels import contrastive_ops

        lse_rows, lse_cols = contrastive_ops.lse_forward(a, b, s, two_way)
        loss = _loss_from_statistics(a, b, s, lse_rows, lse_cols, labels, groups, keys, two_way, eps, False)
        ctx.save_for_backward(a, b, s, lse_rows, lse_cols, *keys[:2])
        ctx.counts, ctx.two_way, ctx.eps = keys[2:], two_way, eps
        return loss

    @staticmethod
    def backward(ctx, grad):
        with torch.no_grad():
            grad_a, grad_b, grad_s = InfoNceFunction._grads(ctx, grad)
        depends = (grad, *ctx.saved_tensors[:3])
        grads = once_differentiable_grads("contrastive_loss", (grad_a, grad_b, grad_s), depends)
        return *grads, None, None, None, None, None

    @staticmethod
    def _grads(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from famevil_fast.kernels import contrastive_ops

        a, b, s, lse_rows, lse_cols, row_key, col_key = ctx.saved_tensors
        (m, n), (row_counts, col_counts) = (a.shape[0], b.shape[0]), ctx.counts
        g_rows = grad.float() * _row_weights(row_counts, m, a, ctx.two_way)
        row_share = _shares(row_counts, m, a)
        g_cols, col_share = g_rows, row_share  # the column side is not read by a one-way loss's kernels
        if ctx.two_way:
            g_cols, col_share = grad.float() * _row_weights(col_counts, n, a, True), _shares(col_counts, n, a)
        targets = contrastive_ops.LossTargets(
            row_key, col_key, row_share, col_share, ctx.eps, 1.0 / n, 1.0 / m
        )
        grad_a, grad_b, grad_s = contrastive_ops.launch_lse_backward(
            g_rows, g_cols, a, b, s, lse_rows, lse_cols, ctx.two_way, targets
        )
        return grad_a, grad_b, grad_s.view(s.shape)
