"""Messy real-world inputs: split files with a byte-order mark or in another encoding, ids beyond 64 bits,
a dataset directory read as another dataset, images over PIL's pixel limit, split files parsed once
however many tables a run builds from them, image paths written on Windows or as absolute paths, and
products that list one image twice among their views."""

import json
import os
import time
import warnings

import pytest
from PIL import Image
from test_data_fixtures import fashiongen_row, noise_image

from famevil_fast.data import records, tasks
from famevil_fast.data.backends.pil_backend import PILBackend
from famevil_fast.data.backends.torchvision_backend import TorchvisionBackend
from famevil_fast.data.bigfacad import read_bigfacad
from famevil_fast.data.cache import ImageCache, build_cache, dataset_image_keys
from famevil_fast.data.fashion200k import read_fashion200k
from famevil_fast.data.fashionall import read_fashionall, union_id
from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.data.fashioniq import read_fashioniq
from famevil_fast.data.images import SkippedImagesWarning
from famevil_fast.data.polyvore import read_polyvore_outfits
from famevil_fast.data.records import DuplicateViewsWarning
from famevil_fast.data.transforms import CropPlan


def _write(path, rows, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding=encoding)


def _age(*paths, seconds=3600):
    """Set the files' modification times in the past (a settled file, as a real dataset's)."""
    then = time.time() - seconds
    for p in paths:
        os.utime(p, (then, then))


# ------------------------------------------------------- encodings


def test_a_split_file_with_a_byte_order_mark_is_read(tmp_path):
    row = dict(fashiongen_row(1, ["1_0.png"]), title="Robe d'été")
    _write(tmp_path / "FashionGen" / "train_info.json", [row], encoding="utf-8-sig")
    assert read_fashiongen(tmp_path, "train")[0].text == "Robe d'été.d"
    fiq = tmp_path / "FashionIQ" / "captions" / "cap.dress.train.json"
    _write(fiq, [{"candidate": "a", "target": "b", "captions": ["x", "y"]}], encoding="utf-8-sig")
    assert [t.target for t in read_fashioniq(tmp_path, "train", ("dress",))] == ["FashionIQ/images/b.jpg"]


def test_a_split_file_that_is_not_utf8_names_the_file(tmp_path):
    row = dict(fashiongen_row(1, ["1_0.png"]), title="Robe d'été")
    _write(tmp_path / "FashionGen" / "train_info.json", [row], encoding="latin-1")
    with pytest.raises(ValueError, match=r"FashionGen/train_info\.json is not UTF-8 text .*save it as UTF-8"):
        read_fashiongen(tmp_path, "train")


# ------------------------------------------------------- integer range


@pytest.mark.parametrize("field", ["id", "attributes_id"])
def test_an_integer_beyond_64_bits_is_refused_naming_the_field(tmp_path, field):
    row = fashiongen_row(1, ["1_0.png"])
    row[field] = 2**70 if field == "id" else [3, 2**64]
    _write(tmp_path / "FashionGen" / "train_info.json", [row])
    with pytest.raises(ValueError, match=rf"entry 0 .*field '{field}' holds -?\d+, outside the 64-bit"):
        tasks.train_table("itc", tmp_path, check_files=False)


# ------------------------------------------------------- a dataset directory read as another dataset


@pytest.mark.parametrize(
    "row, looks_like",
    [
        ({"images": "a.jpg", "id": 1, "title": "t", "description": "d"}, "PolyvoreOutfits"),
        ({"images": ["a.jpg"], "id": 1, "color": "red", "title": "t", "description": "d"}, "BigFACAD"),
    ],
)
def test_a_misnamed_polyvore_or_bigfacad_directory_is_not_read_as_fashion200k(tmp_path, row, looks_like):
    root = tmp_path / "my_catalogue"
    _write(root / "train_info.json", [row])
    noise_image(root / "images" / "a.jpg", 12, 10)
    with pytest.raises(ValueError, match=rf"not named after a dataset.*like {looks_like} rows.*name the"):
        tasks.product_datasets_under(root)
    with pytest.raises(ValueError, match=rf"e\.g\. .*{looks_like}\)"):
        dataset_image_keys(root)
    with pytest.raises(ValueError, match="not named after a dataset"):
        build_cache(root, tmp_path / "cache", num_threads=1, tokenize=False)
    named = tmp_path / looks_like
    root.rename(named)
    assert tasks.product_datasets_under(named) == [looks_like.lower()]


