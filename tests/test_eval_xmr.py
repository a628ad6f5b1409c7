"""XMR protocols against brute-force top-k computations on random embeddings."""

import math

import pytest
import torch
import torch.nn.functional as F

from famevil_fast.eval import sample_candidates, xmr_full, xmr_sampled
from famevil_fast.eval.candidates import distinct_below
from famevil_fast.eval.ranks import candidate_rank_stats


def _dataset(products=30, max_views=4, dim=16, subcategories=3, dtype=torch.float64):
    views = torch.randint(1, max_views + 1, (products,))
    product_ids = torch.arange(products) * 7 + 3  # ids need not be contiguous
    image_ids = product_ids.repeat_interleave(views)
    images = F.normalize(torch.randn(len(image_ids), dim, dtype=torch.float64), dim=1).to(dtype)
    texts = F.normalize(torch.randn(products, dim, dtype=torch.float64), dim=1).to(dtype)
    text_sub = torch.randint(0, subcategories, (products,))
    return images, image_ids, text_sub.repeat_interleave(views), texts, product_ids, text_sub


def _brute_full(images, image_ids, texts, text_ids, ks):
    scores = images.double() @ texts.double().T
    out = {}
    for k in ks:
        top = scores.topk(min(k, len(text_ids)), dim=1).indices
        out[f"i2t_r@{k}"] = 100 * (text_ids[top] == image_ids[:, None]).any(1).double().mean().item()
    for k in ks:
        top = scores.T.topk(min(k, len(image_ids)), dim=1).indices
        out[f"t2i_r@{k}"] = 100 * (image_ids[top] == text_ids[:, None]).any(1).double().mean().item()
    out["avg"] = sum(out.values()) / len(out)
    return out


@pytest.mark.parametrize("block", [(5, 7), (1000, 1000), (1, 3)])
def test_full_protocol_matches_brute_force(block):
    images, image_ids, _, texts, text_ids, _ = _dataset()
    result = xmr_full(images, image_ids, texts, text_ids, block_size=block, backend="blocked")
    expected = _brute_full(images, image_ids, texts, text_ids, (1, 5, 10))
    assert result.metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-9), key
    assert result.task == "xmr" and result.protocol == "full"
    assert result.details["num_views"] == len(image_ids) and result.details["num_products"] == len(text_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_protocol_low_precision(dtype):
    images, image_ids, _, texts, text_ids, _ = _dataset(dtype=dtype)
    result = xmr_full(images, image_ids, texts, text_ids, block_size=(8, 9))
    expected = _brute_full(images, image_ids, texts, text_ids, (1, 5, 10))
    for key, value in expected.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-9), key


def test_full_protocol_chance_levels_and_small_gallery():
    images, image_ids, _, texts, text_ids, _ = _dataset(products=4, max_views=3)
    result = xmr_full(images, image_ids, texts, text_ids, ks=(1, 2, 50))
    views = [(image_ids == t).sum().item() for t in text_ids]
    v = len(image_ids)
    assert result.chance["i2t_r@1"] == pytest.approx(100 / 4)
    assert result.chance["i2t_r@50"] == 100.0
    t2i_1 = 100 * sum(n / v for n in views) / 4
    t2i_2 = 100 * sum(1 - math.comb(v - n, 2) / math.comb(v, 2) for n in views) / 4
    assert result.chance["t2i_r@1"] == pytest.approx(t2i_1)
    assert result.chance["t2i_r@2"] == pytest.approx(t2i_2)
    assert result.metrics["i2t_r@50"] == 100.0 and result.metrics["t2i_r@50"] == 100.0


def test_one_product_one_view():
    image, text = F.normalize(torch.randn(1, 8), dim=1), F.normalize(torch.randn(1, 8), dim=1)
    result = xmr_full(image, torch.tensor([5]), text, torch.tensor([5]))
    assert all(v == 100.0 for v in result.metrics.values())


