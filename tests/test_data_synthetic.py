"""The synthetic catalogue: formats, determinism, id spaces and the properties that make its tasks fair."""

import contextlib
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_fixtures import synthetic

from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.data.fashioniq import read_fashioniq
from famevil_fast.data.synthetic import text
from famevil_fast.data.synthetic.generate import make_synthetic, sample_product
from famevil_fast.data.synthetic.render import ProductSpec, ViewSpec, render_view
from famevil_fast.data.synthetic.vocab import ATTRIBUTE_VOCABULARY, GARMENTS, SUBCATEGORIES


def _digest_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_vocabulary_fits_the_fashiongen_heads():
    assert len(GARMENTS) >= 12
    assert 12 <= len(SUBCATEGORIES) < 121
    assert len(ATTRIBUTE_VOCABULARY) < 2232
    assert len(set(SUBCATEGORIES)) == len(SUBCATEGORIES)


def test_fashiongen_files_follow_the_format(tmp_path_factory):
    root = synthetic(tmp_path_factory)
    for split in ("train", "val"):
        rows = json.loads((root / "FashionGen" / f"{split}_info.json").read_text())
        assert rows
        for row in rows:
            assert set(row) == {
                "images",
                "id",
                "title",
                "description",
                "attributes_id",
                "category_id",
                "subcategory_id",
            }
            assert 1 <= len(row["images"]) <= 4 and all(p.startswith(f"{split}/") for p in row["images"])
            assert 0 <= row["subcategory_id"] < len(SUBCATEGORIES) and 0 <= row["category_id"] < len(GARMENTS)
            assert all(0 <= a < len(ATTRIBUTE_VOCABULARY) for a in row["attributes_id"])
            assert row["title"] and row["description"]
            with Image.open(root / "FashionGen" / row["images"][0]) as im:
                assert im.format == "PNG" and im.mode == "P" and im.size == (48, 48)
                assert im.convert("RGB").getextrema() != ((0, 0), (0, 0), (0, 0))
    train = {r.id for r in read_fashiongen(root, "train")}
    assert not train & {r.id for r in read_fashiongen(root, "val")}


def test_fashioniq_files_follow_the_format(tmp_path_factory):
    root = synthetic(tmp_path_factory) / "FashionIQ"
    for gc, cat in enumerate(("dress", "shirt", "toptee")):
        train = json.loads((root / "captions" / f"cap.{cat}.train.json").read_text())
        assert train and all(
            set(r) == {"candidate", "target", "captions"} and len(r["captions"]) == 2 for r in train
        )
        val = json.loads((root / "captions" / f"cap.{cat}.val.json").read_text())
        split = json.loads((root / "image_splits" / f"split.{cat}.val.json").read_text())
        real = [r for r in val if not r["fake_data"]]
        fake = [r for r in val if r["fake_data"]]
        assert real and {r["garment_class"] for r in val} == {gc}
        assert [r["target"] for r in fake] == split  # one gallery row per val split image
        ids = {r["target"]: r["target_id"] for r in fake}
        assert all(ids[r["target"]] == r["target_id"] for r in real)
        for name in split[:3]:
            with Image.open(root / "images" / f"{name}.jpg") as im:
                assert im.format == "JPEG" and im.height == 48 and 36 <= im.width <= 48


def test_same_seed_same_bytes_any_worker_count_and_other_seed_differs(tmp_path):
    make_synthetic(tmp_path / "a", products=24, seed=5, image_size=40, workers=1)
    make_synthetic(tmp_path / "b", products=24, seed=5, image_size=40, workers=2)
    make_synthetic(tmp_path / "c", products=24, seed=6, image_size=40, workers=1)
    a, b, c = (_digest_tree(tmp_path / x) for x in "abc")
    assert a == b
    assert a["FashionGen/train_info.json"] != c["FashionGen/train_info.json"]