def test_a_dataset_directory_is_not_read_as_another_dataset(tmp_path):
    poly = tmp_path / "PolyvoreOutfits"
    _write(poly / "train_info.json", [{"images": "a.jpg", "id": 1, "title": "t", "description": "d"}])
    assert [p.text for p in read_polyvore_outfits(poly, "train")] == ["t.d"]
    with pytest.raises(FileNotFoundError, match=r"is the PolyvoreOutfits directory, not Fashion200k's"):
        read_fashion200k(poly, "train")
    with pytest.raises(FileNotFoundError, match=r"is the PolyvoreOutfits directory, not FashionGen's"):
        read_fashiongen(poly, "train")


# ------------------------------------------------------- images over PIL's pixel limit


def test_an_image_over_pils_pixel_limit_is_skipped_not_raised(tmp_path, monkeypatch):
    noise_image(tmp_path / "big.png", 64, 64)
    noise_image(tmp_path / "ok.png", 8, 8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: DecompressionBombError
    for backend in (PILBackend(tmp_path, 8), TorchvisionBackend(tmp_path, 8)):
        loaded = backend.load(["big.png", "ok.png"], CropPlan(None))
        assert loaded.ok.tolist() == [False, True]
        assert "DecompressionBombError" in loaded.failures[0][1]
        assert "MAX_IMAGE_PIXELS" in loaded.failures[0][1]
        backend.close()
    (tmp_path / "FashionGen").mkdir()
    os.rename(tmp_path / "big.png", tmp_path / "FashionGen" / "big.png")
    summary = build_cache(tmp_path, tmp_path / "cache", keys=["FashionGen/big.png"], tokenize=False)
    assert summary.failed == 1
    assert "DecompressionBombError" in ImageCache(tmp_path / "cache").failed["FashionGen/big.png"]


# ------------------------------------------------------- each split file parsed once


def test_each_split_file_is_parsed_once_for_the_tables_of_a_run(tmp_path, monkeypatch):
    from test_data_fashionall import make_union

    from famevil_fast.data import fashiongen
    from famevil_fast.data.attributes import load_attributes
    from famevil_fast.data.pretrain import pretrain_table

    root = make_union(tmp_path)
    files = sorted(root.glob("*/*_info.json"))
    _age(*files)
    parsed = []
    real = records.load_json_list

    def counting(path, *args, **kwargs):
        parsed.append(os.path.relpath(path, root))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(records, "load_json_list", counting)
    monkeypatch.setattr(fashiongen, "load_json_list", counting)
    with records.shared_reads():
        first = tasks.train_table("itc", root, dataset="fashionall")
        attributes = load_attributes(root, "dataset", "fashionall")
        for task in ("mvc", "pac", "itm"):
            table = pretrain_table(task, root, dataset="fashionall", attributes=attributes)
            assert table.fields["product_ids"].tolist() == first.fields["product_ids"].tolist()
        assert sorted(parsed) == sorted(set(parsed))  # no file twice
        assert "FashionGen/train_info.json" in parsed and "BigFACAD/train_info.json" in parsed

        rows = json.loads((root / "BigFACAD" / "train_info.json").read_text())
        _write(root / "BigFACAD" / "train_info.json", rows[:1])  # a changed file is read again
        _age(root / "BigFACAD" / "train_info.json", seconds=60)
        again = tasks.train_table("itc", root, dataset="fashionall")
        assert len(again) == len(first) - len(rows) + 1
        assert parsed.count("BigFACAD/train_info.json") == 2
    assert not records._READS  # nothing kept once the scope ends
    tasks.train_table("itc", root, dataset="fashionall")  # outside it every read parses its file
    assert parsed.count("BigFACAD/train_info.json") == 3
    assert parsed.count("FashionGen/train_info.json") == 2


def test_a_split_file_just_written_is_read_again(tmp_path):
    path = tmp_path / "FashionGen" / "train_info.json"
    _write(path, [fashiongen_row(1, ["a.png"])])
    with records.shared_reads():
        assert [p.id for p in read_fashiongen(tmp_path, "train")] == [1]
        _write(path, [fashiongen_row(2, ["a.png"])])  # same size, perhaps the same timestamp
        assert [p.id for p in read_fashiongen(tmp_path, "train")] == [2]


# ------------------------------------------------------- a source image replaced after caching


def test_an_image_replaced_after_caching_is_cached_again(tmp_path):
    import warnings

    import numpy as np

    root = tmp_path / "data"
    _write(
        root / "FashionGen" / "train_info.json",
        [fashiongen_row(1, ["1_0.png"]), fashiongen_row(2, ["2_0.png"])],
    )
    image = root / "FashionGen" / "train" / "1_0.png"
    first = noise_image(image, 9, 7, seed=1)
    noise_image(root / "FashionGen" / "train" / "2_0.png", 9, 7, seed=2)
    _age(*(root / "FashionGen" / "train").glob("*.png"), seconds=7200)  # made long before the cache
    out = tmp_path / "cache"
    build_cache(root, out, num_threads=1, tokenize=False)
    key = "FashionGen/train/1_0.png"
    assert np.array_equal(ImageCache(out).get(key), first)

    _age(*(out / "shards").glob("*.bin"))
    second = noise_image(image, 5, 11, seed=3)
    with pytest.warns(
        UserWarning, match=r"1 images changed since they were cached \(e\.g\. FashionGen/train/1_0"
    ):
        summary = build_cache(root, out, num_threads=1, tokenize=False)
    assert (summary.images, summary.new_images) == (2, 1)
    assert np.array_equal(ImageCache(out).get(key), second)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_cache(root, out, num_threads=1, tokenize=False).new_images == 0

    _age(*(out / "shards").glob("*.bin"))
    image.write_bytes(b"")  # now undecodable: its old pixels are not served
    with pytest.warns(UserWarning, match="changed since they were cached"):
        assert build_cache(root, out, num_threads=1, tokenize=False).failed == 1
    cache = ImageCache(out)
    assert key not in cache and "could not be decoded" in cache.reason_missing(key)


# ------------------------------------------------------- convert-fiq on malformed raw files


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"candidate": "a"}, r"cap\.dress\.val\.json must hold a JSON list, got dict"),
        (["abc"], r"cap\.dress\.val\.json: FashionIQ val row 0 is 'abc', expected an object"),
        (
            [{"candidate": "a", "target": "b", "captions": "is red"}],
            r"cap\.dress\.val\.json: FashionIQ val row 0: captions must be a list of strings, got 'is red'",
        ),
    ],
)
def test_convert_fiq_refuses_malformed_raw_rows_naming_the_file(tmp_path, raw, message):
    from famevil_fast.data.fiq_convert import convert_fashioniq_val

    fiq = tmp_path / "FashionIQ"
    _write(fiq / "captions" / "cap.dress.val.json", raw)
    _write(fiq / "image_splits" / "split.dress.val.json", ["a", "b"])
    with pytest.raises(ValueError, match=message):
        convert_fashioniq_val(fiq, categories=("dress",))


