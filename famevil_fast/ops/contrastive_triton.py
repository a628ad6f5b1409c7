"""The Triton path of ``contrastive_loss``: log-sum-exp statistics from the kernels, the rest in PyTorch.

Row i's InfoNCE loss is ``lse_i - (1 - eps) * mean of its positive logits - eps / N * sum of its logits``
(and likewise per column). Only the log-sum-exp needs the whole M x N matrix; it comes from the
``famevil_fast::contrastive_lse`` operator (``famevil_fast.kernels.contrastive_ops``), which never stores
the matrix. The positive and plain sums are linear in the features:

* positives: ``sum_{j positive for i} s a_i . b_j = s a_i . (sum of b over row i's positive group)``,
  with the group sums from one ``index_add`` (the diagonal and single labels are special cases);
* plain sums: ``s a_i . sum_j b_j``.

Both cost O((M + N) D) in float32 and take their gradients through autograd.
"""

from __future__ import annotations

import torch

from famevil_fast.ops.contrastive import Groups, _as_scale, direction_loss, positive_keys


def _group_sums(x: torch.Tensor, keys: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(n_keys, D): the sum of the rows of x sharing each key."""
    return x.new_zeros((n_keys, x.shape[1])).index_add(0, keys.long(), x)


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
    if torch.compiler.is_compiling():  # an opaque node of the graph
        lse = torch.ops.famevil_fast.contrastive_lse
    else:  # the same launchers without torch.library's dispatch
        lse = contrastive_ops.contrastive_lse_eager
    lse_rows, lse_cols = lse(a.contiguous(), b.contiguous(), s, two_way)
    row_key, col_key, row_counts, col_counts = positive_keys(m, n, labels, groups, a.device)
    a32, b32 = a.float(), b.float()
    pos_rows, pos_cols = _positive_dots(a32, b32, labels, groups, row_key, col_key)
    plain_rows = s * (a32 @ b32.sum(dim=0)) if eps else None
    loss = direction_loss(lse_rows, s * pos_rows, plain_rows, row_counts, eps, n)
    if not two_way:
        return loss
    plain_cols = s * (b32 @ a32.sum(dim=0)) if eps else None
    return 0.5 * (loss + direction_loss(lse_cols, s * pos_cols, plain_cols, col_counts, eps, m))