def test_any_view_rule():
    # product 0 has a bad view and a perfect view; the perfect one decides the t2i hit
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    result = xmr_full(images, torch.tensor([0, 0, 1]), texts, torch.tensor([0, 1]), ks=(1,))
    assert result.metrics["t2i_r@1"] == 100.0
    assert result.metrics["i2t_r@1"] == pytest.approx(100 * 2 / 3)


def test_full_protocol_bad_input():
    images, image_ids, _, texts, text_ids, _ = _dataset(products=5)
    with pytest.raises(ValueError, match="unique"):
        xmr_full(images, image_ids, texts, torch.tensor([3, 3, 17, 24, 31]))
    with pytest.raises(ValueError, match="without a text"):
        xmr_full(images, image_ids, texts[:4], text_ids[:4])
    with pytest.raises(ValueError, match="without an image view"):
        xmr_full(images, image_ids, torch.cat([texts, texts[:1]]), torch.cat([text_ids, torch.tensor([999])]))
    with pytest.raises(ValueError, match="shape"):
        xmr_full(images, image_ids[:-1], texts, text_ids)
    with pytest.raises(ValueError, match="ks"):
        xmr_full(images, image_ids, texts, text_ids, ks=(0,))


def _sampled_inputs():
    return _dataset(products=60, max_views=3, subcategories=2)


def test_sampled_protocol_is_reproducible():
    data = _sampled_inputs()
    kwargs = {"num_queries": 25, "num_negatives": 10, "repeats": 2}
    a = xmr_sampled(*data, seed=3, **kwargs)
    b = xmr_sampled(*data, seed=3, **kwargs)
    c = xmr_sampled(*data, seed=4, **kwargs)
    assert a.metrics == b.metrics and a.details == b.details
    assert a.details["per_repeat"] != c.details["per_repeat"]
    assert a.protocol == "sampled-10" and a.details["seed"] == 3
    assert a.chance["i2t_r@1"] == pytest.approx(100 / 11) and a.chance["t2i_r@10"] == pytest.approx(
        100 * 10 / 11
    )


def test_sampled_protocol_matches_brute_force_on_the_same_draws():
    images, image_ids, image_sub, texts, text_ids, text_sub = _sampled_inputs()
    result = xmr_sampled(
        images,
        image_ids,
        image_sub,
        texts,
        text_ids,
        text_sub,
        seed=7,
        num_queries=20,
        num_negatives=8,
        repeats=3,
    )
    generator = torch.Generator().manual_seed(7)
    sums = dict.fromkeys(result.metrics, 0.0)
    for _ in range(3):
        for name, (q, qids, qsub, g, gids, gsub) in {
            "i2t": (images, image_ids, image_sub, texts, text_ids, text_sub),
            "t2i": (texts, text_ids, text_sub, images, image_ids, image_sub),
        }.items():
            qi, cand, _ = sample_candidates(qids, qsub, gids, gsub, 20, 8, generator)
            scores = torch.stack([g[cand[row]].double() @ q[qi[row]].double() for row in range(len(qi))])
            rank = (scores[:, 1:] > scores[:, :1]).sum(1)
            for k in (1, 5, 10):
                sums[f"{name}_r@{k}"] += 100 * (rank < k).double().mean().item() / 3
    sums["avg"] = sum(v for key, v in sums.items() if key != "avg") / 6
    for key, value in sums.items():
        assert result.metrics[key] == pytest.approx(value, abs=1e-9), key


