"""FashionIQ: the val converter's input checks and ".jpg" names, empty image names, empty splits."""

import json

import pytest

from famevil_fast.data.fashioniq import read_fashioniq
from famevil_fast.data.fiq_convert import convert_fashioniq_val
from famevil_fast.data.tasks import train_table

_ROW = {"candidate": "a", "target": "b", "captions": ["is red", "is longer"]}
_CATS = ("dress", "shirt", "toptee")


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _raw_fiq(tmp_path, raw=None, gallery=None, cats=_CATS):
    fiq = tmp_path / "FashionIQ"
    for cat in cats:
        _write(fiq / "captions" / f"cap.{cat}.val.json", [_ROW] if raw is None else raw)
        _write(fiq / "image_splits" / f"split.{cat}.val.json", ["a", "b"] if gallery is None else gallery)
    return fiq


# ------------------------------------------------------- convert-fiq checks every input before writing


@pytest.mark.parametrize(
    "gallery, message",
    [
        ([{"asin": "a"}], r"image_splits/split\.dress\.val\.json: gallery entry 0 is \{'asin': 'a'\}"),
        (["a", 2], r"image_splits/split\.dress\.val\.json: gallery entry 1 is 2, expected an image name"),
        (["a", ""], r"image_splits/split\.dress\.val\.json: gallery entry 1 has no image name \(''\)"),
        ([".jpg"], r"image_splits/split\.dress\.val\.json: gallery entry 0 has no image name \('\.jpg'\)"),
    ],
)
def test_convert_fiq_refuses_bad_gallery_entries_naming_the_split_file(tmp_path, gallery, message):
    fiq = _raw_fiq(tmp_path, gallery=gallery, cats=("dress",))
    before = _snapshot(fiq)
    with pytest.raises(ValueError, match=message):
        convert_fashioniq_val(fiq, categories=("dress",))
    assert _snapshot(fiq) == before  # nothing renamed to .raw.json, nothing written


@pytest.mark.parametrize(
    "row, message",
    [
        ({**_ROW, "target": None}, r"row 1: target is None, expected an image name"),
        ({**_ROW, "candidate": ""}, r"row 1: candidate has no image name \(''\)"),
        ({**_ROW, "candidate": "./"}, r"row 1: candidate has no image name \('\./'\)"),
        ({**_ROW, "target": 7}, r"row 1: target is 7, expected an image name"),
        ({**_ROW, "captions": ["is red"]}, r"row 1: captions holds 1 strings, expected 2"),
        ({**_ROW, "captions": ["a", "b", "c"]}, r"row 1: captions holds 3 strings, expected 2"),
    ],
)
def test_convert_fiq_refuses_bad_caption_rows_naming_the_caption_file(tmp_path, row, message):
    fiq = _raw_fiq(tmp_path, raw=[_ROW, row], cats=("dress",))
    before = _snapshot(fiq)
    with pytest.raises(ValueError, match=r"captions/cap\.dress\.val\.json: FashionIQ val " + message):
        convert_fashioniq_val(fiq, categories=("dress",))
    assert _snapshot(fiq) == before


def test_convert_fiq_writes_no_category_when_a_later_one_is_malformed(tmp_path):
    fiq = _raw_fiq(tmp_path)
    _write(fiq / "image_splits" / "split.toptee.val.json", [1, 2])
    before = _snapshot(fiq)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"split\.toptee\.val\.json: gallery entry 0 is 1"):
        convert_fashioniq_val(fiq)
    with pytest.raises(ValueError, match=r"split\.toptee\.val\.json: gallery entry 0 is 1"):
        convert_fashioniq_val(fiq, out)
    assert _snapshot(fiq) == before and not out.exists()