# ------------------------------------------------------- image paths written on Windows or as absolute paths

# (reader, dataset directory, image folder of its train split)
_PRODUCT_READERS = [
    (read_fashiongen, "FashionGen", "train"),
    (read_fashion200k, "Fashion200k", "images"),
    (read_polyvore_outfits, "PolyvoreOutfits", "images"),
    (read_bigfacad, "BigFACAD", "images"),
]


def _product_row(pid, images):
    """A row every product reader accepts (FashionGen's keys plus BigFACAD's color)."""
    return dict(fashiongen_row(pid, images), color="red")


@pytest.mark.parametrize("reader, name, folder", _PRODUCT_READERS)
def test_windows_separators_in_image_paths_are_read_as_slashes(tmp_path, reader, name, folder):
    rows = [
        _product_row(1, ["women\\1_0.jpg", f"{folder}\\women\\1_1.jpg"]),
        _product_row(2, [".\\women\\2_0.jpg"]),
    ]
    _write(tmp_path / name / "train_info.json", rows)
    products = reader(tmp_path, "train")
    base = f"{name}/{folder}/women"
    assert products[0].images == (f"{base}/1_0.jpg", f"{base}/1_1.jpg")
    assert products[1].images == (f"{base}/2_0.jpg",)
    _write(tmp_path / name / "train_info.json", [_product_row(1, [".\\"])])
    with pytest.raises(ValueError, match=r"train_info\.json: entry 0 \(id 1\): image path .* names no file"):
        reader(tmp_path, "train")


