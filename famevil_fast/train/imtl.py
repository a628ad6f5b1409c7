"""IMTL-G gradient combination (Liu et al., ICLR 2021) over per-task gradients.

Given task gradients g_1..g_T, find weights alpha (summing to 1) such that the combined gradient
g = sum_t alpha_t g_t has the same projection on every task's unit gradient u_t. Closed form, with
D_t = g_1 - g_t and U_t = u_1 - u_t for t = 2..T:  alpha_{2..T} = (g_1 U^T)(D U^T)^{-1}.

Two ways to apply it: per parameter tensor (as the official code does; tasks whose gradient for that tensor
is absent or all-zero are left out, a single task passes through, scalars take the mean) and jointly over all
shared parameters (as the paper intends: one alpha for the whole shared gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def imtl_g_weights(grads: torch.Tensor) -> torch.Tensor:
    """alpha (T,) for flattened task gradients (T, n), computed in float64."""
    g = grads.double()
    t = g.shape[0]
    if t == 1:
        return torch.ones(1, dtype=g.dtype, device=g.device)
    u = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
    d, uu = g[:1] - g[1:], u[:1] - u[1:]
    m = d @ uu.T
    rhs = g[:1] @ uu.T
    try:
        rest = torch.linalg.solve(m.T, rhs.T).T
    except RuntimeError:
        rest = rhs @ torch.linalg.inv(m + 1e-8 * torch.eye(t - 1, dtype=g.dtype, device=g.device))
    rest = rest.flatten()
    return torch.cat([1 - rest.sum(0, keepdim=True), rest])


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
    alpha = imtl_g_weights(stacked).to(stacked.dtype)
    return (alpha[:, None] * stacked).sum(0).view_as(present[0])


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
    T x T system [sum of alphas = 1 (reference task's row); equal projections (other present tasks);
    alpha = 0 (absent or all-zero tasks)] gives the alphas, and one batched sum the combined gradients.
    The only read-back is one flag per parameter, at the end: whether any task's gradient was non-zero
    (parameters with none get no gradient, as in ``combine_per_tensor``). Where a system is singular
    (two tasks' gradients of a tensor point the same way), the regularised solve stands in. A parameter
    that one task alone touched gets that task's gradient tensor itself (no copy).
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
    matrices and the alphas in float64, the weighted sum in grads' dtype (as ``combine_per_tensor`` does)."""
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
    return torch.bmm(alpha.to(grads.dtype)[:, None, :], grads)[:, 0], kept


def _imtl_alphas(gram: torch.Tensor, sq: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Batched IMTL-G alphas (K, T) from Gram matrices (K, T, T), the reference task the first present one."""
    k, t = sq.shape
    eye = torch.eye(t, dtype=gram.dtype, device=gram.device).expand(k, t, t)
    proj = gram / sq.sqrt().clamp_min(1e-300)[:, None, :]  # proj[k, s, t] = g_s . u_t
    ref = present & (present.cumsum(-1) == 1)  # (K, T) one-hot of the first present task
    ref_idx = ref.double().argmax(-1)
    proj_ref = proj.gather(2, ref_idx[:, None, None].expand(k, t, 1))  # (K, T, 1): g_s . u_ref
    mask = present.double()
    equal = (proj_ref - proj).transpose(1, 2) * mask[:, None, :]  # row t: sum_s alpha_s (g_s.u_ref - g_s.u_t)
    rows = torch.where(present[:, :, None], equal, eye)  # absent tasks: alpha_t = 0
    rows = torch.where(ref[:, :, None], mask[:, None, :], rows)  # reference row: sum of alphas = 1
    rhs = ref.double()
    alpha, info = torch.linalg.solve_ex(rows, rhs)
    fallback, _ = torch.linalg.solve_ex(rows + 1e-8 * eye, rhs)
    alpha = torch.where((info != 0)[:, None] | ~alpha.isfinite(), fallback, alpha)
    return alpha * mask


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
                combined = torch.matmul(weights.to(grads.dtype), grads)  # (K, n)
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
