"""Losses of the FashionViL pre-training objectives, computed from model outputs.

- MVC: symmetric InfoNCE between view-A image embeddings and fused (text + view B) embeddings, through
  ``famevil_fast.ops.contrastive_loss`` (all-gathered in distributed training, like retrieval);
- PAC: soft-target cross-entropy of the image logits plus that of the text logits, the target of a product
  with k attributes being 1/k on each of them (products without attributes are left out);
- ITM: binary cross-entropy of the match head, with hard negatives chosen from in-batch similarities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from famevil_fast.capture import host_reads_allowed
from famevil_fast.model.losses import Gather, itc_loss, mean_over_processes, row_weighted


def mvc_loss(
    image: torch.Tensor,
    fused: torch.Tensor,
    scale: torch.Tensor,
    gather: Gather | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between L2-normalised view-A image and fused embeddings, logits = scale * cos."""
    return itc_loss(image, fused, scale, gather, backend)


def check_attribute_ids(attribute_ids: torch.Tensor, batch: int, num_attributes: int) -> None:
    """(B, K) integer attribute ids, -1 padding, every id in [0, num_attributes)."""
    if not isinstance(attribute_ids, torch.Tensor) or attribute_ids.dtype not in (torch.int64, torch.int32):
        got = getattr(attribute_ids, "dtype", type(attribute_ids))
        raise ValueError(f"attribute_ids must be an integer tensor (B, K) padded with -1, got {got}")
    if attribute_ids.dim() != 2 or attribute_ids.shape[0] != batch:
        raise ValueError(f"attribute_ids must have shape ({batch}, K), got {tuple(attribute_ids.shape)}")
    if attribute_ids.numel() and host_reads_allowed():
        lo, hi = int(attribute_ids.min()), int(attribute_ids.max())
        if lo < -1 or hi >= num_attributes:
            raise ValueError(
                f"attribute_ids must lie in [0, {num_attributes}) (or -1 for padding), got [{lo}, {hi}]"
            )


def soft_multi_hot(
    attribute_ids: torch.Tensor, num_attributes: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(B, K) ids padded with -1 -> (B, A) targets: 1/k on each of a row's k distinct attributes
    (all zero for a row without attributes)."""
    b = attribute_ids.shape[0]
    valid = attribute_ids >= 0
    hot = torch.zeros(b, num_attributes + 1, dtype=dtype, device=attribute_ids.device)
    index = torch.where(valid, attribute_ids.long(), torch.full_like(attribute_ids.long(), num_attributes))
    hot.scatter_(1, index, 1.0)
    hot = hot[:, :num_attributes]
    return hot / hot.sum(dim=1, keepdim=True).clamp(min=1.0)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-row ``-sum_j target_ij log softmax(logits_i)_j`` (float32 or float64)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return -(target.to(dtype) * F.log_softmax(logits.to(dtype), dim=1)).sum(dim=1)


def pac_loss(
    image_logits: torch.Tensor,
    text_logits: torch.Tensor,
    attribute_ids: torch.Tensor,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Soft-label CE of the image logits + that of the text logits, averaged over rows with attributes. In
    distributed training (``gather``) the sum is divided by the mean such row count over the processes, so
    that DDP's average of the processes' losses is the mean over the global batch's rows."""
    target = soft_multi_hot(attribute_ids, image_logits.shape[1])
    rows = (attribute_ids >= 0).any(dim=1)
    per_row = soft_cross_entropy(image_logits, target) + soft_cross_entropy(text_logits, target)
    return mean_over_processes((per_row * rows.to(per_row.dtype)).sum(), rows.sum(), gather)


@torch.no_grad()
def hardest_negatives(similarity: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """For each image row of ``similarity`` (B, B; images x texts), the column of its most similar text
    other than its own and other than any text identical to its own; -1 when there is none."""
    b = similarity.shape[0]
    same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(dim=-1)
    scores = similarity.float().masked_fill(same_text, float("-inf"))
    best, index = scores.max(dim=1)
    index = torch.where(torch.isfinite(best), index, torch.full_like(index, -1))
    return index if b else index.new_zeros(0)


def itm_pairs(similarity: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text index (B,), labels (B,)): every second pair (odd rows) gets its image's hardest negative text,
    label 0; the others keep their own text, label 1 (also odd rows without any negative)."""
    b = similarity.shape[0]
    own = torch.arange(b, device=similarity.device)
    negative = hardest_negatives(similarity, input_ids)
    swap = (own % 2 == 1) & (negative >= 0)
    return torch.where(swap, negative, own), (~swap).long()


def itm_loss(logits: torch.Tensor, labels: torch.Tensor, gather: Gather | None = None) -> torch.Tensor:
    """Cross-entropy of the 2-way match head (label 1 = the text describes the image); weighted by local rows
    / mean rows over the processes in distributed training."""
    return row_weighted(F.cross_entropy(logits.float(), labels), gather, logits.shape[0])
