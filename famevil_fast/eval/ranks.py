"""Rank of the best-placed positive of each query, with an explicit rule for tied scores, and Recall@K.

Owns ``RankStats`` and the two ways of computing it: over a whole gallery, block by block, where the
positives of a query are the gallery items carrying its label (``gallery_rank_stats``), and over a small
dense candidate matrix with a positive mask (``candidate_rank_stats``).

A query is a hit at K when one of its positives is among the first K gallery items. Only the best-scored
positive matters, so per query it suffices to count the negatives scoring strictly above that positive
(``greater``), the negatives tying with it (``tied_negatives``) and the positives sharing its score
(``tied_positives``, at least 1). Ties rules for ``hit_rate``:

- ``"expected"`` (default): tied items are ordered uniformly at random; the hit is the probability that a
  positive lands in the top K. A model whose scores are all equal gets exactly the chance level.
- ``"optimistic"``: positives go first among tied items.
- ``"pessimistic"``: positives go last among tied items.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from famevil_fast.eval.topk import (
    DEFAULT_BLOCK_SIZE,
    BlockSize,
    FiniteScores,
    block_scores,
    check_embeddings,
    resolve_backend,
    resolve_block_size,
    row_blocks,
    score_blocks,
    score_dtype,
)

TIES_RULES = ("expected", "optimistic", "pessimistic")


def check_ties(op: str, ties: str) -> None:
    if ties not in TIES_RULES:
        raise ValueError(f"{op}: unknown ties rule {ties!r}; expected one of {TIES_RULES}")


def check_ks(op: str, ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"{op}: ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


@dataclass(frozen=True)
class RankStats:
    """Per-query counts (int64, shape (Q,)) around the best-scored positive; see the module docstring."""

    greater: torch.Tensor
    tied_negatives: torch.Tensor
    tied_positives: torch.Tensor

    def hit_rate(self, k: int, ties: str = "expected") -> torch.Tensor:
        """(Q,) float64 in [0, 1]: whether (or how likely) a positive is among the first ``k`` items."""
        check_ties("hit_rate", ties)
        g = self.greater.double()
        t = self.tied_negatives.double()
        if ties == "optimistic":
            return (g < k).double()
        if ties == "pessimistic":
            return (g + t < k).double()
        return _expected_hit(k - g, t, self.tied_positives.double())

    def recall(self, k: int, ties: str = "expected") -> float:
        """Recall@k in percent over all queries (0 when there are none)."""
        if self.greater.numel() == 0:
            return 0.0
        return 100.0 * float(self.hit_rate(k, ties).mean())


def _expected_hit(slots: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """P(a positive among the first ``slots`` of p positives and t negatives in uniform random order).

    That is 1 - C(t, m) / C(p + t, m) for 0 < m <= t; 0 for m <= 0; 1 for m > t.
    """
    m = slots.clamp(min=0.0)
    inner = (m > 0) & (m <= t)
    mi = torch.where(inner, m, torch.zeros_like(m))
    log_ratio = (
        torch.lgamma(t + 1)
        - torch.lgamma(t - mi + 1)
        - torch.lgamma(p + t + 1)
        + torch.lgamma(p + t - mi + 1)
    )
    hit = 1.0 - torch.exp(log_ratio)
    return torch.where(m > t, torch.ones_like(m), torch.where(inner, hit, torch.zeros_like(m)))


def _best_positive(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """(q,) highest positive score per row (-inf where a row has no positive in this block)."""
    return torch.where(positive, scores, float("-inf")).amax(dim=1)


def _count_around(
    scores: torch.Tensor, positive: torch.Tensor, best: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(greater, tied_negatives, tied_positives) per row; no positive scores above ``best``."""
    equal = scores == best[:, None]
    tied = equal.sum(dim=1)
    tied_positives = (equal & positive).sum(dim=1)
    return (scores > best[:, None]).sum(dim=1), tied - tied_positives, tied_positives


