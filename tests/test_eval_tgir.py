"""FashionIQ TGIR recall against brute-force top-k, gallery building, averages and errors."""

import pytest
import torch
import torch.nn.functional as F

from famevil_fast.eval import FASHIONIQ_CATEGORIES, TgirCategory, tgir_fashioniq, tgir_recall, unique_gallery


def _category(queries=25, gallery=70, dim=12, dtype=torch.float64):
    gallery_ids = torch.randperm(1000)[:gallery]
    targets = gallery_ids[torch.randint(0, gallery, (queries,))]  # several queries may share a target
    embed = lambda n: F.normalize(torch.randn(n, dim, dtype=torch.float64), dim=1).to(dtype)
    return TgirCategory(embed(queries), targets, embed(gallery), gallery_ids)


def _brute_recall(data, k):
    scores = data.query_embeds.double() @ data.gallery_embeds.double().T
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return 100 * (data.gallery_ids[top] == data.target_ids[:, None]).any(1).double().mean().item()


@pytest.mark.parametrize("block", [(4, 9), (1, 1), (512, 512)])
def test_category_recall_matches_brute_force(block):
    data = _category()
    result = tgir_recall(data, ks=(1, 10, 50), block_size=block, backend="blocked")
    for k in (1, 10, 50):
        assert result[f"r@{k}"] == pytest.approx(_brute_recall(data, k), abs=1e-9)


def test_fashioniq_table_and_averages():
    categories = {
        name: _category(queries=10 + i, gallery=40 + 20 * i) for i, name in enumerate(FASHIONIQ_CATEGORIES)
    }
    result = tgir_fashioniq(categories, block_size=(3, 11))
    per_category = []
    for name, data in categories.items():
        for k in (10, 50):
            value = _brute_recall(data, k)
            per_category.append(value)
            assert result.metrics[f"{name}_r@{k}"] == pytest.approx(value, abs=1e-9)
            assert result.chance[f"{name}_r@{k}"] == pytest.approx(100 * min(k / len(data.gallery_ids), 1))
    assert result.metrics["avg_r@10"] == pytest.approx(sum(per_category[0::2]) / 3)
    assert result.metrics["avg_r@50"] == pytest.approx(sum(per_category[1::2]) / 3)
    assert result.metrics["avg"] == pytest.approx(sum(per_category) / 6)
    assert list(result.metrics)[:2] == ["dress_r@10", "dress_r@50"]
    assert result.details["shirt_gallery"] == 60


def test_single_query_and_gallery_smaller_than_k():
    data = _category(queries=1, gallery=7)
    assert tgir_recall(data) == {"r@10": 100.0, "r@50": 100.0}


def test_unique_gallery_keeps_first_occurrence():
    embeds = torch.arange(12.0).reshape(6, 2)
    ids = torch.tensor([5, 2, 5, 9, 2, 1])
    gallery, gallery_ids = unique_gallery(embeds, ids)
    assert gallery_ids.tolist() == [1, 2, 5, 9]
    assert gallery[:, 0].tolist() == [10.0, 2.0, 0.0, 6.0]


def test_bad_input():
    data = _category(queries=3, gallery=5)
    with pytest.raises(ValueError, match="unique"):
        tgir_recall(data._replace(gallery_ids=torch.tensor([1, 1, 2, 3, 4])))
    with pytest.raises(ValueError, match="no positive in the gallery"):
        tgir_recall(data._replace(target_ids=torch.tensor([-1, -2, -3])))
    with pytest.raises(ValueError, match="no categories"):
        tgir_fashioniq({})
    with pytest.raises(ValueError, match="no queries"):
        tgir_fashioniq(
            {"dress": data._replace(query_embeds=data.query_embeds[:0], target_ids=data.target_ids[:0])}
        )


def test_errors_name_the_category():
    data = _category(queries=3, gallery=5)
    with pytest.raises(ValueError, match=r"tgir_fashioniq\[shirt\]: 1 queries have no positive"):
        tgir_fashioniq(
            {"dress": data, "shirt": data._replace(target_ids=torch.tensor([-1, *data.target_ids[1:]]))}
        )
    with pytest.raises(ValueError, match="tgir_recall: 3 queries have no positive"):
        tgir_recall(data._replace(target_ids=torch.tensor([-1, -2, -3])))


def test_errors_use_the_category_s_field_names():
    data = _category(queries=3, gallery=5)
    with pytest.raises(
        ValueError, match=r"tgir_fashioniq: category 'dress' must be a TgirCategory .* of 3 items"
    ):
        tgir_fashioniq({"dress": tuple(data)[:3]})
    with pytest.raises(ValueError, match=r"tgir_recall: target_ids must be an integer tensor"):
        tgir_recall(data._replace(target_ids=data.target_ids.double()))
    with pytest.raises(ValueError, match=r"tgir_recall: gallery_ids must have shape \(5,\)"):
        tgir_recall(data._replace(gallery_ids=torch.arange(6)))
    assert tgir_fashioniq({"dress": tuple(data)}).metrics == tgir_fashioniq({"dress": data}).metrics


def test_overflowing_scores_raise():
    data = _category(queries=3, gallery=5, dtype=torch.float32)
    queries = data.query_embeds.clone()
    queries[0] = 1e20
    gallery = data.gallery_embeds.clone()
    gallery[:, 0], gallery[:, 1] = 1e20, -1e20
    with pytest.raises(ValueError, match=r"tgir_fashioniq\[dress\]: some similarity scores .* NaN"):
        tgir_fashioniq({"dress": data._replace(query_embeds=queries, gallery_embeds=gallery)})