def test_a_rewrite_leaves_the_files_a_fresh_directory_gets(tmp_path):
    """Rewriting an earlier synthetic dataset removes the earlier images the new one does not draw again
    (other product counts, other views, other FashionIQ names), so the directory then holds byte for byte
    what a fresh one gets."""
    make_synthetic(tmp_path / "a", products=14, seed=5, image_size=32, fiq_images=30, workers=1)
    make_synthetic(tmp_path / "a", products=8, seed=6, image_size=32, workers=1)
    make_synthetic(tmp_path / "b", products=8, seed=6, image_size=32, workers=1)
    assert _digest_tree(tmp_path / "a") == _digest_tree(tmp_path / "b")


def test_only_a_synthetic_dataset_s_own_files_are_removed(tmp_path):
    from famevil_fast.data.synthetic.generate import files_not_written_by_make_synthetic

    real = tmp_path / "real" / "FashionGen" / "train" / "100999_0.png"  # no synthetic.json: not its dataset
    real.parent.mkdir(parents=True)
    real.write_bytes(b"a user's image")
    make_synthetic(tmp_path / "real", products=4, image_size=32, workers=1)
    assert real.read_bytes() == b"a user's image"
    own = tmp_path / "own"
    make_synthetic(own, products=4, image_size=32, workers=1)
    mine = [own / "FashionIQ" / "images" / "mine" / "B000000001.jpg", own / "FashionGen" / "notes.txt"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("mine")
    make_synthetic(own, products=6, seed=1, image_size=32, workers=1)
    assert all(path.read_text() == "mine" for path in mine)
    assert files_not_written_by_make_synthetic(own) == sorted(mine)


def test_products_are_distinct_and_text_names_every_attribute(tmp_path_factory):
    rng = np.random.default_rng(0)
    for _ in range(200):
        spec = sample_product(rng)
        words = f"{text.title(spec, rng)}.{text.description(spec, rng)}".lower()
        assert spec.colour in words and spec.material in words
        if spec.second:
            assert spec.second in words
    products = read_fashiongen(synthetic(tmp_path_factory), "train")
    assert len({p.attributes_id for p in products}) == len(products)  # attribute sets are unique
    subs = Counter(p.subcategory_id for p in products)
    assert len(subs) >= 8  # many classes present even in a tiny set: chance level is low


def test_modification_captions_name_exactly_the_changes():
    rng = np.random.default_rng(1)
    base = ProductSpec(
        "dress",
        "red",
        "dots",
        "white",
        (("length", "mini"), ("sleeve", "short"), ("neckline", "round")),
        "silk",
    )
    longer = base.replace(attrs=(("length", "maxi"), ("sleeve", "short"), ("neckline", "round")))
    assert text.changes(base, longer) == ["length"]
    blue_long = longer.replace(colour="blue")
    assert sorted(text.changes(base, blue_long)) == ["colour", "length"]
    for _ in range(20):
        caps = text.modification_captions(base, blue_long, rng)
        joined = " ".join(caps)
        assert len(caps) == 2 and all(caps) and "blue" in joined
        assert any(w in joined for w in ("longer", "floor length"))
        assert "sleeve" not in joined and "neck" not in joined  # unchanged attributes are not named
    with pytest.raises(ValueError, match="identical"):
        text.modification_captions(base, base, rng)


def _value(spec, kind):
    return getattr(spec, kind) if kind in ("colour", "pattern", "second") else spec.attr(kind)


def test_neither_the_reference_nor_the_text_alone_singles_out_the_target(tmp_path_factory):
    """The reference and its siblings are in the val gallery, and several gallery items agree with the
    target on what the captions name (families hold at most 8 images, though: the module docstring of
    ``famevil_fast.data.synthetic.generate`` says how far either alone gets at R@10 and R@50)."""
    root = synthetic(tmp_path_factory, products=90)
    attrs = json.loads((root / "FashionIQ" / "synthetic_attributes.json").read_text())

    def spec(name):
        a = dict(attrs[name])
        a.pop("category")
        a["attrs"] = tuple(tuple(x) for x in a["attrs"])
        return ProductSpec(**a)

    triplets = read_fashioniq(root, "val")
    text_matches = []
    for cat in range(3):
        rows = [t for t in triplets if t.category == cat]
        gallery = {Path(t.target).stem for t in rows}
        for t in (t for t in rows if not t.fake_data):
            ref, tgt = spec(Path(t.candidate).stem), spec(Path(t.target).stem)
            kinds = text.changes(ref, tgt)
            assert 1 <= len(kinds) <= 3 and Path(t.candidate).stem in gallery  # the reference is a distractor
            # gallery items agreeing with the target on every attribute the captions name
            same = [g for g in gallery if all(_value(spec(g), k) == _value(tgt, k) for k in kinds)]
            text_matches.append(len(same))
    assert np.median(text_matches) >= 2  # the text alone leaves several candidates


@pytest.mark.parametrize("fiq_images", [24, 27, 30, 33, 35])
def test_every_fashioniq_category_has_val_and_train_triplets_at_the_fewest_images(fiq_images):
    """Even when a category's share of images makes one family, the val split gets a family of its own."""
    from famevil_fast.data.synthetic.generate import _draw, _Settings

    for seed in range(12):
        _, _, captions, *_ = _draw(_Settings(2, seed, 0.15, fiq_images), Path("/unused"), 32)
        for category in ("dress", "shirt", "toptee"):
            assert [r for r in captions[(category, "val")] if not r["fake_data"]], (seed, category)
            assert captions[(category, "train")], (seed, category)


def test_the_fewest_fashioniq_images_give_every_category_its_queries(tmp_path):
    from famevil_fast.data.tasks import tgir_tables

    make_synthetic(tmp_path, products=2, seed=0, image_size=32, fiq_images=24, workers=1)
    triplets = read_fashioniq(tmp_path, "val")
    for category in range(3):
        queries, gallery = tgir_tables(triplets, category)
        assert len(queries) and len(gallery) >= 2


def test_looks_stay_distinct_up_to_the_most_there_are():
    """Past what drawing at random finds (plain trousers run out first), the looks left are drawn."""
    from famevil_fast.data.synthetic.generate import _Looks, _unique_product, garment_looks

    rng, looks = np.random.default_rng(0), _Looks()
    keys = [_unique_product(rng, looks, "trousers").visual_key() for _ in range(garment_looks("trousers"))]
    assert len(set(keys)) == len(keys) == 1848  # 14 colours x 66 colourings x 2 fits: every one
    with pytest.raises(ValueError, match="every look of trousers is drawn already"):
        _unique_product(rng, looks, "trousers")


def test_the_most_looks_bound_the_products_and_fashioniq_images(tmp_path, capsys):
    from famevil_fast.cli.commands import make_synthetic as command
    from famevil_fast.cli.main import main
    from famevil_fast.data.synthetic import generate
    from famevil_fast.data.synthetic.generate import _looks_of, fiq_image_count

    everything = {key for g in GARMENTS for key in _looks_of(g.name)}
    assert generate.MAX_PRODUCTS == len(everything) == 52668
    rng = np.random.default_rng(0)
    assert all(sample_product(rng).visual_key() in everything for _ in range(200))
    assert generate.MAX_FIQ_IMAGES == 3 * len(_looks_of("shirt")) + 2 == 11090  # a third of them shirts
    assert (command.MAX_PRODUCTS, command.MAX_FIQ_IMAGES) == (generate.MAX_PRODUCTS, generate.MAX_FIQ_IMAGES)
    assert [fiq_image_count(n) for n in (2, 500, 20000)] == [
        24,
        500,
        11090,
    ]  # the default: as many as products
    assert fiq_image_count(20000, 30) == 30
    with pytest.raises(ValueError, match="products must be <= 52668 .*, got 52669"):
        make_synthetic(tmp_path / "a", products=52669)
    with pytest.raises(ValueError, match="fiq_images must be <= 11090 .*, got 11091"):
        make_synthetic(tmp_path / "a", products=10, fiq_images=11091)
    for option, value in (("--products", 60000), ("--fiq-images", 12000)):
        assert main(["make-synthetic", str(tmp_path / "a"), option, str(value)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        limit = 52668 if option == "--products" else 11090
        assert error == [f"famevil-fast make-synthetic: error: {option} must be at most {limit}, got {value}"]
    assert not (tmp_path / "a").exists()


def test_render_is_deterministic_and_views_differ():
    spec = ProductSpec(
        "coat", "navy", "checks", "yellow", (("length", "knee"), ("closure", "double-breasted")), "wool"
    )
    front = ViewSpec(0.9, 0.5, 0.5, False, False, (255, 255, 255), 1.0)
    a = render_view(spec, front, 64, 64)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_view(spec, front, 64, 64))
    mirrored = render_view(spec, ViewSpec(0.9, 0.5, 0.5, True, False, (255, 255, 255), 1.0), 64, 64)
    assert np.abs(mirrored.astype(int) - a[:, ::-1].astype(int)).mean() < 8  # a mirror image, up to rounding
    assert not np.array_equal(mirrored, a)
    wide = render_view(spec, front, 80, 64)
    assert wide.shape == (64, 80, 3)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="products"):
        make_synthetic(tmp_path, products=1)
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic(tmp_path, products=10, image_size=8)


@pytest.mark.parametrize("val_fraction", [0.99, 0.01])
def test_both_fashiongen_splits_keep_a_product_at_extreme_val_fractions(tmp_path, val_fraction):
    summary = make_synthetic(tmp_path, products=4, image_size=32, val_fraction=val_fraction, workers=1)
    train, val = read_fashiongen(tmp_path, "train"), read_fashiongen(tmp_path, "val")
    assert (summary.products_train, summary.products_val) == (len(train), len(val))
    assert (len(train), len(val)) == ((1, 3) if val_fraction > 0.5 else (3, 1))


def _user_files(root: Path, names: tuple[str, ...]) -> list[Path]:
    paths = [root / name for name in names]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"a user's {path.name}".encode())
    return paths