def candidate_rank_stats(
    scores: torch.Tensor, positive: torch.Tensor, op: str = "candidate_rank_stats"
) -> RankStats:
    """RankStats of a dense (Q, C) score matrix whose positives are marked by a (Q, C) bool mask; NaN or
    infinite scores raise ValueError naming ``op``."""
    if scores.shape != positive.shape or scores.dim() != 2 or positive.dtype != torch.bool:
        raise ValueError(
            "candidate_rank_stats: scores and positive must be (Q, C) tensors of equal shape, positive bool; "
            f"got {tuple(scores.shape)} and {positive.dtype} {tuple(positive.shape)}"
        )
    if scores.shape[0] and not bool(positive.any(dim=1).all()):
        raise ValueError("candidate_rank_stats: every query needs at least one positive candidate")
    finite = FiniteScores(op)
    finite.add(scores)
    finite.check()
    return RankStats(*_count_around(scores, positive, _best_positive(scores, positive)))


def check_labels(
    op: str,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    q: int,
    g: int,
    names: tuple[str, str] = ("query_labels", "gallery_labels"),
) -> None:
    """ValueError naming the tensor (by ``names``) unless both are integer tensors of shapes (q,) and (g,)
    and every query label occurs in the gallery."""
    for name, labels, n in ((names[0], query_labels, q), (names[1], gallery_labels, g)):
        if (
            not isinstance(labels, torch.Tensor)
            or labels.dtype.is_floating_point
            or labels.dtype == torch.bool
        ):
            raise ValueError(
                f"{op}: {name} must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}"
            )
        if labels.shape != (n,):
            raise ValueError(f"{op}: {name} must have shape ({n},), got {tuple(labels.shape)}")
    missing = ~torch.isin(query_labels, gallery_labels.to(query_labels.device))
    if bool(missing.any()):
        first = int(query_labels[missing][0])
        raise ValueError(
            f"{op}: {int(missing.sum())} queries have no positive in the gallery (e.g. label {first})"
        )


def _stats_rows(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    qlab: torch.Tensor,
    glab: torch.Tensor,
    cols: int,
    finite: FiniteScores,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if cols >= gallery.shape[0]:
        scores = finite.add(block_scores(queries, gallery))
        positive = qlab[:, None] == glab[None, :]
        return _count_around(scores, positive, _best_positive(scores, positive))
    best = torch.full(
        (queries.shape[0],), float("-inf"), dtype=score_dtype(queries.dtype), device=queries.device
    )
    for c0, c1, scores in score_blocks(queries, gallery, cols, finite):  # checked for NaN / Inf once, here
        best = torch.maximum(best, _best_positive(scores, qlab[:, None] == glab[None, c0:c1]))
        del scores
    totals = [torch.zeros(queries.shape[0], dtype=torch.int64, device=queries.device) for _ in range(3)]
    for c0, c1, scores in score_blocks(queries, gallery, cols):  # the same blocks, scored again
        counts = _count_around(scores, qlab[:, None] == glab[None, c0:c1], best)
        del scores
        totals = [a + b for a, b in zip(totals, counts)]
    return tuple(totals)


@torch.no_grad()
def gallery_rank_stats(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_labels: torch.Tensor,
    *,
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
    backend: str | None = None,
    op: str = "gallery_rank_stats",
    label_names: tuple[str, str] = ("query_labels", "gallery_labels"),
) -> RankStats:
    """RankStats of every query against the whole gallery; positives = gallery items with the query's label.

    Scores are computed block by block (at most one (rows, cols) score block, plus same-sized boolean
    masks, exists at a time; a gallery that fits in one column block is scored once, a wider one twice).
    Every query label must occur in ``gallery_labels``. ``backend="torch"`` scores the full matrix at once.
    Scores that overflow to NaN or Inf raise ValueError. ``op`` names the caller in error messages, and
    ``label_names`` the caller's names of the two label tensors.
    """
    chosen = resolve_backend(op, backend)
    check_embeddings(op, queries, gallery)
    check_labels(op, query_labels, gallery_labels, queries.shape[0], gallery.shape[0], label_names)
    rows, cols = resolve_block_size(op, block_size)
    qlab = query_labels.to(queries.device)
    glab = gallery_labels.to(queries.device)
    if chosen == "torch":
        rows, cols = max(queries.shape[0], 1), gallery.shape[0]
    finite = FiniteScores(op)
    parts = [
        _stats_rows(queries[r0:r1], gallery, qlab[r0:r1], glab, cols, finite)
        for r0, r1 in row_blocks(len(qlab), rows)
    ]
    finite.check()
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64, device=queries.device)
        return RankStats(empty, empty, empty)
    return RankStats(*(torch.cat([p[i] for p in parts]) for i in range(3)))
