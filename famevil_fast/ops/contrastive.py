"""Contrastive losses over similarity logits ``scale * a @ b.T``: InfoNCE (one- or two-way, one or several
positives per row, label smoothing) and soft-target distillation from a teacher's logits.

Owns the public ``contrastive_loss`` and ``contrastive_distill_loss`` functions, their argument checks, the
plain-PyTorch references (which materialise the M x N logits) and the fused paths: the Triton loss
(``contrastive_triton``, log-sum-exp sweeps and gradient tiles in Triton, products by cuBLAS; the automatic
choice on a GPU from 8,192 x 8,192 logits), and the compiled operators ``famevil_fast::contrastive_stats`` /
``contrastive_distill_stats`` (CPU and CUDA), which sweep the logits tile by tile and return per-row and
per-column statistics in memory linear in M + N; the losses are cheap functions of those statistics:

* InfoNCE: statistics (log-sum-exp, sum of logits over the positives, sum of all logits); row i's loss is
  ``lse_i - (1 - eps) * pos_sum_i / n_pos_i - eps / N * sum_i``.
* Distillation: statistics (log-sum-exp, teacher log-sum-exp, sum_j softmax(teacher)_ij * logits_ij); row
  i's loss is ``lse_i - weighted_i``.

Rows (columns) without any positive are left out of the row (column) average. The compiled operators'
FLOP formulas (``STATS_FLOP_FORMULAS``) count what FlopCounterMode counts for the references: the products
of the logits and of their gradients.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from famevil_fast import _ext
from famevil_fast.capture import host_reads_allowed, static_shapes_enabled
from famevil_fast.ops._backend import (
    KERNEL_DTYPES,
    check_backend,
    counting_flops,
    forced_backend,
    matmul_flops,
    once_differentiable_grads,
    register_flop_formulas,
    require_triton,
    triton_importable,
    triton_runs_on,
)

BACKENDS = ("torch", "cpu", "cuda", "triton")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

ScaleLike = float | torch.Tensor
Groups = tuple[torch.Tensor, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_scale(scale: ScaleLike, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The scale as a 0-d tensor of ``dtype`` (the compute dtype of ``like``'s) on ``like``'s device. A
    number is filled in on the device: no copy from the host (on a GPU a synchronising one)."""
    dtype = dtype or compute_dtype(like.dtype)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a float or a one-element tensor, got shape {tuple(scale.shape)}")
        return scale.reshape(()).to(device=like.device, dtype=dtype)
    value = float(scale)
    if abs(value) > torch.finfo(dtype).max:  # inf, as the dtype's rounding gives (a non-finite loss follows)
        value = math.copysign(math.inf, value)
    return torch.full((), value, dtype=dtype, device=like.device)


# ---------------------------------------------------------------------------------------------------
# References