def test_convert_fiq_drops_one_jpg_suffix_so_names_match_the_gallery(tmp_path):
    raw = [{"candidate": "b.jpg", "target": "a.jpg", "captions": ["x", "y"]}]
    fiq = _raw_fiq(tmp_path, raw=raw, gallery=["a.jpg", "b"], cats=("dress",))
    assert convert_fashioniq_val(fiq, categories=("dress",)) == {"dress": 2}
    rows = json.loads((fiq / "captions" / "cap.dress.val.json").read_text())
    assert [(r["candidate"], r["target"], r["target_id"], r["fake_data"]) for r in rows] == [
        ("b", "a", 0, False),
        ("a", "a", 0, True),
        ("b", "b", 1, True),
    ]
    triplets = read_fashioniq(tmp_path, "val", ["dress"])
    assert (triplets[0].candidate, triplets[0].target) == ("FashionIQ/images/b.jpg", "FashionIQ/images/a.jpg")


# ------------------------------------------------------- the reader's image names


def _train(tmp_path, rows, cats=("dress",)):
    for cat in cats:
        _write(tmp_path / "FashionIQ" / "captions" / f"cap.{cat}.train.json", rows)


@pytest.mark.parametrize(
    "key, name", [("candidate", ""), ("target", "./"), ("target", "."), ("candidate", ".jpg")]
)
def test_an_empty_image_name_is_refused_naming_the_file_entry_and_key(tmp_path, key, name):
    _train(tmp_path, [_ROW, {**_ROW, key: name}])
    with pytest.raises(ValueError) as e:
        read_fashioniq(tmp_path, "train", ["dress"])
    assert f"cap.dress.train.json: entry 1 has no image path ({key} holds {name!r})" in str(e.value)


def test_a_name_ending_in_jpg_is_the_file_name(tmp_path):
    _train(tmp_path, [{**_ROW, "candidate": "a.jpg", "target": "sub/b.jpg"}])
    (t,) = read_fashioniq(tmp_path, "train", ["dress"])
    assert (t.candidate, t.target) == ("FashionIQ/images/a.jpg", "FashionIQ/images/sub/b.jpg")


def test_parent_components_are_resolved_so_one_image_has_one_name(tmp_path):
    """"sub/../a" is the image "a": one file name and one train target id, not two."""
    _train(tmp_path, [{**_ROW, "target": "a"}, {**_ROW, "candidate": "b", "target": "sub/../a"}])
    first, second = read_fashioniq(tmp_path, "train", ["dress"])
    assert second.target == first.target == "FashionIQ/images/a.jpg"
    assert second.target_id == first.target_id


@pytest.mark.parametrize("name", ["../a", "sub/../../a", "..", "sub/.."])
def test_a_name_leaving_the_image_folder_or_naming_none_is_refused(tmp_path, name):
    _train(tmp_path, [_ROW, {**_ROW, "candidate": name}])
    with pytest.raises(ValueError, match=r"cap\.dress\.train\.json: entry 1.*candidate"):
        read_fashioniq(tmp_path, "train", ["dress"])


# ------------------------------------------------------- a split without triplets


def test_an_empty_train_split_is_refused_naming_the_caption_files(tmp_path):
    _train(tmp_path, [], cats=_CATS)
    message = r"FashionIQ: no train triplets .*cap\.dress\.train\.json, .*shirt.*cap\.toptee\.train\.json"
    with pytest.raises(ValueError, match=message):
        read_fashioniq(tmp_path, "train")
    with pytest.raises(ValueError, match=message):
        train_table("tgir", tmp_path, check_files=False)
    assert read_fashioniq(tmp_path, "train", allow_empty=True) == []
    _write(tmp_path / "FashionIQ" / "captions" / "cap.shirt.train.json", [_ROW])
    assert len(read_fashioniq(tmp_path, "train")) == 1  # one category with triplets is enough


def test_a_val_split_of_gallery_rows_only_is_refused(tmp_path):
    fake = {"candidate": "a", "target": "a", "captions": ["", ""], "target_id": 0, "fake_data": True}
    for cat in _CATS:
        _write(tmp_path / "FashionIQ" / "captions" / f"cap.{cat}.val.json", [fake] if cat == "dress" else [])
    with pytest.raises(ValueError, match=r"no val triplets .*cap\.dress\.val\.json"):
        read_fashioniq(tmp_path, "val")
    assert len(read_fashioniq(tmp_path, "val", allow_empty=True)) == 1
