"""Readers of FashionGen, FashionIQ, Fashion200k, PolyvoreOutfits and BigFACAD files, the FashionIQ val
converter, failure messages."""

import json
import shutil
import warnings

import pytest
from test_data_fixtures import noise_image, synthetic

from famevil_fast.data.bigfacad import read_bigfacad
from famevil_fast.data.fashion200k import read_fashion200k
from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.data.fashioniq import read_fashioniq
from famevil_fast.data.fiq_convert import convert_fashioniq_val, fashioniq_val_rows
from famevil_fast.data.images import SkippedImagesWarning, jpeg_truncated, size_from_bytes
from famevil_fast.data.polyvore import read_polyvore_outfits
from famevil_fast.data.tasks import train_table


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_fashiongen_reader_builds_text_and_relative_paths(tmp_path):
    _write(
        tmp_path / "FashionGen" / "train_info.json",
        [
            {
                "images": ["train/a.png", "train/b.png"],
                "id": 7,
                "title": "RED DRESS",
                "description": "Silk.",
                "attributes_id": [1, 2],
                "category_id": 3,
                "subcategory_id": 120,
            },
            {"images": "train/c.png", "id": 8, "title": "t", "description": "d", "subcategory_id": 0},
        ],
    )
    for root, prefix in ((tmp_path, "FashionGen/"), (tmp_path / "FashionGen", "")):
        p = read_fashiongen(root, "train")
        assert p[0].text == "RED DRESS.Silk." and p[0].images == (
            f"{prefix}train/a.png",
            f"{prefix}train/b.png",
        )
        assert (p[0].id, p[0].category_id, p[0].subcategory_id, p[0].attributes_id) == (7, 3, 120, (1, 2))
        assert p[1].images == (f"{prefix}train/c.png",)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"images": [], "id": 1, "title": "", "description": "", "subcategory_id": 0}, "has no image path"),
        (
            {"images": ["a"], "id": 1, "title": "", "description": "", "subcategory_id": 121},
            "subcategory_id 121",
        ),
        ({"images": ["a"], "id": 1, "title": ""}, "lacks"),
    ],
)
def test_fashiongen_reader_rejects_bad_rows_naming_the_file(tmp_path, row, message):
    _write(tmp_path / "FashionGen" / "val_info.json", [row])
    with pytest.raises(ValueError, match=message) as e:
        read_fashiongen(tmp_path, "test")
    assert "val_info.json" in str(e.value)


