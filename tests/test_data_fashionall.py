"""FashionViL's pre-training union ``fashionall``: which datasets take part, unique ids, the pre-training
loaders on it (attributes, sharding, exact resume), the cache and token cache over its images, mining
attributes on it, and the ``data.dataset`` recipe field."""

import json
import warnings

import pytest
import torch
from test_data_fixtures import noise_image

from famevil_fast.cli.main import main
from famevil_fast.data.attributes import (
    AttributeFile,
    load_attributes,
    mine_dataset,
    read_attribute_file,
)
from famevil_fast.data.cache import ImageCache, build_cache, dataset_image_keys
from famevil_fast.data.fashionall import (
    ID_STRIDE,
    UNION_DATASETS,
    load_fashionall,
    read_fashionall,
    union_id,
    union_source,
)
from famevil_fast.data.pretrain import build_pretrain_loader, pretrain_table
from famevil_fast.data.tasks import read_products, train_table
from famevil_fast.train.config import load_config

# products per dataset in the tiny union (ids 1..n in every dataset: they collide)
SIZES = {"fashiongen": 5, "fashion200k": 4, "polyvoreoutfits": 3, "bigfacad": 4}
FG_VAL = 2


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))


def _image(path, seed):
    noise_image(path, 10, 12, seed=seed, smooth=True)


def _fashiongen(root, split, n, seed):
    rows = []
    for i in range(1, n + 1):
        views = [f"{split}/{i}_{v}.png" for v in range(2)]
        for v, view in enumerate(views):
            _image(root / "FashionGen" / view, seed + 10 * i + v)
        rows.append(
            {
                "images": views,
                "id": i,
                "title": f"fg {split} {i}",
                "description": "black cotton dress",
                "subcategory_id": i % 3,
                "attributes_id": [i, 100],
            }
        )
    _write(root / "FashionGen" / f"{split}_info.json", rows)


def make_union(root, datasets=UNION_DATASETS):
    """A data root with the four datasets in FashionViL's layout, every one with product ids 1..n and
    attributes_id [id + k * 10, 2231] (k = the dataset's position): ids collide, attributes differ."""
    if "fashiongen" in datasets:
        _fashiongen(root, "train", SIZES["fashiongen"], 0)
        _fashiongen(root, "val", FG_VAL, 500)
    if "fashion200k" in datasets:
        rows = []
        for i in range(1, SIZES["fashion200k"] + 1):
            _image(root / "Fashion200k" / "images" / f"dress/{i}.jpg", 1000 + i)
            rows.append(
                {
                    "images": [f"dress/{i}.jpg"],
                    "id": i,
                    "title": f"red silk dress {i}",
                    "attributes_id": [i + 10],
                }
            )
        _write(root / "Fashion200k" / "train_info.json", rows)
    if "polyvoreoutfits" in datasets:
        rows = []
        for i in range(1, SIZES["polyvoreoutfits"] + 1):
            _image(root / "PolyvoreOutfits" / "images" / f"{i}.jpg", 2000 + i)
            rows.append(
                {
                    "images": f"{i}.jpg",
                    "id": i,
                    "title": f"leather bag {i}",
                    "description": "black cotton",
                    "attributes_id": [i + 20, 2231],
                }
            )
        _write(root / "PolyvoreOutfits" / "train_info.json", rows)
        _image(root / "PolyvoreOutfits" / "images" / "99.jpg", 2099)
        _write(
            root / "PolyvoreOutfits" / "test_info.json",
            [{"images": "99.jpg", "id": 99, "title": "t", "description": "d", "attributes_id": []}],
        )
    if "bigfacad" in datasets:
        rows = []
        for i in range(1, SIZES["bigfacad"] + 1):
            views = [f"{i}_0.jpg", f"{i}_1.jpg"]
            for v, view in enumerate(views):
                _image(root / "BigFACAD" / "images" / view, 3000 + 10 * i + v)
            rows.append(
                {
                    "images": views,
                    "id": i,
                    "color": "navy",
                    "title": f"wool coat {i}",
                    "description": "black cotton lining",
                    "attributes_id": [i + 30, 2231],
                }
            )
        _write(root / "BigFACAD" / "train_info.json", rows)
    return root


@pytest.fixture(scope="module")
def union_root(tmp_path_factory):
    return make_union(tmp_path_factory.mktemp("fashionall"))


