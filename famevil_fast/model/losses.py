"""Task losses of FAME-ViL, computed from model outputs.

Retrieval losses accept an optional ``gather`` callable for distributed training: it all-gathers a tensor
across processes with gradient flow and returns ``(gathered, offset)`` where ``offset`` is the index of this
process's first row; local rows are then scored against the gathered columns.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from famevil_fast.ops import contrastive_loss

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _local_labels(rows: int, offset: int, device: torch.device) -> torch.Tensor:
    return torch.arange(offset, offset + rows, device=device)


def itc_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    scale: torch.Tensor,
    gather: Gather | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised image and text embeddings, logits = scale * cos."""
    if gather is None:
        return contrastive_loss(image, text, scale, two_way=True, backend=backend)
    all_text, offset = gather(text)
    all_image, _ = gather(image)
    labels = _local_labels(image.shape[0], offset, image.device)
    i2t = contrastive_loss(image, all_text, scale, labels=labels, two_way=False, backend=backend)
    t2i = contrastive_loss(text, all_image, scale, labels=labels, two_way=False, backend=backend)
    return 0.5 * (i2t + t2i)


def tgir_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    scale: torch.Tensor,
    gather: Gather | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Batch-based classification: each composed query against every target of the (global) batch."""
    offset = 0
    if gather is not None:
        target, offset = gather(target)
    labels = _local_labels(query.shape[0], offset, query.device)
    return contrastive_loss(query, target, scale, labels=labels, two_way=False, backend=backend)


def scr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """Token cross-entropy; ``logits`` (N, V) and ``targets`` (N,) are the positions already selected
    (target -100 is ignored). In
    distributed training the sum is divided by the mean token count over processes, so that averaging the
    processes' losses gives the mean over every token of the global batch."""
    mean_count = getattr(gather, "mean_count", None)
    if mean_count is None:
        return F.cross_entropy(logits.float(), targets)
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return total / mean_count((targets != -100).sum().float())
