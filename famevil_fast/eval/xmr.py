"""Cross-modal retrieval (XMR, FashionGen): the full protocol and the sampled-100 protocol.

The two protocols give very different numbers for the same model; never compare across them.

- ``xmr_full`` (original metric name ``r@k_general``): every image VIEW is an item carrying its product
  id; there is one text per product. Image-to-text: each view queries all texts and is a hit at K when
  its product's text is in the top K. Text-to-image: each text queries all views and is a hit at K when
  ANY view of its product is in the top K (the best-ranked view decides). Computed block by block.
- ``xmr_sampled`` (``r@k_kaleido``, KaleidoBERT / FashionBERT style): ``num_queries`` random queries,
  each ranked among 1 random positive and ``num_negatives`` random negatives of the SAME subcategory
  (other products); repeated ``repeats`` times and averaged. Seeded by default (all sampling on the CPU
  with a ``torch.Generator``, so a seed gives the same candidates on every device); ``seed=None`` is the
  original's unseeded behaviour (draws from the global torch RNG, so results vary from run to run). The
  result's protocol is ``sampled-{num_negatives}``: ``Evaluator`` asks for fewer than 100 negatives, with a
  warning, when a small set cannot supply them (``famevil_fast.eval.runner.sampled_negatives``), and skips
  the protocol, with a warning, when the set has no negatives at all.

Both report R@1/5/10 in both directions and their average, in percent, with chance levels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from famevil_fast.eval.candidates import sample_candidates, short_of_negatives
from famevil_fast.eval.ranks import candidate_rank_stats, check_ks, check_ties, gallery_rank_stats
from famevil_fast.eval.report import TaskResult
from famevil_fast.eval.topk import DEFAULT_BLOCK_SIZE, BlockSize, check_embeddings, score_dtype

DEFAULT_KS = (1, 5, 10)


def _check_ids(op: str, name: str, ids: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{op}: {name} must be an integer tensor, got {getattr(ids, 'dtype', type(ids))}")
    if ids.shape != (n,):
        raise ValueError(f"{op}: {name} must have shape ({n},), got {tuple(ids.shape)}")
    return ids.to("cpu", torch.int64).contiguous()


def _check_products(op: str, image_ids: torch.Tensor, text_ids: torch.Tensor) -> None:
    if torch.unique(text_ids).numel() != text_ids.numel():
        raise ValueError(f"{op}: text_product_ids must be unique (one text per product)")
    orphan_views = ~torch.isin(image_ids, text_ids)
    if bool(orphan_views.any()):
        raise ValueError(
            f"{op}: {int(orphan_views.sum())} image views belong to products without a text "
            f"(e.g. product {int(image_ids[orphan_views][0])})"
        )
    textless = ~torch.isin(text_ids, image_ids)
    if bool(textless.any()):
        raise ValueError(
            f"{op}: {int(textless.sum())} texts belong to products without an image view "
            f"(e.g. product {int(text_ids[textless][0])})"
        )


def _directions(ks: Sequence[int]) -> list[str]:
    return [f"{d}_r@{k}" for d in ("i2t", "t2i") for k in ks]


def _with_average(values: dict[str, float]) -> dict[str, float]:
    return {**values, "avg": sum(values.values()) / len(values)}


def _any_view_chance(views_per_product: torch.Tensor, num_views: int, k: int) -> float:
    """Mean over texts of P(some view of the product is in the top k of a uniformly random ranking):
    1 - C(V - n, k) / C(V, k) for a product with n of the V views."""
    if k >= num_views:
        return 100.0
    v = torch.tensor(float(num_views), dtype=torch.float64)
    rest = v - views_per_product.double()
    some_room = rest >= k
    safe_rest = torch.where(some_room, rest, v)
    log_miss = (
        torch.lgamma(safe_rest + 1)
        - torch.lgamma(safe_rest - k + 1)
        - torch.lgamma(v + 1)
        + torch.lgamma(v - k + 1)
    )
    hit = torch.where(some_room, 1.0 - torch.exp(log_miss), torch.ones_like(rest))
    return 100.0 * float(hit.mean())


@torch.no_grad()
def xmr_full(
    image_embeds: torch.Tensor,
    image_product_ids: torch.Tensor,
    text_embeds: torch.Tensor,
    text_product_ids: torch.Tensor,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "expected",
    block_size: BlockSize = DEFAULT_BLOCK_SIZE,
    backend: str | None = None,
) -> TaskResult:
    """Full-gallery XMR (``r@k_general``): all V views against all P product texts, both directions.

    image_embeds (V, D) with image_product_ids (V,); text_embeds (P, D) with unique text_product_ids (P,).
    Every view's product needs a text and every text at least one view. Embeddings should be L2-normalised
    (scores are dot products). Metrics ``i2t_r@K``, ``t2i_r@K`` and ``avg`` (mean of them), in percent;
    ``ties`` as in ``famevil_fast.eval.ranks``; ``block_size`` / ``backend`` as in ``blocked_topk``.
    """
    op = "xmr_full"
    ks = check_ks(op, ks)
    check_ties(op, ties)
    check_embeddings(op, image_embeds, text_embeds, allow_empty_queries=False)
    image_ids = _check_ids(op, "image_product_ids", image_product_ids, image_embeds.shape[0])
    text_ids = _check_ids(op, "text_product_ids", text_product_ids, text_embeds.shape[0])
    _check_products(op, image_ids, text_ids)
    blocks = {"block_size": block_size, "backend": backend}
    i2t = gallery_rank_stats(image_embeds, text_embeds, image_ids, text_ids, op=f"{op} i2t", **blocks)
    t2i = gallery_rank_stats(text_embeds, image_embeds, text_ids, image_ids, op=f"{op} t2i", **blocks)
    metrics = {f"i2t_r@{k}": i2t.recall(k, ties) for k in ks}
    metrics.update({f"t2i_r@{k}": t2i.recall(k, ties) for k in ks})
    views_per_text = _count_views(text_ids, image_ids)
    num_views, num_products = image_embeds.shape[0], text_embeds.shape[0]
    chance = {f"i2t_r@{k}": 100.0 * min(k / num_products, 1.0) for k in ks}
    chance.update({f"t2i_r@{k}": _any_view_chance(views_per_text, num_views, k) for k in ks})
    details = {"num_views": num_views, "num_products": num_products, "ties": ties, "metric": "r@k_general"}
    return TaskResult("xmr", "full", _with_average(metrics), _with_average(chance), details)


def _count_views(text_ids: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """(P,) number of views of each text's product, without a P x V comparison."""
    products, counts = torch.unique(image_ids, return_counts=True)
    return counts[torch.searchsorted(products, text_ids)]


