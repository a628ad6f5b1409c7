"""Multi-tensor operations over lists that mix dtypes: one ``torch._foreach_*`` call per (device, dtype).

On CUDA a multi-tensor kernel serves a list only while every tensor in it shares one device and dtype (a
copy: every source one dtype and every destination another). A single tensor of another dtype sends the
whole list to the per-tensor path, one kernel launch per tensor. A model with bf16 parameters and float32
temperatures (``train.master_weights``) has such lists: 1,340 gradients of ViT-B/16, three of them float32.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def _groups(key_of, items: Sequence) -> list[list]:
    """``items`` split by ``key_of(item)``, each group in the items' order, groups in first-seen order."""
    groups: dict[Hashable, list] = {}
    for item in items:
        groups.setdefault(key_of(item), []).append(item)
    return list(groups.values())


def copy_grouped(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``dst[i].copy_(src[i])`` for every i, as one multi-tensor copy per pair of dtypes (and device)."""
    if len(dst) != len(src):
        raise ValueError(f"copy_grouped: {len(dst)} destinations but {len(src)} sources")
    pairs = _groups(lambda pair: (pair[0].dtype, pair[1].dtype, pair[0].device), list(zip(dst, src)))
    for group in pairs:
        torch._foreach_copy_([d for d, _ in group], [s for _, s in group])


def zero_grouped(tensors: list[torch.Tensor]) -> None:
    """Zero every tensor in place, one multi-tensor kernel per (device, dtype)."""
    for group in _groups(lambda t: (t.device, t.dtype), tensors):
        torch._foreach_zero_(group)


def norms_grouped(tensors: list[torch.Tensor]) -> torch.Tensor:
    """float32 (len(tensors),): the 2-norm of every tensor, one multi-tensor norm per (device, dtype), grouped
    (not in the tensors' order: for a test over all of them). The tensors share one device; at least one."""
    if not tensors:
        raise ValueError("norms_grouped: no tensors")
    parts = [torch.stack(torch._foreach_norm(g)).float() for g in _groups(lambda t: t.dtype, tensors)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
