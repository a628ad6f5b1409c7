"""IMTL-G gradient combination (Liu et al., ICLR 2021) over per-task gradients.

Given task gradients g_1..g_T, find weights alpha (summing to 1) such that the combined gradient
g = sum_t alpha_t g_t has the same projection on every task's unit gradient u_t. Closed form, with
D_t = g_1 - g_t and U_t = u_1 - u_t for t = 2..T:  alpha_{2..T} = (g_1 U^T)(D U^T)^{-1}.

Two ways to apply it: per parameter tensor (as the official code does; tasks whose gradient for that tensor
is absent or all-zero are left out, a single task passes through, scalars take the mean) and jointly over all
shared parameters (as the paper intends: one alpha for the whole shared gradient).
"""

from __future__ import annotations

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


def combine_global(
    buffers: Mapping[str, Mapping[str, torch.Tensor]], names: list[str]
) -> dict[str, torch.Tensor]:
    """Combined gradients of every parameter: one alpha over the parameters that several tasks share;
    task-specific parameters keep their single task's gradient."""
    tasks = list(buffers)
    shared = [n for n in names if sum(1 for t in tasks if _touched(buffers[t].get(n))) > 1]
    out: dict[str, torch.Tensor] = {}
    if shared:
        active = [t for t in tasks if any(_touched(buffers[t].get(n)) for n in shared)]
        flat = torch.stack(
            [torch.cat([_or_zero(buffers[t].get(n), buffers, n).flatten() for n in shared]) for t in active]
        )
        alpha = imtl_g_weights(flat).to(flat.dtype)
        for n in shared:
            out[n] = sum(a * _or_zero(buffers[t].get(n), buffers, n) for a, t in zip(alpha, active))
    for n in names:
        if n in out:
            continue
        grads = [buffers[t][n] for t in tasks if _touched(buffers[t].get(n))]
        if grads:
            out[n] = sum(grads[1:], grads[0].clone())
    return out


def _touched(g: torch.Tensor | None) -> bool:
    return g is not None and bool(g.any())


def _or_zero(g: torch.Tensor | None, buffers, name: str) -> torch.Tensor:
    if g is not None:
        return g
    like = next(b[name] for b in buffers.values() if b.get(name) is not None)
    return torch.zeros_like(like)


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
            store[name] = store[name] + p.grad if name in store else p.grad.detach().clone()
            p.grad = None

    def apply(self, strategy: str) -> None:
        """Write the combined gradient into .grad of every parameter and empty the buffers."""
        names = [n for n, _ in self.params]
        if strategy == "imtlg":
            combined = {}
            for n in names:
                g = combine_per_tensor({t: b.get(n) for t, b in self.buffers.items()})
                if g is not None:
                    combined[n] = g
        elif strategy == "imtlg_global":
            combined = combine_global(self.buffers, names)
        else:
            raise ValueError(f"unknown gradient strategy {strategy!r}")
        for name, p in self.params:
            p.grad = combined.get(name)
        self.buffers = {}
