"""IMTL-G gradient combination (Liu et al., ICLR 2021) over per-task gradients.

Given task gradients g_1..g_T, find weights alpha (summing to 1) such that the combined gradient
g = sum_t alpha_t g_t has the same projection on every task's unit gradient u_t. The paper's closed form,
with D_t = g_1 - g_t and U_t = u_1 - u_t for t = 2..T, is alpha_{2..T} = (g_1 U^T)(D U^T)^{-1}. It is
solved here in its normalised form: with C the matrix of cosines u_s . u_t, the projections are
C (alpha_t |g_t|)_t, so alpha_t is proportional to beta_t / |g_t| with C beta = 1, scaled to sum to 1 (the
same alphas whenever the gradients are linearly independent). C has a unit diagonal, so its condition does
not depend on the gradients' sizes; a tiny ridge (``RIDGE``) added to it makes (nearly) collinear gradients
take the closed form's limit, alpha_t proportional to 1 / |g_t| (two tasks always get exactly that), where
solving D U^T, whose entries are then rounding noise, gave arbitrary weights, sometimes of either sign. The
official code's regularised solve gives the first task's gradient for exactly collinear ones.

Two ways to apply it: per parameter tensor (as the official code does; tasks whose gradient for that tensor
is absent or all-zero are left out, a single task passes through, scalars take the mean) and jointly over all
shared parameters (as the paper intends: one alpha for the whole shared gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

RIDGE = 1e-10  # added to the cosine matrix's unit diagonal (see the module docstring)


def imtl_g_weights(grads: torch.Tensor) -> torch.Tensor:
    """alpha (T,) for flattened task gradients (T, n), computed in float64 (the one-tensor reference of the
    batched solve below). An all-zero gradient gets alpha 0 (all of them zero: equal weights)."""
    g = grads.double()
    norms = g.norm(dim=1)
    used = norms > 0
    if not bool(used.any()):
        return torch.full_like(norms, 1.0 / len(norms))
    u = g[used] / norms[used, None]
    cosines = u @ u.T
    ridge = RIDGE * torch.eye(len(u), dtype=g.dtype, device=g.device)
    beta = torch.linalg.solve(cosines + ridge, torch.ones(len(u), 1, dtype=g.dtype, device=g.device))[:, 0]
    alpha = torch.zeros_like(norms)
    alpha[used] = beta / norms[used]
    total = alpha.sum()
    if not (bool(total.isfinite()) and bool(total != 0)):
        alpha = torch.where(used, 1.0 / norms, 0.0)  # the collinear limit
        total = alpha.sum()
    return alpha / total


def _low_precision_safe(dtype: torch.dtype) -> torch.dtype:
    """The dtype a weighted sum of gradients of ``dtype`` is taken in: float32 for 16-bit gradients (their
    alphas and sums are not rounded to 16 bits), else ``dtype``."""
    return torch.promote_types(dtype, torch.float32)


def combine_per_tensor(task_grads: Mapping[str, torch.Tensor | None]) -> torch.Tensor | None:
    """One parameter's combined gradient from its tasks' gradients (None when no task touched it)."""
    present = [g for g in task_grads.values() if g is not None and bool(g.any())]
    if not present:
        return None
    if len(present) == 1:
        return present[0].clone()
    stacked = torch.stack([g.flatten() for g in present])
    if stacked.shape[1] == 1:
        return stacked.mean(0).view_as(present[0])
    wide = _low_precision_safe(stacked.dtype)
    alpha = imtl_g_weights(stacked).to(wide)
    return (alpha[:, None] * stacked.to(wide)).sum(0).to(stacked.dtype).view_as(present[0])


def combine_each_tensor(
    buffers: Mapping[str, Mapping[str, torch.Tensor]], names: list[str]
) -> dict[str, torch.Tensor]:
    """``combine_per_tensor`` over ``names`` one tensor at a time: the reference for
    ``combine_all_per_tensor``."""
    out = {}
    for n in names:
        g = combine_per_tensor({t: b.get(n) for t, b in buffers.items()})
        if g is not None:
            out[n] = g
    return out


def combine_all_per_tensor(
    buffers: Mapping[str, Mapping[str, torch.Tensor]], names: list[str]
) -> dict[str, torch.Tensor]:
    """``combine_per_tensor`` for every parameter at once, without a read-back per tensor.

    Parameters are grouped by shape and by the tasks that produced a gradient; per group, one
    batched product gives every tensor's Gram matrix of task gradients (float64), one batched solve of the
    T x T cosine systems (module docstring; absent or all-zero tasks get alpha 0) gives the alphas, and one
    batched sum the combined gradients. The only read-back is one flag per parameter, at the end: whether
    any task's gradient was non-zero (parameters with none get no gradient, as in ``combine_per_tensor``).
    Collinear gradients of a tensor take the closed form's limit (module docstring). A parameter that one
    task alone touched gets that task's gradient tensor itself (no copy).
    """
    out: dict[str, torch.Tensor] = {}
    flags: list[torch.Tensor] = []
    for (shape, tasks), group in _shape_groups(buffers, names).items():
        if len(tasks) == 1:  # one task's parameters pass through
            for n in group:
                out[n] = buffers[tasks[0]][n]
                flags.append(out[n].ne(0).any().reshape(1))
            continue
        for chunk, grads in _stacked_chunks(buffers, shape, tasks, group):
            combined, any_present = _combine_stacked(grads, scalar=math.prod(shape) <= 1)
            flags.append(any_present)
            for i, n in enumerate(chunk):
                out[n] = combined[i].view(shape)
    if flags:
        keep = torch.cat([f.cpu() for f in flags]).tolist()
        for n, present in zip(list(out), keep):
            if not present:
                del out[n]
    return out


_CHUNK_ELEMENTS = 1 << 26  # float64 elements stacked at once (512 MiB)


def _shape_groups(
    buffers: Mapping[str, Mapping[str, torch.Tensor]], names: list[str]
) -> dict[tuple[tuple[int, ...], tuple[str, ...]], list[str]]:
    """(shape, tasks with a gradient) -> parameter names, for names with at least one task's gradient
    (buffers hold the gradients of one device and dtype)."""
    groups: dict[tuple[tuple[int, ...], tuple[str, ...]], list[str]] = {}
    for n in names:
        tasks = tuple(t for t, b in buffers.items() if b.get(n) is not None)
        if tasks:
            groups.setdefault((tuple(buffers[tasks[0]][n].shape), tasks), []).append(n)
    return groups


def _stacked_chunks(buffers, shape: tuple[int, ...], tasks: tuple[str, ...], group: list[str]):
    """(names, gradients (K, T, n)) over ``group`` in chunks of at most ``_CHUNK_ELEMENTS`` elements: one
    stack, laid out so that the batched products below read it without a transposed copy."""
    numel = max(1, math.prod(shape))
    step = max(1, _CHUNK_ELEMENTS // (numel * len(tasks)))
    for start in range(0, len(group), step):
        chunk = group[start : start + step]
        flat = [buffers[t][n].reshape(-1) for n in chunk for t in tasks]
        yield chunk, torch.stack(flat).view(len(chunk), len(tasks), numel)


def _combine_stacked(grads: torch.Tensor, scalar: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """grads (K, T, n) -> (combined (K, n) in grads' dtype, any task present or non-finite (K,)); the Gram
    matrices and the alphas in float64, the weighted sum in grads' dtype, float32 for 16-bit gradients (as
    ``combine_per_tensor`` does)."""
    wide = grads.double()
    gram = torch.bmm(wide, wide.transpose(1, 2))  # (K, T, T)
    del wide
    sq = gram.diagonal(dim1=1, dim2=2)  # (K, T)
    present = sq > 0
    weight = present.double()
    if scalar:
        alpha = weight / weight.sum(-1, keepdim=True).clamp_min(1)
    else:
        alpha = _imtl_alphas(gram, sq, present)
    # a non-finite task gradient keeps the tensor (its combination is non-finite too), so that the update's
    # gradient norm sees it rather than the tensor passing as untouched
    kept = present.any(-1) | ~sq.isfinite().all(-1)
    wide = _low_precision_safe(grads.dtype)
    return torch.bmm(alpha.to(wide)[:, None, :], grads.to(wide))[:, 0].to(grads.dtype), kept


def _imtl_alphas(gram: torch.Tensor, sq: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Batched IMTL-G alphas (K, T) from Gram matrices (K, T, T) of the tasks' gradients and their squared
    norms (K, T): the normalised solve of ``imtl_g_weights`` without a read-back (absent, all-zero and
    non-finite gradients get alpha 0; a batch without any present task gets all zeros)."""
    k, t = sq.shape
    used = present & sq.isfinite()
    norms = sq.clamp_min(0).sqrt().clamp_min(1e-300)
    eye = torch.eye(t, dtype=gram.dtype, device=gram.device).expand(k, t, t)
    pair = used[:, :, None] & used[:, None, :]
    cosines = torch.where(pair, gram / (norms[:, :, None] * norms[:, None, :]), eye)
    mask = used.to(gram.dtype)
    beta, _ = torch.linalg.solve_ex(cosines + RIDGE * eye, mask[:, :, None])
    alpha = beta[:, :, 0] / norms * mask
    total = alpha.sum(-1, keepdim=True)
    limit = mask / norms  # the collinear limit, where the solve gives no usable weights
    alpha = torch.where(total.isfinite() & (total != 0), alpha, limit)
    total = alpha.sum(-1, keepdim=True)
    return alpha / torch.where(total == 0, 1.0, total)


