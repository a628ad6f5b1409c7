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
    rows = attribute_ids.shape[0] if isinstance(attribute_ids, torch.Tensor) and attribute_ids.dim() else 0
    check_attribute_ids(attribute_ids, rows, num_attributes)
    return _soft_multi_hot(attribute_ids, num_attributes, dtype)


def _soft_multi_hot(attribute_ids: torch.Tensor, num_attributes: int, dtype: torch.dtype) -> torch.Tensor:
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
    check_ids: bool = True,
) -> torch.Tensor:
    """Soft-label CE of the image logits + that of the text logits, averaged over rows with attributes. In
    distributed training (``gather``) the sum is divided by the mean such row count over the processes, so
    that DDP's average of the processes' losses is the mean over the global batch's rows. ``check_ids``
    False skips the range check of the ids (a host read) for a caller that made it already."""
    if image_logits.dim() != 2 or image_logits.shape != text_logits.shape:
        raise ValueError(
            "pac_loss needs image and text logits of the same shape (B, A), got "
            f"{tuple(image_logits.shape)} and {tuple(text_logits.shape)}"
        )
    if check_ids:
        check_attribute_ids(attribute_ids, image_logits.shape[0], image_logits.shape[1])
    target = _soft_multi_hot(attribute_ids, image_logits.shape[1], torch.float32)
    rows = (attribute_ids >= 0).any(dim=1)
    per_row = soft_cross_entropy(image_logits, target) + soft_cross_entropy(text_logits, target)
    return mean_over_processes((per_row * rows.to(per_row.dtype)).sum(), rows.sum(), gather)


@torch.no_grad()
def hardest_negatives(similarity: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """For each image row of ``similarity`` (B, B; images x texts), the column of its most similar text
    other than its own and other than any text identical to its own; -1 when there is none."""
    _check_matching(similarity, input_ids)
    b = similarity.shape[0]
    if b == 0:
        return torch.zeros(0, dtype=torch.long, device=similarity.device)
    same_text = (input_ids[:, None, :] == input_ids[None, :, :]).all(dim=-1)
    scores = similarity.float().masked_fill(same_text, float("-inf"))
    best, index = scores.max(dim=1)
    return torch.where(torch.isfinite(best), index, torch.full_like(index, -1))


def _check_matching(similarity: torch.Tensor, input_ids: torch.Tensor) -> None:
    if not isinstance(similarity, torch.Tensor) or similarity.dim() != 2:
        got = getattr(similarity, "shape", type(similarity))
        raise ValueError(f"similarity must be a (B, B) tensor, got {got}")
    b = similarity.shape[0]
    if similarity.shape[1] != b:
        raise ValueError(f"similarity must be square (B images x B texts), got {tuple(similarity.shape)}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != b:
        raise ValueError(
            f"input_ids must have shape ({b}, L) to match the similarity, got "
            f"{tuple(getattr(input_ids, 'shape', ()))}"
        )


def itm_pairs(similarity: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(text index (B,), labels (B,)): every second pair (odd rows) gets its image's hardest negative text,
    label 0; the others keep their own text, label 1 (also odd rows without any negative)."""
    b = similarity.shape[0]
    own = torch.arange(b, device=similarity.device)
    negative = hardest_negatives(similarity, input_ids)
    swap = (own % 2 == 1) & (negative >= 0)
    return torch.where(swap, negative, own), (~swap).long()


def itm_loss(
    logits: torch.Tensor, labels: torch.Tensor, gather: Gather | None = None, check_labels: bool = True
) -> torch.Tensor:
    """Cross-entropy of the 2-way match head (label 1 = the text describes the image); weighted by local rows
    / mean rows over the processes in distributed training. ``check_labels=False`` skips the check that
    every label is 0 or 1 (a read-back from the device), for labels built by ``itm_pairs``."""
    if logits.dim() != 2 or logits.shape[1] != 2 or labels.shape != (logits.shape[0],):
        raise ValueError(
            "itm_loss needs logits (B, 2) and labels (B,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"itm labels must be integers 0 / 1, got {labels.dtype}")
    checked = check_labels and labels.numel() and host_reads_allowed()
    if checked and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("itm labels must be 0 (no match) or 1 (match)")
    return row_weighted(F.cross_entropy(logits.float(), labels.long()), gather, logits.shape[0])