_GENERATOR_LIKE = ("FashionGen/train/123_0.png", "FashionGen/val/7_3.png", "FashionIQ/images/B000000042.jpg")


def _stop_before(monkeypatch, name: str) -> None:
    """make_synthetic stops (as on Ctrl-C) on writing ``synthetic.json`` or on drawing its images."""
    import famevil_fast.data.synthetic.generate as generate

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    if name == "images":
        monkeypatch.setattr(generate, "_render_all", stop)
        return
    write = generate.atomic_write_json
    monkeypatch.setattr(
        generate,
        "atomic_write_json",
        lambda path, *a, **k: stop() if Path(path).name == name else write(path, *a, **k),
    )


def _files(root: Path) -> set[str]:
    return {k for k in _digest_tree(root) if k.startswith(("FashionGen/", "FashionIQ/"))}


@pytest.mark.parametrize("with_marker", [False, True])
def test_a_synthetic_json_the_generator_did_not_write_is_refused(tmp_path, monkeypatch, with_marker):
    """Refused before anything is written, also beside the marker of an interrupted run of the generator's."""
    if with_marker:
        with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
            _stop_before(patch, "synthetic.json")
            make_synthetic(tmp_path, products=4, image_size=32, workers=1)
    (tmp_path / "synthetic.json").write_text(json.dumps({"note": "my own notes"}))
    mine = _user_files(tmp_path, _GENERATOR_LIKE)
    before = _digest_tree(tmp_path)
    with pytest.raises(ValueError, match=r"synthetic\.json was not written by make-synthetic"):
        make_synthetic(tmp_path, products=6, seed=1, image_size=32, workers=1)
    assert _digest_tree(tmp_path) == before
    assert all(path.read_bytes() == f"a user's {path.name}".encode() for path in mine)


