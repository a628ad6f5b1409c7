"""The readers on hand-written files in the official (FashionViL) layout: where image paths resolve, how texts
are built, the FashionIQ val gallery, tokenisation, and the errors that name the file, the key and the fix
for the usual data-preparation mistakes."""

import json
import warnings

import pytest
import torch
from test_data_fixtures import noise_image

from famevil_fast.data.fashion200k import read_fashion200k
from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.data.fashioniq import read_fashioniq
from famevil_fast.data.images import SkippedImagesWarning
from famevil_fast.data.loader import build_train_loader
from famevil_fast.data.tasks import tgir_tables, train_table
from famevil_fast.text import EOT_ID, SOT_ID, tokenize


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _fashiongen_official(root):
    """FashionGen as the authors distribute it: image paths relative to FashionGen/train and FashionGen/val
    (mmf joins them to `images.train: FashionGen/train`, `images.val/test: FashionGen/val`)."""
    for split, pid in (("train", 1), ("val", 2)):
        views = [f"{pid}_{v}.png" for v in range(2)]
        for v, name in enumerate(views):
            noise_image(root / "FashionGen" / split / name, 6, 6, seed=10 * pid + v)
        row = {
            "images": views,
            "id": pid,
            "title": "RED DRESS ",
            "description": " Silk.",
            "subcategory_id": 3,
        }
        _write(
            root / "FashionGen" / f"{split}_info.json", [row, {**row, "id": pid + 10, "images": views[:1]}]
        )