def combine_global(
    buffers: Mapping[str, Mapping[str, torch.Tensor]], names: list[str]
) -> dict[str, torch.Tensor]:
    """Combined gradients of every parameter: one alpha over the parameters that several tasks share;
    task-specific parameters keep their single task's gradient."""
    tasks = list(buffers)
    touched = _nonzero_flags(buffers, names)
    shared = [n for n in names if sum(1 for t in tasks if touched[t, n]) > 1]
    out: dict[str, torch.Tensor] = {}
    if shared:
        groups = _shape_groups(buffers, shared)
        position = {t: i for i, t in enumerate(tasks)}
        gram = None
        for (shape, group_tasks), group in groups.items():
            index = torch.tensor([position[t] for t in group_tasks])
            for _, grads in _stacked_chunks(buffers, shape, group_tasks, group):
                wide = grads.double()
                part = torch.bmm(wide, wide.transpose(1, 2)).sum(0)
                if gram is None:
                    gram = torch.zeros(len(tasks), len(tasks), dtype=part.dtype, device=part.device)
                gram[index[:, None], index[None, :]] += part
        sq = gram.diagonal()[None]
        alpha = _imtl_alphas(gram[None], sq, sq > 0)[0]
        for (shape, group_tasks), group in groups.items():
            weights = alpha[[position[t] for t in group_tasks]]
            for chunk, grads in _stacked_chunks(buffers, shape, group_tasks, group):
                wide = _low_precision_safe(grads.dtype)
                combined = torch.matmul(weights.to(wide), grads.to(wide)).to(grads.dtype)  # (K, n)
                for i, n in enumerate(chunk):
                    out[n] = combined[i].view(shape)
    for n in names:
        if n in out:
            continue
        grads = [buffers[t][n] for t in tasks if touched[t, n]]
        if grads:
            out[n] = sum(grads[1:], grads[0].clone())
    return out