def _edit_settings(record: dict) -> None:
    record["settings"]["val_fraction"] = 0.5  # the image counts stay those of 0.15


@pytest.mark.parametrize(
    ("record_file", "edit"),
    [
        ("synthetic.json", _edit_settings),
        ("synthetic.writing", _edit_settings),
        ("synthetic.json", lambda record: record.pop("paths_sha256", None)),
    ],
)
def test_a_record_not_hashing_as_recorded_removes_nothing(tmp_path, monkeypatch, record_file, edit):
    """A record (or marker) edited by hand names paths the earlier dataset did not write: nothing is removed,
    neither a user's file at such a path nor the earlier dataset's files, which are named."""
    from famevil_fast.data.synthetic.generate import files_not_written_by_make_synthetic

    root, new = tmp_path / "a", dict(products=2, seed=9, image_size=32, workers=1)
    make_synthetic(tmp_path / "edited", products=10, val_fraction=0.5, image_size=32, workers=1)
    make_synthetic(tmp_path / "new", **new)
    with monkeypatch.context() as patch:
        if record_file == "synthetic.writing":
            _stop_before(patch, "synthetic.json")
        with contextlib.suppress(KeyboardInterrupt):
            make_synthetic(root, products=10, image_size=32, workers=1)
    earlier = _files(root)
    record = json.loads((root / record_file).read_text())
    edit(record)
    (root / record_file).write_text(json.dumps(record))
    user = sorted(_files(tmp_path / "edited") - earlier - _files(tmp_path / "new"))[0]
    (root / user).write_bytes(b"mine")
    make_synthetic(root, **new)
    assert (root / user).read_bytes() == b"mine"
    left = sorted((earlier | {user}) - _files(tmp_path / "new"))
    assert files_not_written_by_make_synthetic(root) == [root / name for name in left]