def _check_subcategories(
    op: str, image_ids: torch.Tensor, image_sub: torch.Tensor, text_ids: torch.Tensor, text_sub: torch.Tensor
) -> None:
    order = torch.argsort(text_ids)
    text_of_view = order[torch.searchsorted(text_ids[order], image_ids)]
    mismatch = text_sub[text_of_view] != image_sub
    if bool(mismatch.any()):
        view = int(torch.nonzero(mismatch)[0])
        raise ValueError(
            f"{op}: {int(mismatch.sum())} views have a different subcategory than their product's text "
            f"(e.g. view {view} of product {int(image_ids[view])})"
        )


def _candidate_stats(query_embeds, gallery_embeds, query_index, candidates, op: str, chunk: int = 256):
    device = query_embeds.device
    out_dtype = score_dtype(query_embeds.dtype)
    scores = []
    for start in range(0, len(query_index), chunk):
        qi = query_index[start : start + chunk].to(device)
        ci = candidates[start : start + chunk].to(device)
        q = query_embeds[qi].to(out_dtype)
        g = gallery_embeds[ci].to(out_dtype)
        scores.append(torch.einsum("qd,qcd->qc", q, g))
    scores = (
        torch.cat(scores) if scores else torch.zeros(0, candidates.shape[1], dtype=out_dtype, device=device)
    )
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[:, 0] = True
    return candidate_rank_stats(scores, positive, op)


def _filled_queries(drawn: torch.Tensor, direction: tuple, num_negatives: int) -> int:
    """Distinct queries, drawn in any repeat, whose candidate set was filled from other subcategories."""
    _, qids, qsub, _, gids, gsub = direction
    return int((drawn & short_of_negatives(qids, qsub, gids, gsub, num_negatives)).sum())


def _min_negatives_available(query_ids: torch.Tensor, gallery_ids: torch.Tensor) -> int:
    labels, counts = torch.unique(gallery_ids, return_counts=True)
    used = torch.isin(labels, query_ids)
    return len(gallery_ids) - int(counts[used].max())