def test_a_fashiongen_file_written_on_windows_loads_its_images(tmp_path):
    for v in range(2):
        noise_image(tmp_path / "FashionGen" / "train" / "sub" / f"1_{v}.png", 8, 8, seed=v)
    _write(
        tmp_path / "FashionGen" / "train_info.json",
        [fashiongen_row(1, ["sub\\1_0.png", "train\\sub\\1_1.png"])],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedImagesWarning)  # every image is found
        table = tasks.train_table("itc", tmp_path)
    assert table.images["pixels"][0] == ("FashionGen/train/sub/1_0.png", "FashionGen/train/sub/1_1.png")


@pytest.mark.parametrize("reader, name, folder", _PRODUCT_READERS)
def test_an_absolute_image_path_under_the_data_root_becomes_root_relative(tmp_path, reader, name, folder):
    inside = tmp_path / name / folder / "a.jpg"
    elsewhere = tmp_path / "other" / "b.jpg"  # under the data root, outside the dataset's directory
    windows = "\\".join(str(tmp_path / name / folder / "c.jpg").split("/"))
    _write(tmp_path / name / "train_info.json", [_product_row(1, [str(inside), str(elsewhere), windows])])
    assert reader(tmp_path, "train")[0].images == (
        f"{name}/{folder}/a.jpg",
        "other/b.jpg",
        f"{name}/{folder}/c.jpg",
    )
    link = tmp_path / "link"  # the data root reached through a symbolic link: the paths still lie under it
    link.symlink_to(tmp_path, target_is_directory=True)
    assert reader(link, "train")[0].images[:2] == (f"{name}/{folder}/a.jpg", "other/b.jpg")
    # read from the dataset directory as the data root: other/b.jpg is outside it, a.jpg relative to it
    with pytest.raises(ValueError, match=r"other/b\.jpg' is absolute and not under the data root"):
        reader(tmp_path / name, "train")
    _write(tmp_path / name / "train_info.json", [_product_row(1, [str(inside)])])
    assert reader(tmp_path / name, "train")[0].images == (f"{folder}/a.jpg",)


@pytest.mark.parametrize("reader, name, folder", _PRODUCT_READERS)
@pytest.mark.parametrize(
    "path", ["/data/{name}/{folder}/1_0.jpg", "C:\\data\\{name}\\1_0.jpg", "\\\\server\\share\\1.jpg"]
)
def test_an_absolute_image_path_elsewhere_is_refused_naming_file_entry_and_path(
    tmp_path, reader, name, folder, path
):
    path = path.format(name=name, folder=folder)
    _write(
        tmp_path / name / "train_info.json", [_product_row(1, ["ok.jpg"]), _product_row(7, ["ok.jpg", path])]
    )
    with pytest.raises(ValueError) as e:
        reader(tmp_path, "train")
    message = str(e.value)
    assert f"{name}/train_info.json: entry 1 (id 7): image path {path!r} is absolute" in message
    assert (
        f"not under the data root {tmp_path}" in message
        and f"relative to the image folder {name}/{folder}/" in message
    )