# ------------------------------------------------------------------------------------------ the union
def test_union_holds_every_train_split_with_unique_ids(union_root):
    union = load_fashionall(union_root)
    assert [p.dataset for p in union.parts] == list(UNION_DATASETS) and union.absent == ()
    assert [p.products for p in union.parts] == [SIZES[d] for d in UNION_DATASETS]
    products = union.products
    assert len(products) == sum(SIZES.values()) == 16
    ids = [p.id for p in products]
    assert len(set(ids)) == len(ids)
    for p in products:
        dataset, own = union_source(p.id)
        assert dataset == p.dataset and p.id == union_id(dataset, own)
        k = UNION_DATASETS.index(dataset)
        # each product keeps its own attributes_id (one shared vocabulary) and text
        assert p.attributes_id[0] == own + 10 * k if k else p.attributes_id == (own, 100)
    # FashionGen keeps its ids
    assert [p.id for p in products if p.dataset == "fashiongen"] == [1, 2, 3, 4, 5]
    assert {p.text for p in products if p.dataset == "bigfacad"} >= {"navy.wool coat 1.black cotton lining"}
    assert products[-1].images == ("BigFACAD/images/4_0.jpg", "BigFACAD/images/4_1.jpg")
    assert "FashionGen 5 + Fashion200k 4 + PolyvoreOutfits 3 + BigFACAD 4 = 16 products" in union.describe()
    assert read_products("fashionall", union_root, "train") == products


def test_union_validates_on_fashiongen_val(union_root, tmp_path):
    for split in ("val", "test"):
        val = read_products("fashionall", union_root, split)
        assert [(p.id, p.dataset) for p in val] == [(1, "fashiongen"), (2, "fashiongen")]
        assert val == read_products("fashiongen", union_root, "val")
    make_union(tmp_path, ("bigfacad",))
    with pytest.raises(FileNotFoundError, match="fashionall is validated on FashionGen val"):
        read_fashionall(tmp_path, "val")
    with pytest.raises(ValueError, match="split must be"):
        read_fashionall(union_root, "dev")


def test_union_of_the_datasets_found_names_the_missing_ones(tmp_path):
    make_union(tmp_path, ("fashiongen", "bigfacad"))
    (tmp_path / "Fashion200k").mkdir()
    with pytest.warns(UserWarning, match="not found under") as record:
        products = read_fashionall(tmp_path)
    message = str(record[0].message)
    assert "FashionGen 5 + BigFACAD 4 = 9 products" in message
    assert "Fashion200k/train_info.json (file not found)" in message
    assert "PolyvoreOutfits/ (no such directory)" in message
    assert len(products) == 9 and len({p.id for p in products}) == 9


def test_a_root_without_any_of_the_four_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="none of its four datasets") as e:
        read_products("fashionall", tmp_path, "train")
    assert "BigFACAD/train_info.json" in str(e.value)
    (tmp_path / "bigfacad").mkdir()
    with pytest.raises(FileNotFoundError, match=r"bigfacad \(must be named BigFACAD\)"):
        read_fashionall(tmp_path)
    make_union(tmp_path / "one", ("fashiongen",))
    with pytest.raises(FileNotFoundError, match="holds a train_info.json itself"):
        read_fashionall(tmp_path / "one" / "FashionGen")


def test_union_ids_need_the_range_of_their_dataset(tmp_path):
    assert union_id("bigfacad", 7) == 3 * ID_STRIDE + 7 and union_source(3 * ID_STRIDE + 7) == ("bigfacad", 7)
    with pytest.raises(ValueError, match="outside"):
        union_id("fashion200k", -1)
    with pytest.raises(ValueError, match="not a union product id"):
        union_source(4 * ID_STRIDE)
    _write(
        tmp_path / "Fashion200k" / "train_info.json", [{"images": ["a.jpg"], "id": ID_STRIDE, "title": "t"}]
    )
    with pytest.raises(ValueError, match=r"Fashion200k.*train_info\.json.*outside \[0, 2\*\*40\)"):
        read_fashionall(tmp_path)


# ------------------------------------------------------------------------------------------ loaders
def _loader(root, task, **kw):
    kw = {"batch_size": 4, "seed": 5, "backend": "pil", **kw}
    return build_pretrain_loader(
        task, root, image_size=16, device="cpu", prefetch=0, dataset="fashionall", **kw
    )