def _link_fashiongen_to_another_dataset(tmp_path: Path) -> tuple[Path, Path]:
    root, other = tmp_path / "a", tmp_path / "other"
    make_synthetic(root, products=6, image_size=32, workers=1)
    make_synthetic(other, products=6, seed=1, image_size=32, workers=1)
    (root / "FashionGen").rename(tmp_path / "moved")
    (root / "FashionGen").symlink_to(other / "FashionGen", target_is_directory=True)
    return root, other


def test_a_dataset_folder_linked_out_of_the_directory_is_refused(tmp_path):
    root, other = _link_fashiongen_to_another_dataset(tmp_path)
    before, other_before = _digest_tree(root), _digest_tree(other)
    with pytest.raises(ValueError, match=r"FashionGen is a link to .*other.*, outside .*: the synthetic"):
        make_synthetic(root, products=2, seed=7, image_size=32, workers=1)
    assert _digest_tree(root) == before and _digest_tree(other) == other_before


def test_a_rewrite_removes_no_file_through_a_link_out_of_the_directory(tmp_path, monkeypatch):
    """Were the link made while a run writes (past the check), the earlier files behind it stay, named."""
    import famevil_fast.data.synthetic.generate as generate
    from famevil_fast.data.synthetic.generate import files_not_written_by_make_synthetic

    root, other = _link_fashiongen_to_another_dataset(tmp_path)
    monkeypatch.setattr(generate, "_check_folders", lambda *args: None, raising=False)
    other_png = {p for p in _files(other) if p.endswith(".png")}
    make_synthetic(root, products=2, seed=7, image_size=32, workers=1)
    assert other_png <= _files(other)
    make_synthetic(tmp_path / "fresh", products=2, seed=7, image_size=32, workers=1)
    left = [root / name for name in sorted(other_png - _files(tmp_path / "fresh"))]
    assert left and set(left) <= set(files_not_written_by_make_synthetic(root))