def test_fashiongen_image_paths_resolve_from_the_split_image_folder(tmp_path):
    """the official data layout: FashionGen/{train,val,train_info.json,val_info.json}; test = val (files and
    images). Bare names of the official files are found under FashionGen/<split>/ and load."""
    _fashiongen_official(tmp_path)
    train = read_fashiongen(tmp_path, "train")
    assert train[0].images == ("FashionGen/train/1_0.png", "FashionGen/train/1_1.png")
    assert read_fashiongen(tmp_path, "test")[0].images == ("FashionGen/val/2_0.png", "FashionGen/val/2_1.png")
    assert read_fashiongen(tmp_path / "FashionGen", "val")[0].images == ("val/2_0.png", "val/2_1.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedImagesWarning)  # every image is found
        table = train_table("itc", tmp_path)
        loader = build_train_loader("itc", tmp_path, 2, image_size=8, backend="pil", device="cpu")
        batch = next(iter(loader))
    assert table.images["pixels"][0] == train[0].images
    assert batch["pixels"].shape == (2, 3, 8, 8) and sorted(batch["product_ids"].tolist()) == [1, 11]


def test_fashiongen_paths_that_name_the_split_folder_give_the_same_records(tmp_path):
    """famevil_fast's own layout (make-synthetic writes "train/<id>_<view>.png") reads as before."""
    row = {
        "images": ["train/1_0.png", "1_1.png"],
        "id": 1,
        "title": "t",
        "description": "d",
        "subcategory_id": 0,
    }
    _write(tmp_path / "FashionGen" / "train_info.json", [row])
    assert read_fashiongen(tmp_path, "train")[0].images == (
        "FashionGen/train/1_0.png",
        "FashionGen/train/1_1.png",
    )


def test_fashiongen_text_is_title_dot_description_verbatim(tmp_path):
    """Section 2 / 4: text = title + "." + description, no space added and none stripped; the token ids are
    the CLIP BPE ids of that text (SOT, content, EOT; 77 positions)."""
    _fashiongen_official(tmp_path)
    product = read_fashiongen(tmp_path, "train")[0]
    assert product.text == "RED DRESS . Silk."
    table = train_table("cap", tmp_path, check_files=False)
    assert table.fields["input_ids"].shape == (2, 77)
    assert torch.equal(table.fields["input_ids"][0], tokenize([product.text])[0])


def test_long_texts_are_truncated_to_75_content_tokens_ending_in_eot(tmp_path):
    row = {"images": ["a.png"], "id": 1, "title": "red " * 100, "description": "end", "subcategory_id": 0}
    _write(tmp_path / "FashionGen" / "train_info.json", [row])
    ids = train_table("itc", tmp_path, check_files=False).fields["input_ids"][0]
    assert ids.shape == (77,) and ids[0] == SOT_ID and ids[-1] == EOT_ID and (ids[1:-1] != EOT_ID).all()


def test_fashion200k_image_paths_resolve_from_its_images_folder(tmp_path):
    """mmf's `images: Fashion200k/images`; text = title only; val reads test_info.json."""
    noise_image(tmp_path / "Fashion200k" / "images" / "dress" / "1_0.jpeg", 6, 6)
    row = {"images": ["dress/1_0.jpeg"], "id": 1, "title": "blue dress", "attributes_id": []}
    _write(tmp_path / "Fashion200k" / "test_info.json", [row])
    (product,) = read_fashion200k(tmp_path, "val")
    assert product.images == ("Fashion200k/images/dress/1_0.jpeg",) and product.text == "blue dress"
    assert (tmp_path / product.images[0]).is_file()


def _fiq(root, val_rows):
    caps = root / "FashionIQ" / "captions"
    for cat in ("dress", "shirt", "toptee"):
        _write(caps / f"cap.{cat}.train.json", [{"candidate": "a", "target": "b", "captions": ["x", "y"]}])
    _write(caps / "cap.dress.val.json", val_rows)


_VAL = [
    {"candidate": "a", "target": "b", "captions": ["is red", "shorter"], "target_id": 1, "fake_data": False},
    {"candidate": "a", "target": "a", "captions": ["", ""], "target_id": 0, "fake_data": True},
    {"candidate": "b", "target": "b", "captions": ["", ""], "target_id": 1, "fake_data": True},
    {"candidate": "c", "target": "c", "captions": ["", ""], "target_id": 2, "fake_data": True},
]


def test_fashioniq_val_fake_rows_fill_the_gallery_and_are_no_queries(tmp_path):
    """Section 4: names get ".jpg" in FashionIQ/images/, captions are joined with ", ", fake_data rows are
    no queries but their targets are in the gallery; image_splits/ is never read (here: not even JSON)."""
    _fiq(tmp_path, [{**r, "garment_class": 0} for r in _VAL])
    (tmp_path / "FashionIQ" / "image_splits").mkdir()
    (tmp_path / "FashionIQ" / "image_splits" / "split.dress.val.json").write_text("not json")
    triplets = read_fashioniq(tmp_path, "val", ["dress"])
    queries, gallery = tgir_tables(triplets, 0)
    assert queries.texts == ["is red, shorter"] and queries.fields["target_ids"].tolist() == [1]
    assert queries.images["ref_pixels"] == [("FashionIQ/images/a.jpg",)]
    assert gallery.fields["target_ids"].tolist() == [0, 1, 2]
    assert gallery.images["pixels"] == [(f"FashionIQ/images/{n}.jpg",) for n in "abc"]


def test_raw_fashioniq_val_rows_name_the_file_keys_and_the_command(tmp_path):
    """Section 8 (data-prep opacity): the raw release lacks target_id / fake_data."""
    _fiq(tmp_path, [{"candidate": "a", "target": "b", "captions": ["x", "y"]}])
    fiq = tmp_path / "FashionIQ"
    with pytest.raises(ValueError) as e:
        read_fashioniq(tmp_path, "val", ["dress"])
    message = str(e.value)
    assert "cap.dress.val.json: entry 0" in message and "['target_id', 'fake_data']" in message
    assert f"famevil-fast convert-fiq {fiq}`" in message


def test_a_val_file_without_fake_rows_warns_that_its_gallery_is_too_small(tmp_path):
    _fiq(tmp_path, [r for r in _VAL if not r["fake_data"]])
    with pytest.warns(UserWarning, match=r"no fake_data rows.*only the 1 targets.*convert-fiq"):
        read_fashioniq(tmp_path, "val", ["dress"])
    _fiq(tmp_path, _VAL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_fashioniq(tmp_path, "val", ["dress"])


def test_caption_files_outside_captions_are_named(tmp_path):
    _write(tmp_path / "FashionIQ" / "cap.dress.train.json", [])
    with pytest.raises(FileNotFoundError, match=r"captions/cap\.dress\.train\.json.*belong in .*captions"):
        read_fashioniq(tmp_path, "train", ["dress"])


def test_a_dataset_directory_with_the_wrong_case_is_named(tmp_path):
    _write(tmp_path / "fashiongen" / "train_info.json", [])
    with pytest.raises(
        FileNotFoundError, match=r"found .*fashiongen: the directory must be named FashionGen"
    ):
        read_fashiongen(tmp_path, "train")


def test_a_missing_fashiongen_key_names_the_file_entry_key_and_the_format(tmp_path):
    _write(tmp_path / "FashionGen" / "train_info.json", [{"images": ["a.png"], "id": 4, "title": "t"}])
    with pytest.raises(ValueError) as e:
        read_fashiongen(tmp_path, "train")
    message = str(e.value)
    assert "train_info.json: entry 0 (id 4) lacks ['description', 'subcategory_id']" in message
    assert "a FashionGen row holds images, id, title, description and subcategory_id" in message


def test_when_no_image_is_found_the_error_shows_where_paths_were_looked_for(tmp_path):
    """A wrong folder layout (images beside the JSON instead of in FashionGen/train/) is named."""
    noise_image(tmp_path / "FashionGen" / "1_0.png", 6, 6)
    row = {"images": ["1_0.png"], "id": 1, "title": "t", "description": "d", "subcategory_id": 0}
    _write(tmp_path / "FashionGen" / "train_info.json", [row])
    with pytest.warns(SkippedImagesWarning), pytest.raises(ValueError) as e:
        train_table("itc", tmp_path)
    message = str(e.value)
    assert str(tmp_path / "FashionGen" / "train" / "1_0.png") in message
    assert "relative to its image folder: FashionGen/train" in message


def test_missing_split_files_say_where_such_files_come_from(tmp_path):
    (tmp_path / "FashionGen").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train_info\.json \(.*FashionViL.*make-synthetic"):
        read_fashiongen(tmp_path, "train")
    (tmp_path / "FashionIQ" / "captions").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"cap\.dress\.val\.json \(.*convert-fiq .*FashionIQ`"):
        read_fashioniq(tmp_path, "val", ["dress"])
    with pytest.raises(FileNotFoundError, match=r"does not exist\. A data root holds FashionGen/"):
        read_fashion200k(tmp_path / "absent", "train")