def test_missing_split_and_caption_files_fail_at_start_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="FashionGen"):
        read_fashiongen(tmp_path, "train")
    (tmp_path / "FashionGen").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train_info\.json"):
        read_fashiongen(tmp_path, "train")
    _write(tmp_path / "FashionIQ" / "captions" / "cap.dress.train.json", [])
    with pytest.raises(FileNotFoundError, match=r"cap\.shirt\.train\.json"):
        read_fashioniq(tmp_path, "train")
    (tmp_path / "FashionGen" / "train_info.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_fashiongen(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        read_fashiongen(tmp_path, "dev")


def test_fashioniq_reader_train_ids_and_val_gallery_rows(tmp_path):
    caps = tmp_path / "FashionIQ" / "captions"
    for cat in ("dress", "shirt", "toptee"):
        _write(
            caps / f"cap.{cat}.train.json",
            [{"candidate": f"{cat}1", "target": f"{cat}2", "captions": ["a", "b"]}],
        )
    _write(caps / "cap.dress.val.json", [{"candidate": "x", "target": "y", "captions": ["is red", "longer"]}])
    t = read_fashioniq(tmp_path, "train")
    assert [x.category for x in t] == [0, 1, 2]
    assert t[0].candidate == "FashionIQ/images/dress1.jpg" and t[0].text == "a, b"
    names = sorted(f"{c}{i}" for c in ("dress", "shirt", "toptee") for i in (1, 2))
    assert [x.target_id for x in t] == [names.index(f"{c}2") for c in ("dress", "shirt", "toptee")]
    with pytest.raises(ValueError, match="convert-fiq"):
        read_fashioniq(tmp_path, "val", ["dress"])
    with pytest.raises(ValueError, match="unknown categories"):
        read_fashioniq(tmp_path, "train", ["shoes"])


def test_converter_builds_gallery_rows_and_is_idempotent(tmp_path):
    fiq = tmp_path / "FashionIQ"
    raw = [
        {"candidate": "a", "target": "b", "captions": ["1", "2"]},
        {"candidate": "b", "target": "z", "captions": ["3", "4"]},
    ]
    for cat in ("dress", "shirt", "toptee"):
        _write(fiq / "captions" / f"cap.{cat}.val.json", raw)
        _write(fiq / "image_splits" / f"split.{cat}.val.json", ["a", "b", "c"])
    sizes = convert_fashioniq_val(fiq)
    assert sizes == {"dress": 4, "shirt": 4, "toptee": 4}  # z was not in the split: appended
    rows = json.loads((fiq / "captions" / "cap.shirt.val.json").read_text())
    extra = {"fake_data": False, "garment_class": 1}
    assert rows[:2] == [
        {"candidate": "a", "target": "b", "captions": ["1", "2"], "target_id": 1, **extra},
        {"candidate": "b", "target": "z", "captions": ["3", "4"], "target_id": 3, **extra},
    ]
    assert [(r["target"], r["target_id"]) for r in rows if r["fake_data"]] == [
        ("a", 0),
        ("b", 1),
        ("c", 2),
        ("z", 3),
    ]
    assert json.loads((fiq / "captions" / "cap.shirt.val.raw.json").read_text()) == raw
    first = (fiq / "captions" / "cap.shirt.val.json").read_text()
    convert_fashioniq_val(fiq)
    assert (fiq / "captions" / "cap.shirt.val.json").read_text() == first
    triplets = read_fashioniq(tmp_path, "val")
    assert sum(not t.fake_data for t in triplets) == 6 and sum(t.fake_data for t in triplets) == 12
    with pytest.raises(ValueError, match="lacks"):
        fashioniq_val_rows([{"candidate": "a"}], [], 0)


def test_converter_of_a_missing_directory_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        convert_fashioniq_val(tmp_path / "missing")
    (tmp_path / "root" / "FashionIQ" / "captions").mkdir(parents=True)
    hint = r"root holds no captions/ directory \(give .*root/FashionIQ\)"
    with pytest.raises(FileNotFoundError, match=hint):
        convert_fashioniq_val(tmp_path / "root")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="file is not a directory"):
        convert_fashioniq_val(tmp_path / "file")
    with pytest.raises(ValueError, match="the output .*file is a file; give a directory"):
        convert_fashioniq_val(tmp_path / "root" / "FashionIQ", tmp_path / "file")
    shutil.rmtree(tmp_path / "root")
    (tmp_path / "file").unlink()
    (tmp_path / "fiq" / "captions").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="split.dress.val.json"):
        convert_fashioniq_val(tmp_path / "fiq", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fiq"]


def test_converter_reproduces_the_synthetic_val_files(tmp_path_factory, tmp_path):
    root = synthetic(tmp_path_factory)
    fiq = tmp_path / "FashionIQ"
    shutil.copytree(root / "FashionIQ" / "image_splits", fiq / "image_splits")
    for cat in ("dress", "shirt", "toptee"):
        rows = json.loads((root / "FashionIQ" / "captions" / f"cap.{cat}.val.json").read_text())
        raw = [{k: r[k] for k in ("candidate", "target", "captions")} for r in rows if not r["fake_data"]]
        _write(fiq / "captions" / f"cap.{cat}.val.json", raw)
    convert_fashioniq_val(fiq, tmp_path / "out")
    for cat in ("dress", "shirt", "toptee"):
        assert (tmp_path / "out" / f"cap.{cat}.val.json").read_text() == (
            root / "FashionIQ" / "captions" / f"cap.{cat}.val.json"
        ).read_text()


def test_fashion200k_reader(tmp_path):
    """Paths are relative to Fashion200k/images (the official image folder), or to Fashion200k/ when they
    start with images/."""
    row = {
        "images": ["skirt/mini/1/1_0.jpg", "images/x.jpg"],
        "id": 3,
        "title": "blue skirt",
        "attributes_id": [4],
    }
    _write(tmp_path / "Fashion200k" / "test_info.json", [row])
    p = read_fashion200k(tmp_path, "val")
    assert (
        p[0].text == "blue skirt"
        and p[0].images == ("Fashion200k/images/skirt/mini/1/1_0.jpg", "Fashion200k/images/x.jpg")
        and p[0].subcategory_id == -1
    )


def test_polyvore_reader_single_image_text_and_paths(tmp_path):
    """One image path per row, relative to PolyvoreOutfits/images (or to PolyvoreOutfits/ when it starts with
    images/); text = title + "." + description exactly as stored (the official PolyvoreOutfitsDatabase)."""
    rows = [
        {
            "images": "1234.jpg",
            "id": 9,
            "title": "Leather bag ",
            "description": " Gold zip.",
            "attributes_id": [7],
        },
        {"images": "images/55.jpg", "id": 10, "title": "Hat", "description": ""},
    ]
    for split in ("train", "val", "test"):
        _write(tmp_path / "PolyvoreOutfits" / f"{split}_info.json", rows)
    for root, prefix in ((tmp_path, "PolyvoreOutfits/"), (tmp_path / "PolyvoreOutfits", "")):
        for split in ("train", "val", "test"):
            p = read_polyvore_outfits(root, split)
            assert p[0].text == "Leather bag . Gold zip." and p[1].text == "Hat."
            assert p[0].images == (f"{prefix}images/1234.jpg",) and p[1].images == (f"{prefix}images/55.jpg",)
            assert (p[0].id, p[0].attributes_id, p[0].subcategory_id) == (9, (7,), -1)
            assert p[0].dataset == "polyvoreoutfits"
            assert p[1].attributes_id == ()
    with pytest.raises(ValueError, match="split must be"):
        read_polyvore_outfits(tmp_path, "dev")
    _write(tmp_path / "PolyvoreOutfits" / "train_info.json", [{"images": "a.jpg", "id": 1, "title": "t"}])
    with pytest.raises(ValueError, match=r"train_info\.json: entry 0 \(id 1\) lacks \['description'\]"):
        read_polyvore_outfits(tmp_path, "train")
    _write(tmp_path / "PolyvoreOutfits" / "train_info.json", [{**rows[1], "images": ""}])
    with pytest.raises(ValueError, match="has no image path"):
        read_polyvore_outfits(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="PolyvoreOutfits"):
        read_polyvore_outfits(tmp_path / "nowhere", "train")


def test_bigfacad_reader_joins_color_title_and_description(tmp_path):
    """text = color + "." + title + "." + description exactly as stored (the official BigFACADDatabase);
    paths relative to BigFACAD/images."""
    row = {
        "images": ["women/1_0.jpg", "images/women/1_1.jpg"],
        "id": 1,
        "color": "Navy ",
        "title": "Wool coat",
        "description": " Double-breasted.",
        "attributes_id": [3, 2231],
    }
    for split in ("train", "val", "test"):
        _write(tmp_path / "BigFACAD" / f"{split}_info.json", [row, {**row, "id": 2, "images": "x.jpg"}])
    for split in ("train", "val", "test"):
        p = read_bigfacad(tmp_path, split)
        assert p[0].text == "Navy .Wool coat. Double-breasted."
        assert p[0].images == ("BigFACAD/images/women/1_0.jpg", "BigFACAD/images/women/1_1.jpg")
        assert p[1].images == ("BigFACAD/images/x.jpg",)
        assert (p[0].attributes_id, p[0].dataset, p[0].category_id) == ((3, 2231), "bigfacad", -1)
    assert read_bigfacad(tmp_path / "BigFACAD", "train")[0].images[0] == "images/women/1_0.jpg"
    _write(tmp_path / "BigFACAD" / "train_info.json", [{k: v for k, v in row.items() if k != "color"}])
    with pytest.raises(ValueError, match=r"lacks \['color'\].*a BigFACAD row holds images, id, color"):
        read_bigfacad(tmp_path, "train")
    _write(tmp_path / "BigFACAD" / "train_info.json", [{**row, "color": None}])
    with pytest.raises(ValueError, match="field 'color' must be a string"):
        read_bigfacad(tmp_path, "train")
    with pytest.raises(ValueError, match="split must be"):
        read_bigfacad(tmp_path, "dev")


def test_missing_images_are_dropped_with_one_summary_warning(tmp_path):
    rows = []
    for i in range(5):
        views = [f"train/{i}_{v}.png" for v in range(2)]
        rows.append({"images": views, "id": i, "title": f"t{i}", "description": "d", "subcategory_id": i})
        for v, view in enumerate(views):
            if not (i == 1 or (i == 2 and v == 0)):  # product 1 loses both views, product 2 one view
                noise_image(tmp_path / "FashionGen" / view, 8, 8, seed=i)
    _write(tmp_path / "FashionGen" / "train_info.json", rows)
    with pytest.warns(SkippedImagesWarning, match="skipped 3 of 10") as record:
        table = train_table("scr", tmp_path)
    assert len(record) == 1
    assert table.fields["labels"].tolist() == [0, 2, 3, 4]
    assert table.images["pixels"][1] == ("FashionGen/train/2_1.png",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(train_table("scr", tmp_path, check_files=False)) == 5


def test_header_size_parsing(tmp_path):
    for ext, kw in ((".png", {}), (".jpg", {"quality": 80}), (".jpg", {"progressive": True})):
        path = tmp_path / f"a{ext}"
        noise_image(path, 37, 53, **kw)
        assert size_from_bytes(path.read_bytes()) == (37, 53)
    assert size_from_bytes(b"GIF89a....") is None


def test_truncated_jpeg_detection(tmp_path):
    """A JPEG cut anywhere after its header lacks the end-of-image marker after its first scan; an EXIF-style
    thumbnail (a whole JPEG, end marker included) inside APP1 does not make a cut file look complete."""
    for kw in ({"quality": 80}, {"progressive": True}):
        path = tmp_path / "a.jpg"
        noise_image(path, 37, 53, **kw)
        data = path.read_bytes()
        assert not jpeg_truncated(data)
        for cut in (len(data) // 3, len(data) // 2, len(data) - 2):
            assert jpeg_truncated(data[:cut]), (kw, cut)
        payload = b"Exif\x00\x00\xff\xd8\xff\xd9"
        thumb = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
        with_thumb = data[:2] + thumb + data[2:]
        assert size_from_bytes(with_thumb) == (37, 53)
        assert not jpeg_truncated(with_thumb)
        assert jpeg_truncated(with_thumb[: len(with_thumb) // 2])
    png = tmp_path / "a.png"
    noise_image(png, 5, 6)
    assert not jpeg_truncated(png.read_bytes()) and not jpeg_truncated(b"")


_FG_ROW = {"images": ["a.png"], "id": 1, "title": "t", "description": "d", "subcategory_id": 0}


@pytest.mark.parametrize(
    "field, value",
    [
        ("id", "abc"),
        ("id", None),
        ("id", 1.7),
        ("id", True),
        ("subcategory_id", "x"),
        ("subcategory_id", 3.9),
        ("subcategory_id", True),
        ("category_id", "dress"),
        ("images", [1, 2]),
        ("images", 5),
        ("images", {"a": 1}),
        ("images", None),
        ("title", None),
        ("description", ["a", "b"]),
        ("attributes_id", "12"),
        ("attributes_id", 3),
        ("attributes_id", [1, True]),
    ],
)
def test_fashiongen_reader_rejects_wrong_types_naming_file_entry_and_field(tmp_path, field, value):
    _write(tmp_path / "FashionGen" / "train_info.json", [_FG_ROW, {**_FG_ROW, "id": 2, field: value}])
    with pytest.raises(ValueError, match=rf"train_info\.json: entry 1\b.*field '{field}' must be") as e:
        read_fashiongen(tmp_path, "train")
    assert json.dumps(value)[:20] in str(e.value)


@pytest.mark.parametrize(
    "field, value", [("images", [3]), ("images", None), ("id", "x1"), ("id", 2.0), ("title", None)]
)
def test_fashion200k_reader_rejects_wrong_types(tmp_path, field, value):
    row = {"images": ["x.jpg"], "id": 1, "title": "t"}
    _write(tmp_path / "Fashion200k" / "train_info.json", [row, {**row, "id": 2, field: value}])
    with pytest.raises(ValueError, match=rf"train_info\.json: entry 1\b.*field '{field}' must be"):
        read_fashion200k(tmp_path, "train")


@pytest.mark.parametrize(
    "reader, name",
    [
        (read_fashiongen, "FashionGen"),
        (read_fashion200k, "Fashion200k"),
        (read_polyvore_outfits, "PolyvoreOutfits"),
        (read_bigfacad, "BigFACAD"),
    ],
)
def test_duplicate_product_ids_are_rejected_naming_the_entries(tmp_path, reader, name):
    rows = [{**_FG_ROW, "color": "red", "id": i} for i in (5, 6, 7, 6)]
    _write(tmp_path / name / "train_info.json", rows)
    with pytest.raises(ValueError, match=r"train_info\.json: entries 1 and 3 have the same product id 6"):
        reader(tmp_path, "train")


def _fiq_rows(split):
    rows = [
        {"candidate": "a", "target": "b", "captions": ["x", "y"]},
        {"candidate": "b", "target": "c", "captions": ["x", "y"]},
    ]
    if split == "val":
        rows = [{**r, "target_id": i, "fake_data": False, "garment_class": 0} for i, r in enumerate(rows)]
    return rows


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize(
    "change, message",
    [
        ({"candidate": 123}, "field 'candidate' must be a string, got 123"),
        ({"candidate": None}, "field 'candidate' must be a string, got null"),
        ({"target": ["x"]}, "field 'target' must be a string"),
        ({"captions": "ab"}, "field 'captions' must be a list of strings"),
        ({"captions": None}, "field 'captions' must be a list of strings"),
        ({"captions": [1, None]}, "field 'captions' must be a list of strings"),
        ({"captions": ["a", "b", "c"]}, "has 3 captions, expected 2"),
        ({"fake_data": "false"}, "field 'fake_data' must be true or false"),
    ],
)
def test_fashioniq_reader_rejects_wrong_types(tmp_path, split, change, message):
    rows = _fiq_rows(split)
    rows[1].update(change)
    _write(tmp_path / "FashionIQ" / "captions" / f"cap.dress.{split}.json", rows)
    with pytest.raises(ValueError, match=rf"cap\.dress\.{split}\.json: entry 1\b.*{message}"):
        read_fashioniq(tmp_path, split, ["dress"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_fashioniq_rows_are_validated_before_their_names_are_used(tmp_path, split):
    caps = tmp_path / "FashionIQ" / "captions"
    rows = _fiq_rows(split)
    del rows[1]["candidate"]
    _write(caps / f"cap.dress.{split}.json", rows)
    with pytest.raises(ValueError, match=rf"cap\.dress\.{split}\.json: entry 1 lacks \['candidate'\]"):
        read_fashioniq(tmp_path, split, ["dress"])
    _write(caps / f"cap.dress.{split}.json", [_fiq_rows(split)[0], 1])
    with pytest.raises(ValueError, match=rf"cap\.dress\.{split}\.json: entry 1 is 1, expected an object"):
        read_fashioniq(tmp_path, split, ["dress"])


def test_fashioniq_val_target_id_must_be_an_integer_and_agree_with_the_target(tmp_path):
    path = tmp_path / "FashionIQ" / "captions" / "cap.dress.val.json"
    rows = _fiq_rows("val")
    rows[1]["target_id"] = "x"
    _write(path, rows)
    with pytest.raises(ValueError, match="entry 1.*field 'target_id' must be an integer"):
        read_fashioniq(tmp_path, "val", ["dress"])
    rows = _fiq_rows("val") + [{**_fiq_rows("val")[0], "target_id": 7, "fake_data": True}]
    _write(path, rows)  # target "b" is id 0 in entry 0, id 7 in entry 2
    with pytest.raises(ValueError, match=r"entries 0 and 2 give target 'b' different target_ids \(0, 7\)"):
        read_fashioniq(tmp_path, "val", ["dress"])
    rows = _fiq_rows("val") + [{**_fiq_rows("val")[0], "target": "z", "fake_data": True}]
    _write(path, rows)  # id 0 is "b" in entry 0, "z" in entry 2
    with pytest.raises(ValueError, match=r"entries 0 and 2 give target_id 0 to different targets"):
        read_fashioniq(tmp_path, "val", ["dress"])
    _write(path, _fiq_rows("val") + [{**_fiq_rows("val")[0], "fake_data": True}])  # same target, same id
    assert len(read_fashioniq(tmp_path, "val", ["dress"])) == 3
