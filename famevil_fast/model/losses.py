"""Task losses of FAME-ViL, computed from model outputs.

Retrieval losses accept an optional ``gather`` callable for distributed training: it all-gathers a tensor
across processes with gradient flow and returns ``(gathered, offset)`` where ``offset`` is the index of this
process's first row; local rows are then scored against the gathered columns.

Processes may hold different numbers of rows (a batch that lost a corrupt image). DDP averages the
processes' gradients with equal weights, so each per-row mean loss is scaled by local rows / mean rows over
the processes (a gather object's ``row_weight``; ``caption_loss`` does the same per token with
``mean_count``): averaging the processes' losses then gives the mean over every row of the global batch.
A plain callable gather, or none, leaves the loss unscaled. ``scr_loss`` gathers nothing: its gather only
weights its rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from famevil_fast.ops import contrastive_loss

Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def row_weighted(
    loss: torch.Tensor, gather: Gather | None, rows: int, total: int | None = None
) -> torch.Tensor:
    """``loss`` (a mean over ``rows`` local rows) times local rows / mean rows over the processes; ``total``
    is the global row count when a gather already gave it (no further collective). Unchanged in one
    process, with a gather that has no ``row_weight``, or when every process holds as many rows."""
    row_weight = getattr(gather, "row_weight", None)
    if row_weight is None:
        return loss
    weight = row_weight(rows, loss.device, total)
    if isinstance(weight, float) and weight == 1.0:
        return loss
    return loss * weight


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
    return row_weighted(0.5 * (i2t + t2i), gather, image.shape[0], all_text.shape[0])


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
    loss = contrastive_loss(query, target, scale, labels=labels, two_way=False, backend=backend)
    if gather is None:
        return loss
    return row_weighted(loss, gather, query.shape[0], target.shape[0])


def scr_loss(logits: torch.Tensor, labels: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """Cross-entropy over the local rows; in distributed training (``gather``) weighted by local rows / mean
    rows over the processes."""
    loss = F.cross_entropy(logits.float(), labels.long())  # int32 labels too
    return loss if gather is None else row_weighted(loss, gather, logits.shape[0])


def mean_over_processes(total: torch.Tensor, count: torch.Tensor, gather: Gather | None) -> torch.Tensor:
    """``total / count``: a sum over ``count`` local rows (or tokens) as their mean. In distributed training
    (a gather with ``mean_count``) the divisor is the mean count over the processes, so that DDP's equal
    average of the processes' losses is the mean over every row of the global batch. A count of zero (no
    row anywhere) gives 0 rather than 0 / 0."""
    count = count.to(total.dtype)
    mean_count = getattr(gather, "mean_count", None)
    if mean_count is not None:
        count = mean_count(count).to(total.dtype)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """Token cross-entropy; ``logits`` (N, V) and ``targets`` (N,) are the positions already selected
    (target -100 is ignored). In
    distributed training the sum is divided by the mean token count over processes, so that averaging the
    processes' losses gives the mean over every token of the global batch."""
    if getattr(gather, "mean_count", None) is None:
        return F.cross_entropy(logits.float(), targets)
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    return mean_over_processes(total, (targets != -100).sum(), gather)
