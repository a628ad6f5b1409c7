"""Contrastive losses over similarity logits ``scale * a @ b.T``: InfoNCE (one- or two-way, one or several
positives per row, label smoothing) and soft-target distillation from a teacher's logits.

Owns the public ``contrastive_loss`` and ``contrastive_distill_loss`` functions, their argument checks
and the plain-PyTorch references (which materialise the M x N logits). Fast backends plug in through
``_BACKENDS``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from famevil_fast.ops._backend import check_backend

BACKENDS = ("torch", "cpu", "cuda")

ScaleLike = float | torch.Tensor


def _as_scale(scale: ScaleLike, like: torch.Tensor) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a float or a one-element tensor, got shape {tuple(scale.shape)}")
        return scale.reshape(()).to(torch.float32)
    return torch.tensor(float(scale), dtype=torch.float32, device=like.device)


def positive_mask(
    m: int, n: int, labels: torch.Tensor | None, groups: tuple[torch.Tensor, torch.Tensor] | None, device
) -> torch.Tensor:
    """(M, N) bool: True where column j is a positive of row i."""
    if groups is not None:
        row_groups, col_groups = groups
        return row_groups[:, None] == col_groups[None, :]
    if labels is None:
        labels = torch.arange(m, device=device)
    mask = torch.zeros(m, n, dtype=torch.bool, device=device)
    mask[torch.arange(m, device=device), labels] = True
    return mask


def _soft_target_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j target_ij log softmax(logits_i)_j."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _smoothed_targets(pos: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    t = pos.float() / pos.sum(dim=1, keepdim=True).float()
    if label_smoothing:
        t = (1.0 - label_smoothing) * t + label_smoothing / pos.shape[1]
    return t


def contrastive_loss_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: ScaleLike,
    labels: torch.Tensor | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    two_way: bool = True,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Materialises the logits in float32. Row i's target spreads evenly over its positives."""
    logits = _as_scale(scale, a) * (a.float() @ b.float().T)
    pos = positive_mask(a.shape[0], b.shape[0], labels, groups, a.device)
    loss = _soft_target_ce(logits, _smoothed_targets(pos, label_smoothing))
    if not two_way:
        return loss
    cols = pos.any(dim=0)  # columns that are somebody's positive take part in the column term
    col_loss = _soft_target_ce(logits.T[cols], _smoothed_targets(pos.T[cols], label_smoothing))
    return 0.5 * (loss + col_loss)


def contrastive_distill_loss_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: ScaleLike,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    teacher_scale: ScaleLike,
    two_way: bool = True,
) -> torch.Tensor:
    """Soft-target CE of the student logits against softmax of the teacher logits (rows, and columns)."""
    student = _as_scale(scale, a) * (a.float() @ b.float().T)
    with torch.no_grad():
        teacher = _as_scale(teacher_scale, teacher_a) * (teacher_a.float() @ teacher_b.float().T)
    loss = _soft_target_ce(student, F.softmax(teacher, dim=1))
    if not two_way:
        return loss
    return 0.5 * (loss + _soft_target_ce(student.T, F.softmax(teacher.T, dim=1)))


def _check_pair(op: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{op}: a and b must be 2-D (M, D) and (N, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: feature sizes differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"{op}: empty input: a is {tuple(a.shape)}, b is {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{op}: a is on {a.device} but b is on {b.device}")
    if a.dtype != b.dtype:
        raise ValueError(f"{op}: a is {a.dtype} but b is {b.dtype}")
    if not a.is_floating_point():
        raise ValueError(f"{op}: a and b must be floating point, got {a.dtype}")


def check_contrastive_args(
    a: torch.Tensor,
    b: torch.Tensor,
    labels: torch.Tensor | None,
    groups: tuple[torch.Tensor, torch.Tensor] | None,
    label_smoothing: float,
) -> None:
    op = "contrastive_loss"
    _check_pair(op, a, b)
    m, n = a.shape[0], b.shape[0]
    if labels is not None and groups is not None:
        raise ValueError(f"{op}: pass labels or groups, not both")
    if labels is None and groups is None and m != n:
        raise ValueError(f"{op}: without labels a and b need the same number of rows (diagonal positives), got {m} and {n}")
    if labels is not None:
        if labels.shape != (m,) or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: labels must be an integer tensor of shape ({m},), got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise ValueError(f"{op}: labels must lie in [0, {n}), got range [{int(labels.min())}, {int(labels.max())}]")
    if groups is not None:
        rg, cg = groups
        if rg.shape != (m,) or cg.shape != (n,):
            raise ValueError(f"{op}: groups must be ((M,), (N,)) = (({m},), ({n},)), got {tuple(rg.shape)} and {tuple(cg.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {label_smoothing}")


_BACKENDS: dict[str, object] = {}


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: ScaleLike,
    labels: torch.Tensor | None = None,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    two_way: bool = True,
    label_smoothing: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss over logits ``scale * a @ b.T`` for a (M, D) and b (N, D).

    ``labels`` (M,) gives each row's positive column (default: the diagonal, M == N); ``groups`` =
    (row_groups (M,), col_groups (N,)) makes every column of a row's group a positive (the target spreads
    evenly over them). ``two_way`` adds the column direction (over the columns that are a positive of some
    row) and averages the two. ``scale`` is a float or a one-element tensor (the gradient flows to it).
    ``backend``: "cuda", "cpu", "torch" (reference) or None (automatic).
    """
    check_backend("contrastive_loss", backend, BACKENDS)
    check_contrastive_args(a, b, labels, groups, label_smoothing)
    return contrastive_loss_reference(a, b, scale, labels, groups, two_way, label_smoothing)


def contrastive_distill_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: ScaleLike,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    teacher_scale: ScaleLike,
    two_way: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """Soft-target CE between the student's ``scale * a @ b.T`` and softmax(``teacher_scale * teacher_a @
    teacher_b.T``), rows (and columns when ``two_way``), averaged. The teacher receives no gradient."""
    check_backend("contrastive_distill_loss", backend, BACKENDS)
    _check_pair("contrastive_distill_loss", a, b)
    _check_pair("contrastive_distill_loss (teacher)", teacher_a, teacher_b)
    if teacher_a.shape[0] != a.shape[0] or teacher_b.shape[0] != b.shape[0]:
        raise ValueError(
            "contrastive_distill_loss: teacher and student batches differ: "
            f"a {tuple(a.shape)} vs teacher_a {tuple(teacher_a.shape)}, b {tuple(b.shape)} vs teacher_b {tuple(teacher_b.shape)}"
        )
    return contrastive_distill_loss_reference(a, b, scale, teacher_a, teacher_b, teacher_scale, two_way)
