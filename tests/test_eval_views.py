"""Views per product in SCR, FIC and the XMR image side (the official code's quirk every view by
default, the first view only as the alternative), and the category-level SCR scores built from the dataset's
subcategory -> category mapping (section 8, mmf#14)."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import EmbeddingStub
from test_data_fixtures import fashiongen_row, noise_image, synthetic

from famevil_fast.data import build_eval_sets
from famevil_fast.data.eval_sets import CapEval, SCREval, XMREval
from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.eval import TaskResult
from famevil_fast.eval import runner as runner_module
from famevil_fast.eval.runner import EvalOptions, Evaluator, evaluate_cap, evaluate_scr, evaluate_xmr

S = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic(tmp_path_factory)


def _paths(batches):
    return [p for (p,) in batches.table.images["pixels"]]


def test_first_view_sets_hold_one_view_per_product(data):
    products = read_fashiongen(data, "val")
    n_views = sum(len(p.images) for p in products)
    assert n_views > len(products)  # some products have several views: the two forms differ
    first = [p.images[0] for p in products]
    kwargs = {"image_size": S, "backend": "pil", "device": "cpu", "batch_size": 8}
    for task in ("itc", "scr", "cap"):
        every = build_eval_sets(task, data, **kwargs)
        one = build_eval_sets(task, data, views="first", **kwargs)
        assert (every.views, one.views) == ("all", "first")
        a, b = (every.images, one.images) if task == "itc" else (every.samples, one.samples)
        assert a.num_samples == n_views and b.num_samples == len(products)
        assert _paths(b) == first
        assert b.table.fields["product_ids"].tolist() == [p.id for p in products]
        if task == "scr":
            assert b.table.fields["labels"].tolist() == [p.subcategory_id for p in products]
        if task == "cap":
            assert one.references == [p.text for p in products]
        if task == "itc":  # the text side is one text per product either way
            assert torch.equal(every.texts["input_ids"], one.texts["input_ids"])
            assert one.texts["product_ids"].tolist() == [p.id for p in products]
        pixels = torch.cat([batch["pixels"] for batch in b])
        assert pixels.shape[0] == len(products)
    with pytest.raises(ValueError, match=r"views must be one of \('all', 'first'\)"):
        build_eval_sets("scr", data, views="some", **kwargs)


class Stub(EmbeddingStub):
    """Embeddings are the pixels (one number per sample); logits are one-hot of the label the pixels hold."""

    def classify(self, pixels, input_ids):
        return F.one_hot(pixels[:, 0].long(), 6).float()

    def caption(self, pixels, max_len, num_beams, no_repeat_ngram, cuda_graph, compiled):
        return ["a dress"] * pixels.shape[0]


def _scr_batches(labels, predicted):
    pixels = torch.tensor(predicted, dtype=torch.float32)[:, None]
    return [{"pixels": pixels, "input_ids": torch.zeros(len(labels), 3), "labels": torch.tensor(labels)}]


@pytest.fixture
def scored(monkeypatch):
    def fake_fic_result(predictions, references, *, metrics=None):
        return TaskResult("fic", "coco-caption", {"bleu4": 0.0}, {"bleu4": None}, {})

    monkeypatch.setattr(runner_module, "fic_result", fake_fic_result)


def test_every_result_reports_its_views_and_a_mismatch_is_refused(scored):
    scr = SCREval(_scr_batches([0, 1, 2], [0, 1, 1]), views="first")
    xmr = XMREval(
        [{"pixels": torch.eye(3), "product_ids": torch.arange(3), "subcategory": torch.zeros(3).long()}],
        {"input_ids": torch.eye(3), "product_ids": torch.arange(3), "subcategory": torch.zeros(3).long()},
        [],
        views="first",
    )
    cap = CapEval(
        [{"pixels": torch.zeros(2, 1), "input_ids": torch.zeros(2, 77).long()}], ["a", "b"], "first"
    )
    first = EvalOptions(views="first", xmr_protocols=("full", "sampled"))
    results = (
        evaluate_scr(Stub(), scr, first) + evaluate_xmr(Stub(), xmr, first) + evaluate_cap(Stub(), cap, first)
    )
    assert [r.protocol for r in results] == ["val", "full", "sampled-2", "coco-caption"]
    for r in results:
        assert r.details["views"] == "first" and r.details["eval_resize"] == "keep_aspect"
    for evaluate, data in ((evaluate_scr, scr), (evaluate_xmr, xmr), (evaluate_cap, cap)):
        with pytest.raises(ValueError, match=r"built with views='first' but the options ask for 'all'"):
            evaluate(Stub(), data, EvalOptions())
    every = SCREval(_scr_batches([0, 1, 2], [0, 1, 1]))
    (result,) = evaluate_scr(Stub(), every, EvalOptions())
    assert result.details["views"] == "all"
    with pytest.raises(ValueError, match="eval_resize='keep_aspect' but the options ask for 'squash'"):
        evaluate_scr(Stub(), every, EvalOptions(eval_resize="squash"))


def test_evaluator_scores_one_view_per_product_end_to_end(data):
    """A real (micro) model through Evaluator.build: with views=first the SCR samples and the XMR image
    items are the products; by default they are the views."""
    from famevil_fast.model import FameViL, FameViLConfig, clip_preset

    model = FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8))
    products = read_fashiongen(data, "val")
    n_views = sum(len(p.images) for p in products)
    for views, n in (("first", len(products)), ("all", n_views)):
        options = EvalOptions(views=views, xmr_protocols=("full",))
        evaluator = Evaluator.build(data, ["itc", "scr"], S, 16, "cpu", "pil", options=options)
        xmr, scr = evaluator.report(model).results
        assert xmr.details["num_views"] == n and xmr.details["views"] == views
        assert scr.details["num_samples"] == n and scr.details["views"] == views
        assert {"category_accuracy", "category_macro_f1"} <= set(scr.metrics)
        assert scr.chance["category_accuracy"] is not None


# ---------------------------------------------------------------- categories (mmf#14)


def test_scr_set_carries_the_subcategory_to_category_mapping(data):
    products = read_fashiongen(data, "val")
    scr = build_eval_sets("scr", data, image_size=S, backend="pil", device="cpu")
    assert scr.categories == {p.subcategory_id: p.category_id for p in products}
    assert scr.category_note is None


def _fashiongen(root, rows):
    (root / "FashionGen").mkdir(parents=True)
    for row in rows:
        for view in row["images"]:
            noise_image(root / "FashionGen" / view, 20, 16, seed=row["id"])
    (root / "FashionGen" / "val_info.json").write_text(json.dumps(rows))
    return root


def _row(pid, sub, cat=None, views=1):
    return fashiongen_row(pid, [f"val/{pid}_{v}.png" for v in range(views)], sub, cat)


def test_a_subcategory_in_two_categories_is_named_and_skips_only_the_category_scores(tmp_path):
    root = _fashiongen(tmp_path, [_row(1, 4, 0), _row(2, 5, 0), _row(3, 4, 2)])
    scr = build_eval_sets("scr", root, image_size=S, backend="pil", device="cpu")
    assert scr.categories is None
    assert "subcategory 4 maps to several categories: 0 (product 1) and 2 " in scr.category_note


def test_rows_without_category_ids_skip_the_category_scores_with_a_note(tmp_path):
    root = _fashiongen(tmp_path, [_row(1, 0, 3, views=2), _row(2, 1), _row(3, 2)])
    scr = build_eval_sets("scr", root, image_size=S, backend="pil", device="cpu")
    assert scr.categories is None and "2 of 3 products" in scr.category_note
    assert "no category_id (product 2, ...)" in scr.category_note

    class Classifier(Stub):
        def classify(self, pixels, input_ids):
            return torch.zeros(pixels.shape[0], 6)

    (result,) = evaluate_scr(Classifier(), scr, EvalOptions())
    assert set(result.metrics) == {"accuracy", "macro_f1"}
    assert result.details["category_metrics"].startswith("skipped: 2 of 3 products of fashiongen val")
    assert result.details["num_samples"] == 4  # every view