def test_sampler_draws_valid_candidates():
    query_ids = torch.arange(40)
    query_sub = torch.arange(40) % 4
    gallery_ids = torch.arange(40).repeat_interleave(2)  # two views per product
    gallery_sub = query_sub.repeat_interleave(2)
    generator = torch.Generator().manual_seed(0)
    gallery = (gallery_ids, gallery_sub)
    picked, cand, filled = sample_candidates(query_ids, query_sub, *gallery, 30, 12, generator)
    assert picked.unique().numel() == 30 and cand.shape == (30, 13) and filled == 0
    for q, row in zip(picked.tolist(), cand.tolist()):
        assert gallery_ids[row[0]] == q
        negatives = torch.tensor(row[1:])
        assert negatives.unique().numel() == 12
        assert (gallery_ids[negatives] != q).all() and (gallery_sub[negatives] == query_sub[q]).all()
    # a subcategory too small: every same-subcategory negative is used, the rest come from elsewhere
    picked, cand, filled = sample_candidates(query_ids, query_sub, *gallery, 5, 25, generator)
    assert filled == 5
    for q, row in zip(picked.tolist(), cand.tolist()):
        negatives = torch.tensor(row[1:])
        same = (gallery_sub[negatives] == query_sub[q]).sum().item()
        assert same == 18 and (gallery_ids[negatives] != q).all()


def test_sampled_rank_counts_ties_as_expected():
    scores = torch.tensor([[0.5, 0.5, 0.1]])
    positive = torch.tensor([[True, False, False]])
    assert candidate_rank_stats(scores, positive).recall(1) == pytest.approx(50.0)