@torch.no_grad()
def xmr_sampled(
    image_embeds: torch.Tensor,
    image_product_ids: torch.Tensor,
    image_subcategories: torch.Tensor,
    text_embeds: torch.Tensor,
    text_product_ids: torch.Tensor,
    text_subcategories: torch.Tensor,
    *,
    seed: int | None = 0,
    num_queries: int = 1000,
    num_negatives: int = 100,
    repeats: int = 5,
    ks: Sequence[int] = DEFAULT_KS,
    ties: str = "expected",
) -> TaskResult:
    """Sampled-100 XMR (``r@k_kaleido``): queries ranked among 1 positive + ``num_negatives`` same-subcategory
    negatives, ``repeats`` times, averaged. Image-to-text queries are views (the positive is the product's
    text); text-to-image queries are texts (the positive is ONE random view of the product; the product's
    other views are excluded from the candidates). Same inputs as ``xmr_full`` plus one subcategory id per
    view and per text (they must agree per product). ``seed`` fixes every draw (the default, 0); ``seed=None``
    reproduces the original's unseeded protocol: every draw comes from the global CPU torch RNG
    (``torch.default_generator``), so results vary run to run unless ``torch.manual_seed`` was called, and
    the global RNG state advances. With ``torch.manual_seed(s)`` beforehand, ``seed=None`` draws exactly
    what ``seed=s`` draws.
    """
    op = "xmr_sampled"
    ks = check_ks(op, ks)
    check_ties(op, ties)
    _check_sampling(op, seed, num_queries, num_negatives, repeats)
    check_embeddings(op, image_embeds, text_embeds, allow_empty_queries=False)
    v, p = image_embeds.shape[0], text_embeds.shape[0]
    image_ids = _check_ids(op, "image_product_ids", image_product_ids, v)
    text_ids = _check_ids(op, "text_product_ids", text_product_ids, p)
    image_sub = _check_ids(op, "image_subcategories", image_subcategories, v)
    text_sub = _check_ids(op, "text_subcategories", text_subcategories, p)
    _check_products(op, image_ids, text_ids)
    _check_subcategories(op, image_ids, image_sub, text_ids, text_sub)
    directions = {
        "i2t": (image_embeds, image_ids, image_sub, text_embeds, text_ids, text_sub),
        "t2i": (text_embeds, text_ids, text_sub, image_embeds, image_ids, image_sub),
    }
    _check_enough_negatives(op, directions, num_negatives)
    generator = _sampling_generator(seed)
    per_repeat, drawn = _sampled_repeats(
        op, directions, num_queries, num_negatives, generator, repeats=repeats, ks=ks, ties=ties
    )
    keys = _directions(ks)
    metrics = _with_average(_mean_over_repeats(per_repeat, keys))
    chance = _with_average(
        {key: 100.0 * min(int(key.split("@")[1]) / (1 + num_negatives), 1.0) for key in keys}
    )
    details = {
        "seed": seed,
        "rng": "seeded generator" if seed is not None else "global torch RNG (unseeded, as the original)",
        "num_queries_i2t": min(num_queries, v),
        "num_queries_t2i": min(num_queries, p),
        "num_negatives": num_negatives,
        "repeats": repeats,
        "ties": ties,
        "metric": "r@k_kaleido",
        **{
            f"{name}_queries_filled_from_other_subcategories": _filled_queries(drawn[name], d, num_negatives)
            for name, d in directions.items()
        },
        "per_repeat": per_repeat,
    }
    return TaskResult("xmr", f"sampled-{num_negatives}", metrics, chance, details)


def _check_sampling(op: str, seed: int | None, num_queries: int, num_negatives: int, repeats: int) -> None:
    """ValueError unless ``num_queries`` and ``repeats`` are ints >= 1, ``num_negatives`` an int >= 0 and
    ``seed`` an int or None."""
    for name, value, low in (
        ("num_queries", num_queries, 1),
        ("num_negatives", num_negatives, 0),
        ("repeats", repeats, 1),
    ):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{op}: {name} must be an int >= {low}, got {value!r}")
    check_sampled_seed(seed, f"{op}: seed")


XMR_PROTOCOLS = ("full", "sampled")  # the whole gallery; 100 candidates (1 positive, 99 negatives)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


def check_sampled_seed(seed: object, name: str) -> None:
    """ValueError naming ``name`` unless ``seed`` is None (the original's unseeded draws) or an int that a
    torch generator takes (``SEED_RANGE``)."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"{name} must be an int or None (the original's unseeded draws), got {seed!r}")
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ValueError(f"{name} must lie from -2**63 to 2**64 - 1 (a torch generator's seeds), got {seed}")


def _check_enough_negatives(op: str, directions: dict[str, tuple], num_negatives: int) -> None:
    """ValueError naming the direction where some query has fewer than ``num_negatives`` gallery items of
    other products."""
    for name, (_, qids, _, _, gids, _) in directions.items():
        available = _min_negatives_available(qids, gids)
        if available < num_negatives:
            raise ValueError(
                f"{op}: {name} needs {num_negatives} negatives per query but some query has only {available} "
                "gallery items of other products"
            )


def _sampling_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``; for None the global one (the original's unseeded draws)."""
    if seed is None:
        return torch.default_generator
    return torch.Generator(device="cpu").manual_seed(seed)


def _sampled_repeats(
    op: str,
    directions: dict[str, tuple],
    num_queries: int,
    num_negatives: int,
    generator: torch.Generator,
    *,
    repeats: int,
    ks: Sequence[int],
    ties: str,
) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    """(the recalls of every repeat, with their average; per direction, which queries some repeat drew)."""
    drawn = {name: torch.zeros(len(d[1]), dtype=torch.bool) for name, d in directions.items()}
    per_repeat = []
    for _ in range(repeats):
        current = {}
        for name, (q_emb, qids, qsub, g_emb, gids, gsub) in directions.items():
            qi, cand, _ = sample_candidates(qids, qsub, gids, gsub, num_queries, num_negatives, generator)
            drawn[name][qi] = True
            stats = _candidate_stats(q_emb, g_emb, qi, cand, f"{op} {name}")
            current.update({f"{name}_r@{k}": stats.recall(k, ties) for k in ks})
        per_repeat.append(_with_average(current))
    return per_repeat, drawn


def _mean_over_repeats(per_repeat: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    """The mean of each of ``keys`` over the repeats, summed in repeat order."""
    sums = dict.fromkeys(keys, 0.0)
    for current in per_repeat:
        for key in sums:
            sums[key] += current[key]
    return {key: total / len(per_repeat) for key, total in sums.items()}
