"""Candidate sets of the sampled retrieval protocol: per query, one random positive and random negatives
of the same subcategory, drawn on the CPU from a seeded ``torch.Generator``.

The gallery is sorted by (subcategory, id), so a query's same-subcategory pool is one contiguous range with
a hole (its own id's items), and the other subcategories are everything outside that range. Drawing k
distinct items of a pool of n then takes random keys over n slots and keeps the k smallest: a uniformly
random subset, at a cost of (queries x largest pool) random numbers, never (queries x gallery) unless the
pool must be filled from other subcategories.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 22


def distinct_below(
    sizes: torch.Tensor, k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row i, up to k distinct uniform draws from range(sizes[i]).

    Returns (draws (R, k) int64, valid (R, k) bool); a row with sizes[i] < k has its sizes[i] valid draws
    first and invalid padding after.
    """
    rows = sizes.shape[0]
    draws = torch.zeros(rows, k, dtype=torch.int64)
    valid = torch.zeros(rows, k, dtype=torch.bool)
    width = int(sizes.max()) if rows else 0
    if k == 0 or width == 0:
        return draws, valid
    take = min(k, width)
    step = max(1, _CHUNK_ELEMENTS // width)
    slots = torch.arange(width)
    for r0 in range(0, rows, step):
        n = sizes[r0 : r0 + step, None]
        keys = torch.rand(n.shape[0], width, generator=generator, dtype=torch.float64)
        keys.masked_fill_(slots[None, :] >= n, float("inf"))
        picked = keys.topk(take, dim=1, largest=False).indices
        draws[r0 : r0 + step, :take] = picked
        valid[r0 : r0 + step, :take] = picked < n
    return draws, valid


def _skip_hole(index: torch.Tensor, start: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Map an index over a range with the hole [start, start + length) removed back to the full range."""
    return torch.where(index >= start, index + length, index)


class SortedGallery:
    """Gallery items sorted by (subcategory, id), with range look-ups for queries."""

    def __init__(self, ids: torch.Tensor, subcategories: torch.Tensor):
        self.id_low, id_span = int(ids.min()), int(ids.max()) - int(ids.min()) + 1
        self.sub_low, sub_span = (
            int(subcategories.min()),
            int(subcategories.max()) - int(subcategories.min()) + 1,
        )
        if sub_span * id_span >= 2**62:
            raise ValueError(
                "sample_candidates: ids and subcategory ids span too wide a range to sort jointly"
            )
        self.id_span = id_span
        self.order = torch.argsort(self._key(subcategories, ids), stable=True)
        self.sub = subcategories[self.order].contiguous()
        self.keys = self._key(self.sub, ids[self.order]).contiguous()
        self.size = len(ids)

    def _key(self, sub: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return (sub - self.sub_low) * self.id_span + (ids - self.id_low)

    def subcategory_range(self, sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.searchsorted(self.sub, sub), torch.searchsorted(self.sub, sub, right=True)

    def id_range(self, sub: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Range of the items with this (subcategory, id)."""
        key = self._key(sub, ids)
        return torch.searchsorted(self.keys, key), torch.searchsorted(self.keys, key, right=True)


def sample_candidates(
    query_ids: torch.Tensor,
    query_subcategories: torch.Tensor,
    gallery_ids: torch.Tensor,
    gallery_subcategories: torch.Tensor,
    num_queries: int,
    num_negatives: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Draw queries and their candidate sets for the sampled protocol (all on the CPU, int64 inputs).

    Returns (query_index (n,), candidates (n, 1 + num_negatives) gallery indices with the positive in
    column 0, filled): n = min(num_queries, number of queries), drawn without replacement; the positive is
    a uniformly random gallery item with the query's id; negatives are drawn without replacement among the
    gallery items of the same subcategory and another id. When that pool holds fewer than
    ``num_negatives`` items, all of them are used and the rest are drawn without replacement from the other
    subcategories; ``filled`` counts the queries concerned. Every query id must occur in the gallery, and
    an id's items must share one subcategory.
    """
    picked = torch.randperm(len(query_ids), generator=generator)[:num_queries]
    gallery = SortedGallery(gallery_ids, gallery_subcategories)
    sub, ids = query_subcategories[picked], query_ids[picked]
    sub_start, sub_end = gallery.subcategory_range(sub)
    id_start, id_end = gallery.id_range(sub, ids)
    own = id_end - id_start
    positive = id_start + (torch.rand(len(picked), generator=generator, dtype=torch.float64) * own).long()

    pool = sub_end - sub_start - own  # same subcategory, other ids
    same, _ = distinct_below(pool, num_negatives, generator)
    same = sub_start[:, None] + _skip_hole(same, (id_start - sub_start)[:, None], own[:, None])
    short = pool < num_negatives
    negatives = same
    if bool(short.any()):
        rest = torch.where(short, gallery.size - (sub_end - sub_start), torch.zeros_like(pool))
        other, _ = distinct_below(rest, num_negatives, generator)
        other = _skip_hole(other, sub_start[:, None], (sub_end - sub_start)[:, None])
        slot = torch.arange(num_negatives)[None, :]
        from_other = other.gather(1, (slot - pool[:, None]).clamp(min=0))
        negatives = torch.where(slot >= pool[:, None], from_other, same)
    candidates = gallery.order[torch.cat([positive[:, None], negatives], dim=1)]
    return picked, candidates, int(short.sum())


def short_of_negatives(
    query_ids: torch.Tensor,
    query_subcategories: torch.Tensor,
    gallery_ids: torch.Tensor,
    gallery_subcategories: torch.Tensor,
    num_negatives: int,
) -> torch.Tensor:
    """(Q,) bool: whether a query's same-subcategory pool (gallery items of its subcategory and another id)
    holds fewer than ``num_negatives`` items, so that ``sample_candidates`` fills its candidate set from
    other subcategories whenever the query is drawn."""
    gallery = SortedGallery(gallery_ids, gallery_subcategories)
    sub_start, sub_end = gallery.subcategory_range(query_subcategories)
    id_start, id_end = gallery.id_range(query_subcategories, query_ids)
    return sub_end - sub_start - (id_end - id_start) < num_negatives