def positive_mask(
    m: int, n: int, labels: torch.Tensor | None, groups: Groups | None, device: torch.device
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


def _smoothed_targets(pos: torch.Tensor, label_smoothing: float, dtype: torch.dtype) -> torch.Tensor:
    """Each row's target: even over its positives (none for a row without any), plus the smoothing."""
    t = pos.to(dtype) / pos.sum(dim=1, keepdim=True).clamp_min(1).to(dtype)
    if label_smoothing:
        t = (1.0 - label_smoothing) * t + label_smoothing / pos.shape[1]
    return t


def _direction_reference(
    logits: torch.Tensor, pos: torch.Tensor, eps: float, some_rows_empty: bool
) -> torch.Tensor:
    """Mean soft-target CE over the rows with a positive. Rows without one are weighted out rather than
    selected out (a boolean selection sizes a tensor by the data, which graph capture cannot record)."""
    target = _smoothed_targets(pos, eps, logits.dtype)
    if not some_rows_empty:
        return _soft_target_ce(logits, target)
    keep = pos.any(dim=1)
    per_row = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    return torch.where(keep, per_row, 0.0).sum() / keep.sum().to(per_row.dtype)


def _one_positive_reference(
    logits: torch.Tensor, labels: torch.Tensor | None, two_way: bool, label_smoothing: float
) -> torch.Tensor:
    """The common case, every row with one positive column (the diagonal when ``labels`` is None, and then
    every column with one positive row too): integer-target cross-entropy, the same loss as the
    soft-target form without its (M, N) target matrices."""
    diagonal = torch.arange(logits.shape[0], device=logits.device)
    target = diagonal if labels is None else labels.long()
    loss = F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if not two_way:
        return loss
    return 0.5 * (loss + F.cross_entropy(logits.T, diagonal, label_smoothing=label_smoothing))


def _without_autocast(a: torch.Tensor) -> torch.autocast:
    """A context in which products of ``a``'s device keep their inputs' dtype (autocast would run the
    references' float32 logits in bf16)."""
    return torch.autocast(a.device.type, enabled=False)


def contrastive_loss_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: ScaleLike,
    labels: torch.Tensor | None = None,
    groups: Groups | None = None,
    two_way: bool = True,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Materialises the logits (float32, float64 for float64 inputs, also under autocast). Row i's target
    spreads evenly over its positives; rows without a positive are left out; the column term covers the
    columns that are a positive of some row."""
    with _without_autocast(a):
        dtype = compute_dtype(a.dtype)
        logits = _as_scale(scale, a, dtype) * (a.to(dtype) @ b.to(dtype).T)
        if groups is None and (labels is None or not two_way):
            return _one_positive_reference(logits, labels, two_way, label_smoothing)
        pos = positive_mask(a.shape[0], b.shape[0], labels, groups, a.device)
        loss = _direction_reference(logits, pos, label_smoothing, groups is not None)
        if not two_way:
            return loss
        col_loss = _direction_reference(logits.T, pos.T, label_smoothing, True)
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
    """Soft-target CE of the student logits against softmax of the teacher logits (rows, and columns), both
    in float32 (float64 for float64 inputs), also under autocast."""
    dtype = compute_dtype(a.dtype)
    with _without_autocast(a):
        student = _as_scale(scale, a, dtype) * (a.to(dtype) @ b.to(dtype).T)
        with torch.no_grad():
            teacher = _as_scale(teacher_scale, a, dtype) * (teacher_a.to(dtype) @ teacher_b.to(dtype).T)
        loss = _soft_target_ce(student, F.softmax(teacher, dim=1))
        if not two_way:
            return loss
        return 0.5 * (loss + _soft_target_ce(student.T, F.softmax(teacher.T, dim=1)))


# ---------------------------------------------------------------------------------------------------
# Argument checks


def _check_pair(op: str, a: torch.Tensor, b: torch.Tensor, names: str = "a and b") -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError(f"{op}: {names} must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{op}: {names} must be 2-D (M, D) and (N, D), got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{op}: feature sizes differ: {names} are {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] == 0 or b.shape[0] == 0:
        raise ValueError(f"{op}: empty input: {names} are {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{op}: {names} are on different devices: {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise ValueError(f"{op}: {names} have different dtypes: {a.dtype} and {b.dtype}")
    if a.dtype not in INPUT_DTYPES:
        raise ValueError(f"{op}: {names} must be float16, bfloat16, float32 or float64, got {a.dtype}")


def _check_scale(op: str, scale: ScaleLike, name: str = "scale") -> None:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(
                f"{op}: {name} must be a float or a one-element tensor, got shape {tuple(scale.shape)}"
            )
        if not scale.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {scale.dtype}")
    elif not isinstance(scale, (int, float)):
        raise ValueError(f"{op}: {name} must be a float or a one-element tensor, got {type(scale).__name__}")


def _check_index(op: str, name: str, t: torch.Tensor, length: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != (length,):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a tensor of shape ({length},), got {shape}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but a is on {device}")


def check_contrastive_args(
    a: torch.Tensor,
    b: torch.Tensor,
    labels: torch.Tensor | None,
    groups: Groups | None,
    label_smoothing: float,
    scale: ScaleLike = 1.0,
) -> None:
    """Shapes, dtypes, devices, label range and smoothing; raises ValueError naming the problem."""
    op = "contrastive_loss"
    _check_pair(op, a, b)
    _check_scale(op, scale)
    m, n = a.shape[0], b.shape[0]
    if labels is not None and groups is not None:
        raise ValueError(f"{op}: pass labels or groups, not both")
    if labels is None and groups is None and m != n:
        raise ValueError(
            f"{op}: without labels a and b need the same number of rows (diagonal positives), got {m} and {n}"
        )
    if labels is not None:
        _check_index(op, "labels", labels, m, a.device)
        lo, hi = (int(labels.min()), int(labels.max())) if host_reads_allowed() else (0, 0)
        if lo < 0 or hi >= n:
            raise ValueError(
                f"{op}: labels must lie in [0, {n}) (b has shape {tuple(b.shape)}), got range [{lo}, {hi}]"
            )
    if groups is not None:
        if not isinstance(groups, (tuple, list)) or len(groups) != 2:
            raise ValueError(f"{op}: groups must be a pair (row_groups (M,), col_groups (N,))")
        _check_index(op, "groups[0] (row groups)", groups[0], m, a.device)
        _check_index(op, "groups[1] (column groups)", groups[1], n, a.device)
        if host_reads_allowed() and not bool(torch.isin(groups[0], groups[1]).any()):
            raise ValueError(f"{op}: no row shares a group with any column, so there is no positive pair")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1), got {label_smoothing}")


def check_distill_args(
    a: torch.Tensor,
    b: torch.Tensor,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    scale: ScaleLike,
    teacher_scale: ScaleLike,
) -> None:
    op = "contrastive_distill_loss"
    _check_pair(op, a, b)
    _check_pair(op, teacher_a, teacher_b, "teacher_a and teacher_b")
    _check_scale(op, scale)
    _check_scale(op, teacher_scale, "teacher_scale")
    if teacher_a.shape[0] != a.shape[0] or teacher_b.shape[0] != b.shape[0]:
        raise ValueError(
            f"{op}: teacher and student batches differ: a {tuple(a.shape)} vs teacher_a "
            f"{tuple(teacher_a.shape)}, b {tuple(b.shape)} vs teacher_b {tuple(teacher_b.shape)}"
        )
    if teacher_a.device != a.device:
        raise ValueError(f"{op}: the teacher is on {teacher_a.device} but the student is on {a.device}")


# ---------------------------------------------------------------------------------------------------
# Backend choice


def _ops_registered() -> bool:
    return _ext.cpu_ext_available() and hasattr(torch.ops.famevil_fast, "contrastive_stats")


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on tensors of ``device`` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not triton_importable():
            return "it needs the triton package, which is not installed"
        if not triton_runs_on(device):
            return f"it runs on CUDA tensors, or on the CPU with TRITON_INTERPRET=1; inputs on {device}"
        return None
    if not _ops_registered():
        return f"the compiled extension famevil_fast._C is not available ({_ext.import_error()})"
    if backend == "cpu" and device.type != "cpu":
        return f"it runs on CPU tensors, the inputs are on {device}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors, the inputs are on {device}"
        if not _ext.cuda_ext_available():
            return "the extension was built without its CUDA sources"
    return None


# The automatic choice on a GPU (H200, bf16, D = 512, forward plus backward; bench/RESULTS.md, 2026-11-27):
# called eagerly, the plain loss is fastest at 4,096 x 4,096 logits (1.09 ms; the Triton loss 1.68, the
# CUDA kernel 1.99, both bound by the host); at 16,384 x 16,384 the Triton loss took 3.06 ms, the CUDA
# kernel 6.56 and the plain loss 13.65 (and 4.5 GiB beyond its inputs, against 0.3); at 65,536 rows 46.0,
# 96.8 and 240.1 ms. Between the two smaller sizes the threshold sits at 8,192 x 8,192, where the plain
# loss's logits alone take 256 MiB. Above it the Triton loss runs where Triton does, else the CUDA kernel.
# Inside a training step captured as a CUDA graph only device time counts: at 4,096 rows the Triton
# loss's kernels took 0.28 ms against the plain loss's 0.97, so there the Triton loss starts at 4,096 x
# 4,096 (smaller sizes were not measured).
GPU_FUSED_MIN_LOGITS = 8192 * 8192
GPU_FUSED_MIN_LOGITS_IN_GRAPH = 4096 * 4096
# On the CPU (2 cores, float32, forward plus backward): the compiled kernels took 1.1-2.6x the time of the
# plain loss from 32 to 512 rows, 0.88-0.92x at 1,024 rows and 0.43-0.86x at 2,048-4,096 rows (on 16
# threads of a Xeon, 0.62x at 1,024 rows); below 1,024 x 1,024 logits (4 MiB) the plain loss runs.
CPU_FUSED_MIN_LOGITS = 1024 * 1024


def resolve_backend(
    op: str,
    backend: str | None,
    device: torch.device,
    logits: int | None = None,
    dtype: torch.dtype | None = None,
    triton: bool = True,
) -> str:
    """The explicit backend, else FAMEVIL_FAST_BACKEND when it names one of ours, else the best available
    for a problem of ``logits`` = M * N entries (None: large) in ``dtype`` (``triton``: whether the op has
    a Triton kernel to choose)."""
    check_backend(op, backend, BACKENDS)
    source = "backend"
    if backend is None:
        forced = forced_backend()
        if forced not in BACKENDS:
            return _automatic_backend(device, logits, dtype, triton)
        backend, source = forced, "FAMEVIL_FAST_BACKEND"
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"{op}: {source}={backend!r} cannot run: {reason}")
    return backend


def _automatic_backend(
    device: torch.device, logits: int | None = None, dtype: torch.dtype | None = None, triton: bool = True
) -> str:
    """The reference below ``GPU_FUSED_MIN_LOGITS`` logits on a GPU (``CPU_FUSED_MIN_LOGITS`` elsewhere;
    ``GPU_FUSED_MIN_LOGITS_IN_GRAPH`` for the Triton loss in a training step captured as a CUDA graph);
    else the Triton loss on a GPU (when ``triton``, i.e. the op has a Triton kernel, and for its dtypes),
    the compiled kernels for the device, the reference."""
    use_triton = (
        triton
        and device.type == "cuda"
        and (dtype is None or dtype in KERNEL_DTYPES)
        and unavailable_reason("triton", device) is None
    )
    if logits is not None and logits < _fused_threshold(device, use_triton):
        return "torch"
    if use_triton:
        return "triton"
    compiled = device.type in ("cuda", "cpu") and unavailable_reason(device.type, device) is None
    return device.type if compiled else "torch"


def _fused_threshold(device: torch.device, use_triton: bool) -> int:
    """Logits from which a fused loss runs on ``device``: fewer for the Triton loss (``use_triton``: it is
    the one that will run) inside a graphed training step (its warm-up and capture run under
    ``static_shapes`` with autograd on), where host time is gone."""
    if device.type != "cuda":
        return CPU_FUSED_MIN_LOGITS
    if use_triton and static_shapes_enabled() and torch.is_grad_enabled():
        return GPU_FUSED_MIN_LOGITS_IN_GRAPH
    return GPU_FUSED_MIN_LOGITS


# ---------------------------------------------------------------------------------------------------
# Fused path: autograd wrappers around the compiled operators


class _InfoNceStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, row_key, col_key, cols: bool):  # type: ignore[override]
        rows, col_stats = torch.ops.famevil_fast.contrastive_stats(a, b, scale, row_key, col_key, cols)
        ctx.save_for_backward(a, b, scale, row_key, col_key, rows, col_stats)
        ctx.cols = cols
        return rows, col_stats

    @staticmethod
    def backward(ctx, grad_rows, grad_cols):  # type: ignore[override]
        a, b, scale, row_key, col_key, rows, col_stats = ctx.saved_tensors
        with torch.no_grad():
            grads = torch.ops.famevil_fast.contrastive_stats_backward(
                grad_rows.contiguous(),
                grad_cols.contiguous(),
                a,
                b,
                scale,
                row_key,
                col_key,
                rows,
                col_stats,
                ctx.cols,
            )
        depends = (grad_rows, grad_cols, a, b, scale)
        return *once_differentiable_grads("contrastive_loss", tuple(grads), depends), None, None, None


class _DistillStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, teacher_a, teacher_b, teacher_scale, cols: bool):  # type: ignore[override]
        rows, col_stats = torch.ops.famevil_fast.contrastive_distill_stats(
            a, b, scale, teacher_a, teacher_b, teacher_scale, cols
        )
        ctx.save_for_backward(a, b, scale, teacher_a, teacher_b, teacher_scale, rows, col_stats)
        ctx.cols = cols
        return rows, col_stats

    @staticmethod
    def backward(ctx, grad_rows, grad_cols):  # type: ignore[override]
        a, b, scale, teacher_a, teacher_b, teacher_scale, rows, col_stats = ctx.saved_tensors
        incoming = (grad_rows.contiguous(), grad_cols.contiguous())
        teacher = (teacher_a, teacher_b, teacher_scale)
        with torch.no_grad():
            grads = torch.ops.famevil_fast.contrastive_distill_stats_backward(
                *incoming, a, b, scale, *teacher, rows, col_stats, ctx.cols
            )
        depends = (*incoming, a, b, scale, *teacher)
        grads = once_differentiable_grads("contrastive_distill_loss", tuple(grads), depends)
        return *grads, None, None, None, None


def _register_fake_kernels() -> None:
    """Shape-only implementations so that torch.compile / FakeTensor tracing can run the operators."""

    def stats_like(a, b, cols):
        dtype = compute_dtype(a.dtype)
        return a.new_empty((3, a.shape[0]), dtype=dtype), a.new_empty(
            (3, b.shape[0] if cols else 0), dtype=dtype
        )

    def grads_like(a, b, scale):
        return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)

    torch.library.register_fake("famevil_fast::contrastive_stats")(
        lambda a, b, scale, row_key, col_key, cols: stats_like(a, b, cols)
    )
    torch.library.register_fake("famevil_fast::contrastive_distill_stats")(
        lambda a, b, scale, ta, tb, ts, cols: stats_like(a, b, cols)
    )
    torch.library.register_fake("famevil_fast::contrastive_stats_backward")(
        lambda gr, gc, a, b, scale, rk, ck, rows, col_stats, cols: grads_like(a, b, scale)
    )
    torch.library.register_fake("famevil_fast::contrastive_distill_stats_backward")(
        lambda gr, gc, a, b, scale, ta, tb, ts, rows, col_stats, cols: grads_like(a, b, scale)
    )


def contrastive_stats_flops(
    a_shape: Sequence[int], b_shape: Sequence[int], *args: object, out_shape: object = None, **kwargs: object
) -> int:
    """FLOPs of ``famevil_fast::contrastive_stats`` (a (M, D), b (N, D)): the logits a @ b.T, once for the
    row and the column statistics, as FlopCounterMode counts the reference's product."""
    return matmul_flops(a_shape[0], a_shape[1], b_shape[0])


def contrastive_stats_backward_flops(
    grad_rows_shape: Sequence[int],
    grad_cols_shape: Sequence[int],
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    *args: object,
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """FLOPs of ``famevil_fast::contrastive_stats_backward`` and of ``contrastive_distill_stats_backward``
    (the same leading arguments): the gradients of a and b, G @ b and G^T @ a (both computed; the teacher
    takes none, and the logits the kernels recompute are not counted, as the reference keeps them)."""
    return 2 * matmul_flops(a_shape[0], a_shape[1], b_shape[0])


def contrastive_distill_stats_flops(
    a_shape: Sequence[int],
    b_shape: Sequence[int],
    scale_shape: Sequence[int],
    teacher_a_shape: Sequence[int],
    teacher_b_shape: Sequence[int],
    *args: object,
    out_shape: object = None,
    **kwargs: object,
) -> int:
    """FLOPs of ``famevil_fast::contrastive_distill_stats``: the student's logits a @ b.T and the teacher's
    teacher_a @ teacher_b.T (whose width may differ), as FlopCounterMode counts the reference's two
    products."""
    student = matmul_flops(a_shape[0], a_shape[1], b_shape[0])
    return student + matmul_flops(teacher_a_shape[0], teacher_a_shape[1], teacher_b_shape[0])


STATS_FLOP_FORMULAS = {
    "contrastive_stats": contrastive_stats_flops,
    "contrastive_stats_backward": contrastive_stats_backward_flops,
    "contrastive_distill_stats": contrastive_distill_stats_flops,
    "contrastive_distill_stats_backward": contrastive_stats_backward_flops,
}


if _ops_registered():
    _register_fake_kernels()
    # At import where the counter's module is loaded already; else on the first fused call
    # (``counting_flops``), since loading it loads triton, which ``import famevil_fast`` otherwise does not.
    if "torch.utils.flop_counter" in sys.modules:
        register_flop_formulas(STATS_FLOP_FORMULAS)


def dense_ranks(values: torch.Tensor) -> torch.Tensor:
    """int64: each value's rank among the distinct values (0 for the smallest), as
    ``torch.unique(values, return_inverse=True)[1]`` but sort-based, without a host read-back or a
    data-sized tensor (so graph capture can record it)."""
    ordered, order = torch.sort(values)
    new_value = torch.ones_like(ordered)
    new_value[0] = 0
    new_value[1:] = ordered[1:] != ordered[:-1]
    return torch.empty_like(order).scatter_(0, order, new_value.cumsum(0))


def positive_keys(
    m: int, n: int, labels: torch.Tensor | None, groups: Groups | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """int32 keys with positive(i, j) <=> row_key[i] == col_key[j], and the number of positives per row and
    per column (None when every row, or column, has exactly one)."""
    if groups is not None:
        ids = dense_ranks(torch.cat([groups[0].long(), groups[1].long()]))
        row_ids, col_ids = ids[:m], ids[m:]
        ones = torch.ones(m + n, dtype=torch.long, device=ids.device)
        per_id_rows = torch.zeros(m + n, dtype=torch.long, device=ids.device).index_add_(0, row_ids, ones[:m])
        per_id_cols = torch.zeros(m + n, dtype=torch.long, device=ids.device).index_add_(0, col_ids, ones[m:])
        return row_ids.int(), col_ids.int(), per_id_cols[row_ids], per_id_rows[col_ids]
    col_key = torch.arange(n, device=device, dtype=torch.int32)
    if (
        labels is None
    ):  # a distinct tensor for the rows: autograd.Function under dynamo rejects aliased inputs
        return torch.arange(m, device=device, dtype=torch.int32), col_key, None, None
    ones = torch.ones(labels.shape, dtype=torch.long, device=device)
    col_counts = torch.zeros(n, dtype=torch.long, device=device).index_add_(0, labels, ones)
    return labels.int(), col_key, None, col_counts  # index_add, unlike bincount, has a fixed output shape


def _direction_loss(stats: torch.Tensor, counts: torch.Tensor | None, eps: float, width: int) -> torch.Tensor:
    """Mean InfoNCE over the rows of one direction from its stacked (lse, positive sum, plain sum)."""
    return direction_loss(*stats.unbind(0), counts, eps, width)


def direction_loss(
    lse: torch.Tensor,
    pos_sum: torch.Tensor,
    plain_sum: torch.Tensor | None,
    counts: torch.Tensor | None,
    eps: float,
    width: int,
) -> torch.Tensor:
    """Mean InfoNCE over the rows of one direction: per row ``lse - (1 - eps) * mean positive logit -
    eps / width * sum of logits`` (``plain_sum`` is only read when ``eps``), rows without a positive left
    out."""
    pos_mean = pos_sum if counts is None else pos_sum / counts.clamp_min(1).to(pos_sum.dtype)
    if eps:
        per_row = lse - (1.0 - eps) * pos_mean - (eps / width) * plain_sum
    else:
        per_row = lse - pos_mean
    if counts is None:
        return per_row.mean()
    keep = (counts > 0).to(per_row.dtype)
    return (per_row * keep).sum() / keep.sum()


def _fused_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: ScaleLike,
    labels: torch.Tensor | None,
    groups: Groups | None,
    two_way: bool,
    eps: float,
) -> torch.Tensor:
    m, n = a.shape[0], b.shape[0]
    s = _as_scale(scale, a)
    row_key, col_key, row_counts, col_counts = positive_keys(m, n, labels, groups, a.device)
    if not torch.compiler.is_compiling():
        counting_flops(STATS_FLOP_FORMULAS)  # registers the formulas on first use, also into a counter
    rows, cols = _InfoNceStats.apply(a, b, s, row_key, col_key, two_way)
    loss = _direction_loss(rows, row_counts, eps, n)
    if not two_way:
        return loss
    return 0.5 * (loss + _direction_loss(cols, col_counts, eps, m))


def _fused_distill_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: ScaleLike,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    teacher_scale: ScaleLike,
    two_way: bool,
) -> torch.Tensor:
    s = _as_scale(scale, a)
    t = _as_scale(teacher_scale, a).detach()
    ta, tb = teacher_a.detach().to(a.dtype), teacher_b.detach().to(a.dtype)
    if not torch.compiler.is_compiling():
        counting_flops(STATS_FLOP_FORMULAS)
    rows, cols = _DistillStats.apply(a, b, s, ta, tb, t, two_way)
    loss = (rows[0] - rows[2]).mean()
    if not two_way:
        return loss
    return 0.5 * (loss + (cols[0] - cols[2]).mean())


# ---------------------------------------------------------------------------------------------------
# Public functions


def contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: ScaleLike,
    labels: torch.Tensor | None = None,
    groups: Groups | None = None,
    two_way: bool = True,
    label_smoothing: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean InfoNCE loss over logits ``scale * a @ b.T`` for a (M, D) and b (N, D).

    ``labels`` (M,) gives each row's positive column (default: the diagonal, M == N); ``groups`` =
    (row_groups (M,), col_groups (N,)) makes every column of a row's group a positive (the target spreads
    evenly over them; rows without a positive are left out). ``two_way`` adds the column direction (over
    the columns that are a positive of some row) and averages the two. ``scale`` is a float or a
    one-element tensor (the gradient flows to it). Non-finite inputs give a non-finite loss.
    ``backend``: "cuda", "cpu" (compiled, memory linear in M + N), "triton" (Triton log-sum-exp kernels
    plus cuBLAS products, memory linear in M + N; float16, bfloat16 and float32), "torch" (reference) or
    None (automatic: the reference below ``CPU_FUSED_MIN_LOGITS`` logits on the CPU and
    ``GPU_FUSED_MIN_LOGITS`` on a GPU; above them the compiled kernels on the CPU, and on a GPU the
    Triton loss, or the CUDA kernels without Triton).
    """
    check_contrastive_args(a, b, labels, groups, label_smoothing, scale)
    chosen = resolve_backend("contrastive_loss", backend, a.device, a.shape[0] * b.shape[0], a.dtype)
    if chosen == "torch":
        return contrastive_loss_reference(a, b, scale, labels, groups, two_way, label_smoothing)
    if chosen == "triton":
        from famevil_fast.ops.contrastive_triton import triton_contrastive_loss

        require_triton("contrastive_loss", a)
        return triton_contrastive_loss(a, b, scale, labels, groups, two_way, label_smoothing)
    return _fused_contrastive_loss(a, b, scale, labels, groups, two_way, label_smoothing)


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
    teacher_b.T``), rows (and columns when ``two_way``), averaged. The teacher receives no gradient; the
    fused backends compute it in the student's dtype. ``backend`` as in ``contrastive_loss``; "triton" has
    no distillation kernel and takes the automatic choice."""
    check_distill_args(a, b, teacher_a, teacher_b, scale, teacher_scale)
    logits = a.shape[0] * b.shape[0]
    chosen = resolve_backend("contrastive_distill_loss", backend, a.device, logits, a.dtype, triton=False)
    if chosen == "triton":  # asked for, but distillation has no Triton kernel: the automatic choice runs
        chosen = _automatic_backend(a.device, logits, a.dtype, triton=False)
    if chosen == "torch":
        return contrastive_distill_loss_reference(a, b, scale, teacher_a, teacher_b, teacher_scale, two_way)
    return _fused_distill_loss(a, b, scale, teacher_a, teacher_b, teacher_scale, two_way)