def _nonzero_flags(
    buffers: Mapping[str, Mapping[str, torch.Tensor]], names: list[str]
) -> dict[tuple[str, str], bool]:
    """(task, name) -> whether that task's gradient exists and is not all zero, in one read-back."""
    out = {(t, n): False for t in buffers for n in names}
    keys = [(t, n) for t, b in buffers.items() for n in names if b.get(n) is not None]
    if keys:
        out.update(zip(keys, torch.stack([buffers[t][n].ne(0).any() for t, n in keys]).tolist()))
    return out


class GradientBuffer:
    """Per-task copies of parameter gradients, collected micro-batch by micro-batch."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]]) -> None:
        self.params = named_params
        self.buffers: dict[str, dict[str, torch.Tensor]] = {}

    def collect(self, task: str) -> None:
        """Add the current .grad of every parameter to ``task``'s buffer and clear .grad."""
        store = self.buffers.setdefault(task, {})
        for name, p in self.params:
            if p.grad is None:
                continue
            if name in store:
                store[name].add_(p.grad)
            else:  # the buffer takes over the gradient tensor, which .grad gives up just below
                store[name] = p.grad.detach()
            p.grad = None

    def apply(self, strategy: str) -> None:
        """Write the combined gradient into .grad of every parameter and empty the buffers."""
        names = [n for n, _ in self.params]
        if strategy == "imtlg":
            combined = combine_all_per_tensor(self.buffers, names)
        elif strategy == "imtlg_global":
            combined = combine_global(self.buffers, names)
        else:
            raise ValueError(f"unknown gradient strategy {strategy!r}")
        for name, p in self.params:
            p.grad = combined.get(name)
        self.buffers = {}
