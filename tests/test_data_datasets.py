"""Which datasets a data root holds (one split file is never read as two datasets), the one image-list check
every product reader shares, the per-dataset facts kept in one registry, and the category mapping of the SCR
evaluation set when a subcategory lies in two categories."""

import json

import pytest
import torch
from test_data_fixtures import fashiongen_row, noise_image

from famevil_fast.data import attributes, cache, fashionall, tasks
from famevil_fast.data.cache import build_cache, dataset_image_keys
from famevil_fast.data.eval_sets import build_eval_sets, subcategory_categories
from famevil_fast.data.fashion200k import FORMAT as FASHION200K
from famevil_fast.data.fashion200k import read_fashion200k
from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.data.polyvore import read_polyvore_outfits
from famevil_fast.data.records import Product
from famevil_fast.eval.runner import EvalOptions, evaluate_scr

S = 16


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))


def _fg_row(pid, sub=0, cat=None, images=None):
    return fashiongen_row(pid, [f"{pid}_0.png"] if images is None else images, sub, cat)


# ------------------------------------------------------- a dataset directory not named like one


def test_a_fashiongen_directory_of_another_name_is_read_as_fashiongen_only(tmp_path):
    root = tmp_path / "fg"
    _write(root / "train_info.json", [_fg_row(1)])
    noise_image(root / "train" / "1_0.png", 12, 10)
    assert tasks.product_datasets_under(root) == ["fashiongen"]
    assert [(d, s) for d, s, _ in cache.dataset_splits(root)] == [("fashiongen", "train")]
    assert dataset_image_keys(root) == ["train/1_0.png"]
    summary = build_cache(root, tmp_path / "cache", num_threads=1, tokenize=False)
    assert not summary.failed


def test_a_fashion200k_directory_of_another_name_is_read_as_fashion200k_only(tmp_path):
    root = tmp_path / "f200k"
    _write(root / "test_info.json", [{"images": ["a.jpg"], "id": 3, "title": "Red dress"}])
    assert tasks.product_datasets_under(root) == ["fashion200k"]
    assert dataset_image_keys(root) == ["images/a.jpg"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tasks.product_datasets_under(empty) == ["fashiongen"]  # the documented default


# ------------------------------------------------------- one image-list check for every reader


@pytest.mark.parametrize("images", [[""], ["a.png", ""], []])
def test_every_product_reader_refuses_an_empty_image_path(tmp_path, images):
    _write(tmp_path / "FashionGen" / "train_info.json", [_fg_row(1, images=images)])
    with pytest.raises(ValueError, match=r"train_info\.json: entry 0 \(id 1\) has no image path"):
        read_fashiongen(tmp_path, "train")
    _write(
        tmp_path / "PolyvoreOutfits" / "train_info.json",
        [{"images": images, "id": 1, "title": "t", "description": "d"}],
    )
    with pytest.raises(ValueError, match=r"train_info\.json: entry 0 \(id 1\) has no image path"):
        read_polyvore_outfits(tmp_path, "train")
    _write(
        tmp_path / "PolyvoreOutfits" / "val_info.json",
        [{"images": "", "id": 2, "title": "t", "description": "d"}],
    )
    with pytest.raises(
        ValueError, match=r"entry 0 \(id 2\) has no image path \(images holds an empty path\)"
    ):
        read_polyvore_outfits(tmp_path, "val")


# ------------------------------------------------------- the per-dataset facts in one registry


def test_the_per_dataset_facts_come_from_one_registry():
    from famevil_fast.data import registry

    assert registry.PRODUCT_DATASETS == ("fashiongen", "fashion200k", "polyvoreoutfits", "bigfacad")
    assert fashionall.UNION_DATASETS is registry.PRODUCT_DATASETS is tasks.PRODUCT_DATASETS
    assert fashionall.NAME is registry.UNION is attributes.UNION and tasks.ITC_DATASETS[-1] is registry.UNION
    assert fashionall.DIRECTORIES is registry.DIRECTORIES
    assert registry.DIRECTORIES["fashion200k"] == FASHION200K.name
    assert registry.SPLITS["fashion200k"] == FASHION200K.splits
    assert registry.SPLITS["fashiongen"] == ("train", "val")
    assert {d: p.read for d, p in registry.PRODUCT.items()} == registry.READERS
    assert getattr(fashionall, "READERS", registry.READERS) is registry.READERS
    assert not hasattr(cache, "_PRODUCT_SPLITS")


def test_fashion200k_val_is_its_test_file_wherever_a_split_file_is_named(tmp_path):
    rows = [{"images": ["a.jpg"], "id": 3, "title": "Red dress"}]
    _write(tmp_path / "Fashion200k" / "test_info.json", rows)
    assert FASHION200K.split_file(tmp_path, "val")[1] == tmp_path / "Fashion200k" / "test_info.json"
    assert [p.id for p in read_fashion200k(tmp_path, "val")] == [3]
    _write(tmp_path / "Fashion200k" / "test_info.json", [])
    with pytest.raises(ValueError, match=r"fashion200k: no products in .*Fashion200k/test_info\.json"):
        tasks.read_products("fashion200k", tmp_path, "val")
    with pytest.raises(ValueError, match="split must be one of"):
        read_fashion200k(tmp_path, "dev")


# ------------------------------------------------------- SCR categories


def test_a_subcategory_in_two_categories_skips_only_the_category_scores(tmp_path):
    products = [Product(1, ("a",), "t", 0, 4), Product(2, ("b",), "t", 0, 5), Product(3, ("c",), "t", 2, 4)]
    mapping, note = subcategory_categories(products, "fashiongen val")
    assert mapping is None
    assert "subcategory 4 maps to several categories: 0 (product 1) and 2 (product 3)" in note

    rows = [_fg_row(1, 4, 0), _fg_row(2, 5, 0), _fg_row(3, 4, 2)]
    for row in rows:
        noise_image(tmp_path / "FashionGen" / "val" / row["images"][0], 20, 16, seed=row["id"])
    _write(tmp_path / "FashionGen" / "val_info.json", rows)
    scr = build_eval_sets("scr", tmp_path, image_size=S, backend="pil", device="cpu")
    assert scr.categories is None and "subcategory 4 maps to several categories" in scr.category_note

    class Classifier:
        device = torch.device("cpu")

        def classify(self, pixels, input_ids):
            return torch.zeros(pixels.shape[0], 6)

    (result,) = evaluate_scr(Classifier(), scr, EvalOptions())
    assert set(result.metrics) == {"accuracy", "macro_f1"}
    assert result.details["category_metrics"].startswith("skipped: fashiongen val")
    assert (
        "subcategory 4 maps to several categories: 0 (product 1) and 2 (product 3)"
        in (result.details["category_metrics"])
    )