def test_fashioniq_names_with_windows_separators_or_absolute_paths(tmp_path):
    images = tmp_path / "FashionIQ" / "images"
    rows = [
        {"candidate": "sub\\a", "target": str(images / "b"), "captions": ["x", "y"]},
        {"candidate": str(images / "b"), "target": "sub/a", "captions": ["x", "y"]},
    ]
    path = tmp_path / "FashionIQ" / "captions" / "cap.dress.train.json"
    _write(path, rows)
    triplets = read_fashioniq(tmp_path, "train", ["dress"])
    assert [(t.candidate, t.target) for t in triplets] == [
        ("FashionIQ/images/sub/a.jpg", "FashionIQ/images/b.jpg"),
        ("FashionIQ/images/b.jpg", "FashionIQ/images/sub/a.jpg"),
    ]
    assert [t.target_id for t in triplets] == [0, 1]  # one name per image: "b" < "sub/a"
    _write(path, [rows[0], {**rows[1], "target": "/data/FashionIQ/images/c"}])
    with pytest.raises(
        ValueError, match=r"cap\.dress\.train\.json: entry 1: target '/data/FashionIQ/images/c' is absolute"
    ):
        read_fashioniq(tmp_path, "train", ["dress"])


# ------------------------------------------------------- a product listing one image twice among its views


@pytest.mark.parametrize("reader, name, folder", _PRODUCT_READERS)
def test_repeated_views_are_kept_once_with_one_warning_per_file(tmp_path, reader, name, folder):
    rows = [
        _product_row(1, ["1_0.jpg", "1_1.jpg", "1_0.jpg"]),
        _product_row(2, ["2_0.jpg"]),
        # the same image written three ways: bare, under the image folder, with a Windows separator
        _product_row(3, ["3_0.jpg", f"{folder}/3_0.jpg", f"{folder}\\3_0.jpg", "3_1.jpg"]),
    ]
    _write(tmp_path / name / "train_info.json", rows)
    with pytest.warns(DuplicateViewsWarning) as record:
        products = reader(tmp_path, "train")
    messages = [str(w.message) for w in record if w.category is DuplicateViewsWarning]
    assert len(messages) == 1
    message = messages[0]
    assert f"{name}/train_info.json: 2 product(s) list the same image more than once" in message
    assert (
        f"entry 0 (id 1) lists {name}/{folder}/1_0.jpg 2 times" in message and "3 repeated view(s)" in message
    )
    base = f"{name}/{folder}"
    assert [p.images for p in products] == [
        (f"{base}/1_0.jpg", f"{base}/1_1.jpg"),
        (f"{base}/2_0.jpg",),
        (f"{base}/3_0.jpg", f"{base}/3_1.jpg"),
    ]
    _write(tmp_path / name / "train_info.json", rows[1:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", DuplicateViewsWarning)
        assert reader(tmp_path, "train")[0].images == (f"{base}/2_0.jpg",)


def test_the_mvc_table_never_pairs_a_view_with_itself(tmp_path):
    from famevil_fast.data.pretrain import pretrain_table

    for v in range(2):
        noise_image(tmp_path / "FashionGen" / "train" / f"1_{v}.png", 8, 8, seed=v)
    noise_image(tmp_path / "FashionGen" / "train" / "2_0.png", 8, 8, seed=3)
    rows = [
        fashiongen_row(1, ["1_0.png", "1_1.png", "1_0.png"]),
        fashiongen_row(2, ["2_0.png", "train/2_0.png"]),
    ]
    _write(tmp_path / "FashionGen" / "train_info.json", rows)
    with pytest.warns(DuplicateViewsWarning, match="2 product"):
        table = pretrain_table("mvc", tmp_path)
    assert table.images["fused_pixels"] == [
        ("FashionGen/train/1_0.png", "FashionGen/train/1_1.png"),
        ("FashionGen/train/2_0.png",),
    ]


def test_fashionall_keeps_each_view_once_and_names_the_file(tmp_path):
    from test_data_fashionall import make_union

    root = make_union(tmp_path)
    path = root / "Fashion200k" / "train_info.json"
    rows = json.loads(path.read_text())
    rows[0]["images"] = rows[0]["images"] * 2
    _write(path, rows)
    with pytest.warns(DuplicateViewsWarning) as record:
        products = read_fashionall(root)
    named = [str(w.message).split(":")[0] for w in record if w.category is DuplicateViewsWarning]
    assert named == [str(path)]
    first = next(p for p in products if p.id == union_id("fashion200k", rows[0]["id"]))
    assert first.images == (f"Fashion200k/images/{rows[0]['images'][0]}",)
