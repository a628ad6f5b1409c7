"""Train loaders (batch contract, exact resume, sharding, skipped images), eval sets and the data CLI."""

import json
import warnings

import pytest
import torch
from test_data_fixtures import synthetic

from famevil_fast.cli.main import main as cli
from famevil_fast.data import build_eval_sets, build_train_loader
from famevil_fast.data.cache import build_cache
from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.data.images import SkippedImagesWarning

S = 32


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic(tmp_path_factory)


def _loader(root, task="itc", **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("image_size", S)
    kw.setdefault("backend", "pil")
    kw.setdefault("device", "cpu")
    return build_train_loader(task, root, **kw)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


EXPECTED = {
    "itc": {"pixels", "input_ids", "product_ids"},
    "tgir": {"ref_pixels", "target_pixels", "input_ids", "target_ids", "category"},
    "scr": {"pixels", "input_ids", "labels"},
    "cap": {"pixels", "input_ids"},
}


@pytest.mark.parametrize("task", ["itc", "tgir", "scr", "cap"])
def test_batch_contract(root, task):
    loader = _loader(root, task)
    batch = next(iter(loader))
    assert set(batch) == EXPECTED[task]
    for k, v in batch.items():
        assert v.shape[0] == 8 and v.device.type == "cpu"
        if k.endswith("pixels"):
            assert v.shape == (8, 3, S, S) and v.dtype == torch.float32 and -2.5 < v.min() < v.max() < 2.5
        else:
            assert v.dtype == torch.int64
    assert batch["input_ids"].shape == (8, 77) and (batch["input_ids"][:, 0] == 49406).all()
    if task == "scr":
        assert ((batch["labels"] >= 0) & (batch["labels"] < 121)).all()
    if task == "tgir":
        assert set(batch["category"].tolist()) <= {0, 1, 2}
        assert not torch.equal(batch["ref_pixels"], batch["target_pixels"])


def test_fashiongen_text_and_ids_line_up(root):
    from famevil_fast.text import tokenize

    products = {p.id: p for p in read_fashiongen(root, "train")}
    batch = next(iter(_loader(root, "itc")))
    for pid, ids in zip(batch["product_ids"].tolist(), batch["input_ids"]):
        assert torch.equal(ids, tokenize([products[pid].text])[0])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_reproduces_the_remaining_batches_exactly(root, prefetch):
    loader = _loader(root, "tgir", seed=3, prefetch=prefetch)
    n = len(loader)
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    assert state["epoch"] == 0 and state["position"] == 2
    rest = list(it) + list(loader)  # the rest of epoch 0, then all of epoch 1
    assert len(rest) == 2 * n - 2 and loader.epoch == 2

    resumed = _loader(root, "tgir", seed=3, prefetch=2)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    again = list(resumed) + list(resumed)
    assert len(again) == len(rest) and all(_same(a, b) for a, b in zip(rest, again))
    assert not _same(rest[0], rest[n - 2])  # epochs differ


def test_set_epoch_semantics_and_epoch_orders(root):
    loader = _loader(root, "itc")
    first = [b["product_ids"] for b in loader]
    assert loader.epoch == 1 and loader.state_dict()["position"] == 0
    loader.set_epoch(1)  # the epoch it is already at: no effect
    second = [b["product_ids"] for b in loader]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    seen = torch.cat(first)
    assert len(seen) == len(loader) * 8 and len(set(seen.tolist())) == len(seen)  # no repeats in an epoch
    loader.set_epoch(0)
    assert all(torch.equal(a, b["product_ids"]) for a, b in zip(first, loader))
    other_seed = _loader(root, "itc", seed=1)
    assert not torch.equal(next(iter(other_seed))["product_ids"], first[0])


@pytest.mark.parametrize("task", ["itc", "tgir"])
def test_ranks_split_the_global_batch(root, task):
    single = _loader(root, task, batch_size=8)
    ranks = [_loader(root, task, batch_size=4, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(single)
    for whole, a, b in zip(single, *ranks):
        assert _same(whole, {k: torch.cat([a[k], b[k]]) for k in whole})
        if task == "itc":
            assert not set(a["product_ids"].tolist()) & set(b["product_ids"].tolist())


def test_undecodable_image_mid_epoch_drops_samples_with_one_warning(tmp_path_factory, tmp_path):
    import shutil

    src = synthetic(tmp_path_factory)
    shutil.copytree(src, tmp_path / "d")
    products = read_fashiongen(tmp_path / "d", "train")
    for p in products[:3]:
        for view in p.images:
            (tmp_path / "d" / view).write_bytes(b"corrupt")
    loader = _loader(tmp_path / "d", "scr", batch_size=8)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        batches = list(loader)
    skipped = [w for w in record if issubclass(w.category, SkippedImagesWarning)]
    assert len(skipped) == 1 and "skipped" in str(skipped[0].message)
    sizes = [len(b["labels"]) for b in batches]
    assert all(len(b["pixels"]) == len(b["input_ids"]) == len(b["labels"]) for b in batches)
    covered = len(loader) * 8
    bad_in_epoch = sum(1 for i in loader.permutation(0)[:covered] if i < 3)
    assert sum(sizes) == covered - bad_in_epoch


def test_loader_validation(root):
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _loader(root, "itc", batch_size=10_000)
    with pytest.raises(ValueError, match="rank"):
        _loader(root, "itc", rank=2, world_size=2)
    with pytest.raises(ValueError, match="unknown task"):
        _loader(root, "vqa")
    with pytest.raises(ValueError, match="reads"):
        _loader(root, "scr", dataset="fashioniq")
    loader = _loader(root, "itc")
    with pytest.raises(ValueError, match="batch_size"):
        loader.load_state_dict({**loader.state_dict(), "batch_size": 4})
    with pytest.raises(ValueError, match="drop_last is False in the state but True here"):
        loader.load_state_dict({**loader.state_dict(), "drop_last": False})
    with pytest.raises(ValueError, match=rf"position {len(loader)} outside 0\.\.{len(loader) - 1}"):
        loader.load_state_dict({**loader.state_dict(), "position": len(loader)})  # never saved: would stall
    older = {k: v for k, v in loader.state_dict().items() if k != "drop_last"}
    loader.load_state_dict({**older, "position": 1})  # a state from before drop_last was recorded
    assert loader.state_dict()["position"] == 1
    with pytest.raises(ValueError, match="backend 'cache' needs cache_dir"):
        _loader(root, "itc", backend="cache")


def test_cache_backed_loader_equals_file_loader(root, tmp_path):
    build_cache(root, tmp_path / "cache")
    files = _loader(root, "tgir", seed=5)
    cached = build_train_loader(
        "tgir", root, batch_size=8, image_size=S, seed=5, device="cpu", cache_dir=tmp_path / "cache"
    )
    assert cached.backend.name == "cache"
    for a, b, _ in zip(files, cached, range(3)):
        assert _same(a, b)


def test_eval_sets_follow_the_protocols(root):
    products = read_fashiongen(root, "val")
    n_views = sum(len(p.images) for p in products)
    xmr = build_eval_sets("itc", root, image_size=S, batch_size=16, backend="pil", device="cpu")
    batches = list(xmr.images)
    assert sum(len(b["pixels"]) for b in batches) == n_views == xmr.images.num_samples
    assert set(batches[0]) == {"pixels", "product_ids", "subcategory"}
    assert xmr.texts["input_ids"].shape == (len(products), 77)
    assert xmr.texts["product_ids"].tolist() == [p.id for p in products]
    assert torch.equal(
        torch.cat([b["pixels"] for b in xmr.images]), torch.cat([b["pixels"] for b in batches])
    )

    scr = build_eval_sets("scr", root, image_size=S, backend="pil", device="cpu")
    b = next(iter(scr.samples))
    assert set(b) == {"pixels", "input_ids", "labels", "product_ids"} and scr.samples.num_samples == n_views
    cap = build_eval_sets("cap", root, image_size=S, backend="pil", device="cpu")
    assert len(cap.references) == n_views and cap.references[0] == products[0].text

    tgir = build_eval_sets("tgir", root, image_size=S, backend="pil", device="cpu")
    assert list(tgir.categories) == ["dress", "shirt", "toptee"]
    for c, (name, part) in enumerate(tgir.categories.items()):
        split = json.loads((root / "FashionIQ" / "image_splits" / f"split.{name}.val.json").read_text())
        gallery = torch.cat([g["target_ids"] for g in part.gallery])
        assert gallery.tolist() == list(range(len(split)))  # every split image, fake rows included
        q = next(iter(part.queries))
        assert set(q) == {"ref_pixels", "input_ids", "target_ids", "category"} and (q["category"] == c).all()
        assert set(q["target_ids"].tolist()) <= set(gallery.tolist())


def test_cli_commands(tmp_path, capsys):
    assert (
        cli(
            [
                "make-synthetic",
                str(tmp_path / "d"),
                "--products",
                "12",
                "--seed",
                "1",
                "--image-size",
                "40",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "FashionGen" in capsys.readouterr().out
    assert cli(["cache", str(tmp_path / "d"), str(tmp_path / "c"), "--no-progress", "--shard-mb", "1"]) == 0
    assert cli(["cache", "--verify", str(tmp_path / "c")]) == 0
    assert "checksums match" in capsys.readouterr().out
    shard = next((tmp_path / "c" / "shards").glob("*.bin"))
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    assert cli(["cache", "--verify", str(tmp_path / "c")]) == 1
    assert cli(["convert-fiq", str(tmp_path / "d" / "FashionIQ"), "--out", str(tmp_path / "fiq")]) == 0
    assert (tmp_path / "fiq" / "cap.dress.val.json").read_text() == (
        tmp_path / "d" / "FashionIQ" / "captions" / "cap.dress.val.json"
    ).read_text()


@pytest.mark.parametrize("n", [31, 33, 34, 35, 64])
def test_no_rank_gets_an_empty_batch_without_drop_last(n):
    from types import SimpleNamespace

    from famevil_fast.data.loader import TrainLoader
    from famevil_fast.data.tasks import SampleTable

    table = SampleTable("ids", (), {}, {"product_ids": torch.arange(n)})
    backend = SimpleNamespace(device=torch.device("cpu"))

    def loader(batch_size, rank=0, world_size=1):
        return TrainLoader(table, backend, batch_size, 3, rank, world_size, drop_last=False, prefetch=0)

    ranks = [list(loader(16, r, 2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(loader(16, 0, 2))
    assert all(len(b["product_ids"]) > 0 for batches in ranks for b in batches)
    single = [b["product_ids"] for b in loader(32)]  # the ranks together = one process, step by step
    for whole, a, b in zip(single, *ranks):
        assert torch.equal(whole, torch.cat([a["product_ids"], b["product_ids"]]))
    seen = sum(len(b["product_ids"]) for batches in ranks for b in batches)
    assert seen == (n if n % 32 != 1 else n - 1)  # a last step of one sample cannot feed two ranks


def _json_only_copy(src, dst):
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.png", "*.jpg"))
    return dst


def test_file_check_with_a_cache_looks_in_the_cache(root, tmp_path):
    build_cache(root, tmp_path / "cache")
    json_only = _json_only_copy(root, tmp_path / "d")
    rows = json.loads((json_only / "FashionGen" / "train_info.json").read_text())
    extra = {**rows[0], "id": 999_999, "images": ["train/not_cached.png"]}
    (json_only / "FashionGen" / "train_info.json").write_text(json.dumps(rows + [extra]))
    for task, n in (("itc", len(rows)), ("tgir", len(_loader(root, "tgir").table))):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            loader = build_train_loader(
                task, json_only, batch_size=4, image_size=S, device="cpu", cache_dir=tmp_path / "cache"
            )
        assert len(loader.table) == n
        skipped = [str(w.message) for w in record if issubclass(w.category, SkippedImagesWarning)]
        assert len(skipped) == (0 if task == "tgir" else 1)
        if task == "itc":
            assert "skipped 1 of" in skipped[0] and "not_cached.png (not in the image cache)" in skipped[0]


@pytest.mark.parametrize("task", ["itc", "tgir"])
def test_evaluation_sets_read_a_cache_of_a_json_only_copy(root, tmp_path, task):
    """Annotation files copied without their images, with a cache of the original: every sample is found in
    the cache (one warning says the roots differ), and the pixels are the original's."""
    build_cache(root, tmp_path / "cache")
    json_only = _json_only_copy(root, tmp_path / "d")
    kwargs = {"image_size": S, "device": "cpu", "batch_size": 8}
    with pytest.warns(UserWarning, match="built from data root") as record:
        cached = build_eval_sets(task, json_only, cache_dir=tmp_path / "cache", **kwargs)
    assert not [w for w in record if issubclass(w.category, SkippedImagesWarning)]
    original = build_eval_sets(task, root, backend="pil", **kwargs)
    if task == "itc":
        got, want = next(iter(cached.images)), next(iter(original.images))
    else:
        got, want = (
            next(iter(cached.categories["dress"].gallery)),
            next(iter(original.categories["dress"].gallery)),
        )
    assert len(got["pixels"]) == len(want["pixels"]) > 0
    torch.testing.assert_close(got["pixels"], want["pixels"], atol=2 / 255, rtol=0)


@pytest.mark.parametrize("task", ["itc", "scr", "cap", "tgir"])
def test_an_empty_val_split_is_named_for_every_task(root, tmp_path, task):
    empty = _json_only_copy(root, tmp_path / "d")
    (empty / "FashionGen" / "val_info.json").write_text("[]")
    (empty / "FashionIQ" / "captions" / "cap.dress.val.json").write_text("[]")
    expected = r"no products in .*val_info\.json" if task != "tgir" else r"no dress queries .*cap\.dress\.val"
    with pytest.raises(ValueError, match=expected):
        build_eval_sets(task, empty, image_size=S, backend="pil", device="cpu", check_files=False)
