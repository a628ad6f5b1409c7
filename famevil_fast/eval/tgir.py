"""Text-guided image retrieval (TGIR, FashionIQ): Recall@10 / @50 per garment category and their averages.

Per category, each query is a composed embedding (reference image + modification text) with the id of
its target image; the gallery holds every unique target id of that category's validation entries,
including the filler rows that only exist to put the remaining split images into the gallery (use
``unique_gallery`` to build it). A query is a hit at K when its target is among the top K gallery images.
The reference image itself stays in the gallery (standard FashionIQ validation protocol).

Metrics (original name ``r@k_fashioniq``): ``<category>_r@10``, ``<category>_r@50``, ``avg_r@10``,
``avg_r@50`` and ``avg`` = the mean of the per-category numbers (the mean of 6 for FashionIQ), in percent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from famevil_fast.eval.ranks import RankStats, check_ks, check_ties, gallery_rank_stats
from famevil_fast.eval.report import TaskResult
from famevil_fast.eval.topk import DEFAULT_BLOCK_SIZE, BlockSize, check_embeddings

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
DEFAULT_KS = (10, 50)


class TgirCategory(NamedTuple):
    """One category: queries (Q, D) with their target ids (Q,); gallery (G, D) with unique ids (G,)."""

    query_embeds: torch.Tensor
    target_ids: torch.Tensor
    gallery_embeds: torch.Tensor
    gallery_ids: torch.Tensor


def unique_gallery(
    target_embeds: torch.Tensor, target_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the first row of every distinct target id; returns (embeds (G, D), ids (G,)) sorted by id."""
    if target_embeds.dim() != 2 or target_ids.shape != (target_embeds.shape[0],):
        raise ValueError(
            f"unique_gallery: expected embeds (N, D) and ids (N,), got {tuple(target_embeds.shape)} and "
            f"{tuple(target_ids.shape)}"
        )
    ids = target_ids.to(target_embeds.device)
    order = torch.argsort(ids, stable=True)
    sorted_ids = ids[order]
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    keep = order[first]
    return target_embeds[keep], ids[keep]


def tgir_category_stats(
    data: TgirCategory,
    *,
    op: str = "tgir_recall",
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
    backend: str | None = None,
) -> RankStats:
    check_embeddings(op, data.query_embeds, data.gallery_embeds)
    ids = data.gallery_ids
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"{op}: gallery_ids must be a 1-D integer tensor")
    if torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"{op}: gallery_ids must be unique (build the gallery with unique_gallery)")
    return gallery_rank_stats(
        data.query_embeds,
        data.gallery_embeds,
        data.target_ids,
        ids,
        block_size=block_size,
        backend=backend,
        op=op,
        label_names=("target_ids", "gallery_ids"),
    )


@torch.no_grad()
def tgir_recall(
    data: TgirCategory,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "expected",
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
    backend: str | None = None,
) -> dict[str, float]:
    """Recall@K (percent) of one category's queries against its gallery: {"r@10": ..., "r@50": ...}."""
    ks = check_ks("tgir_recall", ks)
    check_ties("tgir_recall", ties)
    stats = tgir_category_stats(data, block_size=block_size, backend=backend)
    return {f"r@{k}": stats.recall(k, ties) for k in ks}


@torch.no_grad()
def tgir_fashioniq(
    categories: Mapping[str, TgirCategory],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "expected",
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
    backend: str | None = None,
) -> TaskResult:
    """FashionIQ TGIR over ``categories`` (name -> TgirCategory, e.g. dress, shirt, toptee), in that order."""
    op = "tgir_fashioniq"
    ks = check_ks(op, ks)
    check_ties(op, ties)
    if not categories:
        raise ValueError(f"{op}: no categories given")
    metrics: dict[str, float] = {}
    chance: dict[str, float] = {}
    details: dict[str, object] = {"ties": ties, "metric": "r@k_fashioniq"}
    for name, data in categories.items():
        if not isinstance(data, TgirCategory):
            if not isinstance(data, Sequence) or len(data) != len(TgirCategory._fields):
                raise ValueError(
                    f"{op}: category {name!r} must be a TgirCategory ({', '.join(TgirCategory._fields)}), "
                    f"got {type(data).__name__}"
                    + (f" of {len(data)} items" if isinstance(data, Sequence) else "")
                )
            data = TgirCategory(*data)
        if data.query_embeds.shape[0] == 0:
            raise ValueError(f"{op}: category {name!r} has no queries")
        stats = tgir_category_stats(data, op=f"{op}[{name}]", block_size=block_size, backend=backend)
        size = data.gallery_embeds.shape[0]
        for k in ks:
            metrics[f"{name}_r@{k}"] = stats.recall(k, ties)
            chance[f"{name}_r@{k}"] = 100.0 * min(k / size, 1.0)
        details[f"{name}_queries"] = data.query_embeds.shape[0]
        details[f"{name}_gallery"] = size
    per_category = dict(metrics)
    for values in (metrics, chance):
        for k in ks:
            column = [values[f"{name}_r@{k}"] for name in categories]
            values[f"avg_r@{k}"] = sum(column) / len(column)
        values["avg"] = sum(values[key] for key in per_category) / len(per_category)
    return TaskResult("tgir", "fashioniq-val", metrics, chance, details)