def test_a_run_stopped_before_drawing_leaves_the_files_found_at_its_paths(tmp_path, monkeypatch):
    """Files at the stopped run's paths that neither it nor the earlier dataset wrote (a user's, named as the
    generator names its images) stay when the next run rewrites the directory; the rest is what a fresh one
    holds."""
    from famevil_fast.data.synthetic.generate import files_not_written_by_make_synthetic

    stopped, last = dict(products=14, seed=5, fiq_images=30), dict(products=4, seed=3)
    root = tmp_path / "a"
    make_synthetic(root, products=4, image_size=32, workers=1)
    make_synthetic(tmp_path / "stopped", **stopped, image_size=32, workers=1)
    make_synthetic(tmp_path / "last", **last, image_size=32, workers=1)
    names = _files(tmp_path / "stopped") - _files(root) - _files(tmp_path / "last")
    mine = _user_files(root, tuple(sorted(names)[:3]))
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        _stop_before(patch, "images")
        make_synthetic(root, **stopped, image_size=32, workers=1)
    make_synthetic(root, **last, image_size=32, workers=1)
    assert all(path.read_bytes() == f"a user's {path.name}".encode() for path in mine)
    rewritten = _digest_tree(root)
    names = {path.relative_to(root).as_posix() for path in mine}
    assert {k: v for k, v in rewritten.items() if k not in names} == _digest_tree(tmp_path / "last")
    assert files_not_written_by_make_synthetic(root) == sorted(mine)


def test_a_rewrite_with_other_settings_leaves_the_new_dataset_and_the_user_s_files(tmp_path):
    """Files of the user's with names the generator gives, there before the first run, stay; the earlier
    dataset's files the new one does not write go, whatever the product count and seed."""
    from famevil_fast.data.synthetic.generate import files_not_written_by_make_synthetic

    mine = _user_files(tmp_path / "a", _GENERATOR_LIKE)
    make_synthetic(tmp_path / "a", products=14, seed=5, image_size=32, fiq_images=30, workers=1)
    make_synthetic(tmp_path / "a", products=8, seed=6, image_size=32, workers=1)
    make_synthetic(tmp_path / "b", products=8, seed=6, image_size=32, workers=1)
    rewritten, fresh = _digest_tree(tmp_path / "a"), _digest_tree(tmp_path / "b")
    assert {k: v for k, v in rewritten.items() if k not in _GENERATOR_LIKE} == fresh
    assert all(path.read_bytes() == f"a user's {path.name}".encode() for path in mine)
    assert files_not_written_by_make_synthetic(tmp_path / "a") == sorted(mine)


def test_an_older_generator_s_dataset_is_left_in_place_and_named(tmp_path):
    """A synthetic.json without the settings the paths follow from (version 1): nothing of it is removed,
    and the files the new dataset does not write are named."""
    from famevil_fast.data.synthetic.generate import files_not_written_by_make_synthetic

    make_synthetic(tmp_path / "a", products=14, seed=5, image_size=32, fiq_images=30, workers=1)
    record = json.loads((tmp_path / "a" / "synthetic.json").read_text())
    record.pop("settings", None)
    (tmp_path / "a" / "synthetic.json").write_text(json.dumps({**record, "generator_version": 1}))
    earlier = _digest_tree(tmp_path / "a")
    make_synthetic(tmp_path / "a", products=8, seed=6, image_size=32, workers=1)
    make_synthetic(tmp_path / "b", products=8, seed=6, image_size=32, workers=1)
    rewritten, fresh = _digest_tree(tmp_path / "a"), _digest_tree(tmp_path / "b")
    left = sorted(set(rewritten) - set(fresh))
    assert left and left == sorted(set(earlier) - set(fresh) - {"synthetic.json"})
    assert files_not_written_by_make_synthetic(tmp_path / "a") == [tmp_path / "a" / name for name in left]


def test_a_link_at_an_image_name_is_replaced_not_written_through(tmp_path):
    root = tmp_path / "data"
    make_synthetic(root, products=4, seed=7, image_size=32, workers=1)
    image = sorted((root / "FashionGen" / "train").iterdir())[0]
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"precious")
    image.unlink()
    image.symlink_to(outside)
    make_synthetic(root, products=4, seed=7, image_size=32, workers=1)
    assert outside.read_bytes() == b"precious"
    assert not image.is_symlink() and image.read_bytes()[:4] == b"\x89PNG"


def test_a_writing_marker_the_generator_did_not_write_is_refused(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "synthetic.writing").write_text("my own notes\n")
    with pytest.raises(ValueError, match="synthetic.writing was not written by make-synthetic"):
        make_synthetic(root, products=4, seed=7, image_size=32, workers=1)
    assert (root / "synthetic.writing").read_text() == "my own notes\n"