def test_sampled_protocol_bad_input():
    images, image_ids, image_sub, texts, text_ids, text_sub = _sampled_inputs()
    with pytest.raises(ValueError, match="needs 100 negatives"):
        xmr_sampled(images, image_ids, image_sub, texts, text_ids, text_sub)
    with pytest.raises(ValueError, match="different subcategory"):
        xmr_sampled(images, image_ids, (image_sub + 1) % 2, texts, text_ids, text_sub, num_negatives=5)
    with pytest.raises(ValueError, match="repeats"):
        xmr_sampled(images, image_ids, image_sub, texts, text_ids, text_sub, num_negatives=5, repeats=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_full_protocol_on_cuda_matches_cpu():
    images, image_ids, _, texts, text_ids, _ = _dataset(products=200, dtype=torch.bfloat16)
    on_gpu = xmr_full(images.cuda(), image_ids.cuda(), texts.cuda(), text_ids.cuda(), block_size=(64, 96))
    on_cpu = xmr_full(images, image_ids, texts, text_ids)
    assert on_gpu.metrics == pytest.approx(on_cpu.metrics, abs=0.5)


def test_draws_are_uniform():
    generator = torch.Generator().manual_seed(1)
    sizes = torch.tensor([10, 4, 2] * 4000)
    draws, valid = distinct_below(sizes, 3, generator)
    assert valid[0::3].all() and valid[1::3].all() and valid[2::3, :2].all() and not valid[2::3, 2].any()
    for n, rows in ((10, draws[0::3]), (4, draws[1::3])):
        assert (rows.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct within a row
        share = torch.bincount(rows.flatten(), minlength=n).double() / len(rows)
        torch.testing.assert_close(share, torch.full((n,), 3 / n, dtype=torch.float64), rtol=0, atol=0.03)
    # the positive is a uniformly random view of the product
    gallery_ids, gallery_sub = torch.tensor([0, 0, 1, 2, 3]), torch.zeros(5, dtype=torch.long)
    ids = torch.zeros(2000, dtype=torch.long)
    _, cand, _ = sample_candidates(ids, ids, gallery_ids, gallery_sub, 2000, 3, generator)
    assert cand[:, 0].lt(2).all() and abs(cand[:, 0].double().mean().item() - 0.5) < 0.05
    assert torch.equal(cand[:, 1:].sort(dim=1).values, torch.tensor([[2, 3, 4]]).expand(2000, 3))


def test_overflowing_scores_raise():
    """Finite embeddings whose products overflow: query 0's positive scored NaN counted as a hit (66.7)."""
    images = torch.tensor([[1e20, 1e20], [0.0, 1.0], [1.0, 0.0]])
    texts = torch.tensor([[1e20, -1e20], [0.0, 1.0], [1.0, 0.0]])
    ids = torch.arange(3)
    with pytest.raises(ValueError, match="xmr_full i2t: some similarity scores .* NaN or infinite"):
        xmr_full(images, ids, texts, ids)
    with pytest.raises(ValueError, match="xmr_sampled i2t: some similarity scores .* NaN or infinite"):
        xmr_sampled(images, ids, ids * 0, texts, ids, ids * 0, num_negatives=2, num_queries=3)


def test_filled_queries_are_counted_once_over_the_repeats():
    """A subcategory too small for the negatives: its queries are counted once, not once per repeat."""
    products = torch.arange(40)
    sub = (products < 5).long()  # subcategory 1: 5 products, 4 negative texts or 8 negative views < 10
    views = products.repeat_interleave(2)
    images = F.normalize(torch.randn(80, 8, dtype=torch.float64), dim=1)
    texts = F.normalize(torch.randn(40, 8, dtype=torch.float64), dim=1)
    result = xmr_sampled(
        images, views, sub.repeat_interleave(2), texts, products, sub, num_negatives=10, repeats=5
    )
    assert result.details["i2t_queries_filled_from_other_subcategories"] == 10  # 5 products x 2 views
    assert result.details["t2i_queries_filled_from_other_subcategories"] == 5


def test_sampled_protocol_unseeded_uses_the_global_rng():
    """the official code's quirk the original drew from the global torch RNG; seed=None does too."""
    data = _sampled_inputs()
    kwargs = {"num_queries": 20, "num_negatives": 8, "repeats": 2}
    torch.manual_seed(7)
    unseeded = xmr_sampled(*data, seed=None, **kwargs)
    after = torch.rand(1)
    torch.manual_seed(7)
    torch.rand(1)  # the draws advanced the global RNG: the next number differs from the first
    assert not torch.equal(torch.rand(1), after)
    assert unseeded.metrics == xmr_sampled(*data, seed=7, **kwargs).metrics  # same stream as seed 7
    torch.manual_seed(8)
    assert xmr_sampled(*data, seed=None, **kwargs).details["per_repeat"] != unseeded.details["per_repeat"]
    assert unseeded.details["seed"] is None and "global" in unseeded.details["rng"]
    with pytest.raises(ValueError, match="seed must be an int or None"):
        xmr_sampled(*data, seed=1.5, **kwargs)


def test_full_protocol_duplicate_texts_tie():
    """Two products with the same text embedding (FashionGen colour variants share texts): the view's
    positive ties with the other product's text, which is a negative (positives are decided by product id)."""
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    image_ids, text_ids = torch.tensor([0, 2]), torch.tensor([0, 1, 2])
    # product 1 has no view here: give it one far from everything so it only acts as a gallery text
    images = torch.cat([images, torch.tensor([[-1.0, 0.0]])])
    image_ids = torch.cat([image_ids, torch.tensor([1])])
    expected = xmr_full(images, image_ids, texts, text_ids, ks=(1,))
    # view 0: positive tied with one negative -> 1/2; view 1: hit; view 2 (product 1, [-1, 0]): its text
    # scores -1 like product 0's, text 2 scores 0 above them -> 0
    assert expected.metrics["i2t_r@1"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    optimistic = xmr_full(images, image_ids, texts, text_ids, ks=(1,), ties="optimistic")
    pessimistic = xmr_full(images, image_ids, texts, text_ids, ks=(1,), ties="pessimistic")
    assert optimistic.metrics["i2t_r@1"] == pytest.approx(100 * 2 / 3)
    assert pessimistic.metrics["i2t_r@1"] == pytest.approx(100 * 1 / 3)
    # t2i: texts 0 and 1 are the same query; each is a hit only through its own product's view
    assert expected.metrics["t2i_r@1"] == pytest.approx(100 * 2 / 3)