def test_itc_and_pretraining_tables_on_the_union(union_root):
    n = sum(SIZES.values())
    for table in (
        train_table("itc", union_root, dataset="fashionall"),
        pretrain_table("mvc", union_root, dataset="fashionall"),
    ):
        ids = table.fields["product_ids"]
        assert len(table) == n and len(set(ids.tolist())) == n and ids.dtype == torch.int64
    mvc = pretrain_table("mvc", union_root, dataset="fashionall")
    # the second view of MVC is drawn among the product's own views (by row, never by id)
    assert mvc.images["fused_pixels"] == [p.images for p in read_fashionall(union_root)]
    with pytest.raises(ValueError, match="reads"):
        train_table("scr", union_root, dataset="fashionall")


def test_union_loader_shards_over_ranks_and_resumes_exactly(union_root):
    whole = _loader(union_root, "itm", batch_size=4)
    ranks = [_loader(union_root, "itm", batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert len(whole) == len(ranks[0]) == 16 // 4
    seen = []
    for step, batch in enumerate(whole):
        parts = [r.batch(0, step) for r in ranks]
        joined = torch.cat([p["product_ids"] for p in parts])
        assert torch.equal(joined, batch["product_ids"])
        assert torch.equal(torch.cat([p["pixels"] for p in parts]), batch["pixels"])
        seen += batch["product_ids"].tolist()
    assert sorted(seen) == sorted(p.id for p in read_fashionall(union_root))  # an epoch covers the union once
    first = _loader(union_root, "mvc")
    stream = first.stream()
    next(stream)
    state = first.state_dict()
    want = next(stream)
    second = _loader(union_root, "mvc")
    second.load_state_dict(state)
    got = next(second.stream())
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_pac_on_the_union_looks_attributes_up_by_union_id(union_root):
    attributes = load_attributes(union_root, "dataset", "fashionall")
    assert attributes.dataset == "fashionall" and len(attributes.vocabulary) == 2232
    assert set(attributes.products) == {"train", "val"}
    own = {p.id: tuple(sorted(p.attributes_id)) for p in read_fashionall(union_root)}
    assert attributes.split("train") == own
    batch_ids = []
    for batch in _loader(union_root, "pac", attributes=attributes):
        for pid, row in zip(batch["product_ids"].tolist(), batch["attribute_ids"].tolist()):
            assert tuple(a for a in row if a >= 0) == own[pid]
            batch_ids.append(pid)
    assert len(batch_ids) == 16
    # product 1 of each dataset: four different attribute rows under four different ids
    firsts = {union_id(d, 1) for d in UNION_DATASETS}
    assert len({own[i] for i in firsts}) == 4


def test_attributes_of_one_dataset_are_refused_for_another(union_root):
    fashiongen = mine_dataset(union_root, "fashiongen", min_count=1)
    with pytest.raises(ValueError, match="attributes of fashiongen products, but the table reads fashionall"):
        pretrain_table("pac", union_root, dataset="fashionall", attributes=fashiongen)
    union = mine_dataset(union_root, "fashionall", min_count=2)
    assert len(pretrain_table("pac", union_root, dataset="fashiongen", attributes=union)) == 5
    with pytest.raises(ValueError, match="reads bigfacad"):
        pretrain_table("pac", union_root, dataset="bigfacad", attributes=union)
    unrecorded = AttributeFile(union.vocabulary, {"train": {}}, "old file")
    with pytest.raises(ValueError, match="no attributes for 16 fashionall train products"):
        pretrain_table("pac", union_root, dataset="fashionall", attributes=unrecorded)


def test_mine_attributes_over_the_union(union_root, tmp_path, capsys):
    out = tmp_path / "attrs.json"
    command = ["mine-attributes", str(union_root), "--dataset", "fashionall", "--out", str(out)]
    assert main([*command, "--min-count", "3"]) == 0
    printed = capsys.readouterr().out
    assert "fashionall train: FashionGen 5 + Fashion200k 4 + PolyvoreOutfits 3 + BigFACAD 4" in printed
    mined = read_attribute_file(out)
    assert mined.dataset == "fashionall"
    union = read_fashionall(union_root)
    assert sorted(mined.split("train")) == sorted(p.id for p in union)
    assert sorted(mined.split("val")) == [1, 2]
    # "black" and "cotton" are in FashionGen, PolyvoreOutfits and BigFACAD texts: mined over the union only
    assert {"black", "cotton", "dress"} <= set(mined.vocabulary.attributes)
    for p in union:
        assert mined.split("train")[p.id] == mined.vocabulary.encode(p.text)
    bag = union_id("polyvoreoutfits", 1)
    assert mined.vocabulary.index["black"] in mined.split("train")[bag]
    table = pretrain_table("pac", union_root, dataset="fashionall", attributes=mined)
    assert len(table) == 16


# ------------------------------------------------------------------------------------------ cache
def test_cache_covers_the_new_datasets_and_serves_the_union_loader(union_root, tmp_path, capsys, monkeypatch):
    keys = dataset_image_keys(union_root)
    assert "PolyvoreOutfits/images/1.jpg" in keys
    assert "PolyvoreOutfits/images/99.jpg" in keys  # the test split too
    assert "BigFACAD/images/4_1.jpg" in keys and "Fashion200k/images/dress/1.jpg" in keys
    assert len(keys) == 2 * 5 + 2 * 2 + 4 + 3 + 1 + 2 * 4
    out = tmp_path / "cache"
    assert main(["cache", str(union_root), str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "polyvoreoutfits/test" in printed and "bigfacad/train" in printed and "fashiongen/val" in printed
    assert sorted(ImageCache(out).keys()) == keys
    # the union's token ids come from the token files of its datasets' own lists
    import famevil_fast.data.tokens as tokens

    monkeypatch.setattr(tokens, "_tokenize", lambda *a: (_ for _ in ()).throw(AssertionError("not cached")))
    table = pretrain_table(
        "mvc", union_root, dataset="fashionall", cache_dir=out, image_cache=ImageCache(out)
    )
    assert len(table) == 16
    monkeypatch.undo()
    cached = _loader(union_root, "mvc", backend="cache", cache_dir=out)
    plain = _loader(union_root, "mvc")
    for a, b in zip(cached, plain):
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_cache_of_a_dataset_directory_reads_only_that_dataset(tmp_path):
    make_union(tmp_path, ("bigfacad",))
    assert dataset_image_keys(tmp_path / "BigFACAD") == sorted(
        f"images/{i}_{v}.jpg" for i in range(1, 5) for v in range(2)
    )
    make_union(tmp_path / "g", ("fashiongen",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no BigFACAD / PolyvoreOutfits reader on FashionGen's files
        summary = build_cache(tmp_path / "g" / "FashionGen", tmp_path / "c", tokenize=True)
    assert "fashiongen/train" in summary.datasets and summary.failed == 0


# ------------------------------------------------------------------------------------------ recipe field
def test_data_dataset_field_names_the_choices():
    config = load_config("configs/pretrain_tiny_cpu.yaml", ["data.dataset=fashionall"])
    assert config.data.dataset == "fashionall"
    assert load_config("configs/pretrain_tiny_cpu.yaml").data.dataset is None
    with pytest.raises(ValueError, match=r"data.dataset must be one of .*'fashionall'.*got 'polyvore'"):
        load_config("configs/pretrain_tiny_cpu.yaml", ["data.dataset=polyvore"])


def test_the_recipe_field_reaches_the_training_streams(union_root):
    """`data.dataset: fashionall` makes the trainer's itc and pre-training streams (and PAC's attributes)
    read the union; the other tasks keep their own datasets."""
    from famevil_fast.train.data_feed import build_streams, pac_attributes
    from famevil_fast.train.distributed import DistInfo

    overrides = [
        f"data.root={union_root}",
        "data.dataset=fashionall",
        "data.batch_size=2",
        "data.image_size=32",
        "model.tasks=[itc, mvc, pac]",
        "train.task_weights={}",
        "data.attribute_min_count=1",
    ]
    config = load_config(None, overrides)
    union_size = sum(SIZES.values())
    streams = build_streams(config, DistInfo(), torch.device("cpu"))
    try:
        assert {task: len(s.loader.table) for task, s in streams.items()} == dict.fromkeys(
            ("itc", "mvc", "pac"), union_size
        )
    finally:
        for stream in streams.values():
            stream.close()
    assert pac_attributes(config).dataset == "fashionall"
