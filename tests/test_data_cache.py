"""The pre-decoded image cache: contents, resumable and atomic conversion, corruption detection, tokens."""

import json
import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_fixtures import small_fashiongen_root, synthetic

import famevil_fast.data.cache as cache_mod
from famevil_fast.data.backends import make_backend
from famevil_fast.data.backends.cache_backend import CacheBackend
from famevil_fast.data.cache import CacheCorruptError, ImageCache, build_cache, dataset_image_keys
from famevil_fast.data.tokens import text_digest, tokenize_texts
from famevil_fast.data.transforms import CropPlan, counter_uniforms


def test_cache_holds_exact_pixels_and_keys(tmp_path):
    root = small_fashiongen_root(tmp_path)
    summary = build_cache(root, tmp_path / "cache", shard_bytes=4000)
    keys = dataset_image_keys(root)
    assert summary.images == len(keys) == 24 and summary.failed == 0 and summary.shards > 3
    cache = ImageCache(tmp_path / "cache")
    assert sorted(cache.keys()) == keys
    for key in keys[:5]:
        assert np.array_equal(cache.get(key), np.asarray(Image.open(root / key).convert("RGB")))


def test_cache_backend_matches_file_backend_on_both_resamplers(tmp_path_factory, tmp_path):
    root = synthetic(tmp_path_factory)
    build_cache(root, tmp_path / "c", tokenize=False)
    keys = sorted(ImageCache(tmp_path / "c").keys())[::7][:20] + ["not/cached.png"]
    plan = CropPlan(counter_uniforms(2, 1, np.arange(len(keys))))
    ref = make_backend("pil", root, 32).load(keys, plan)
    for resampler, tol in (("pil", 0.0), ("torch", 1.0 / 255 / 0.26 + 1e-4)):
        out = CacheBackend(tmp_path / "c", 32, resampler=resampler).load(keys, plan)
        assert out.ok.tolist() == ref.ok.tolist() and out.failures[0][0] == "not/cached.png"
        assert (out.pixels - ref.pixels).abs().max() <= tol


def test_interrupted_conversion_resumes_and_keeps_complete_shards(tmp_path, monkeypatch):
    root = small_fashiongen_root(tmp_path)
    real = cache_mod._decode
    calls = {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if calls["n"] > 15:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(cache_mod, "_decode", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(root, tmp_path / "cache", shard_bytes=3000, num_threads=1, tokenize=False)
    shard_dir = tmp_path / "cache" / "shards"
    done = sorted(p.name for p in shard_dir.glob("*.json"))
    assert done and not (tmp_path / "cache" / "cache.json").exists()  # index only when complete
    first = {p.name: p.stat().st_mtime_ns for p in shard_dir.glob("*.bin")}
    monkeypatch.setattr(cache_mod, "_decode", real)
    summary = build_cache(root, tmp_path / "cache", shard_bytes=3000, num_threads=1, tokenize=False)
    assert summary.images == 24 and summary.new_images < 24 and not list(shard_dir.glob("*.tmp"))
    assert all((shard_dir / n).stat().st_mtime_ns == t for n, t in first.items())  # kept, not rewritten
    cache = ImageCache(tmp_path / "cache")
    assert len(cache) == 24
    key = "FashionGen/train/11_1.png"
    assert np.array_equal(cache.get(key), np.asarray(Image.open(root / key).convert("RGB")))


def test_corrupted_or_truncated_shard_is_detected_and_rebuilt(tmp_path):
    root = small_fashiongen_root(tmp_path)
    build_cache(root, tmp_path / "cache", shard_bytes=3000, tokenize=False)
    shard = sorted((tmp_path / "cache" / "shards").glob("*.bin"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match=shard.name):
        ImageCache(tmp_path / "cache")
    ImageCache(tmp_path / "cache", verify=False)  # size still right: only the checksum sees it
    summary = build_cache(root, tmp_path / "cache", shard_bytes=3000, tokenize=False)
    assert 0 < summary.new_images < 24
    assert not shard.exists()  # the bad shard was dropped, its images went into a new one
    ImageCache(tmp_path / "cache")
    shard = sorted((tmp_path / "cache" / "shards").glob("*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheCorruptError, match="bytes"):
        ImageCache(tmp_path / "cache", verify=False)


def test_undecodable_images_are_recorded_not_cached(tmp_path):
    root = small_fashiongen_root(tmp_path, n=3)
    (root / "FashionGen" / "train" / "1_0.png").write_bytes(b"broken")
    summary = build_cache(root, tmp_path / "cache", tokenize=False)
    assert summary.failed == 1 and summary.images == 5
    cache = ImageCache(tmp_path / "cache")
    out = CacheBackend(cache, 16).load(["FashionGen/train/1_0.png"], CropPlan())
    assert not out.ok.any() and "could not be decoded" in out.failures[0][1]


def test_missing_cache_and_max_side(tmp_path):
    with pytest.raises(FileNotFoundError, match="famevil-fast cache"):
        ImageCache(tmp_path / "none")
    root = small_fashiongen_root(tmp_path, n=2)
    build_cache(root, tmp_path / "small", max_side=10, tokenize=False)
    cache = ImageCache(tmp_path / "small")
    assert all(max(cache.get(k).shape[:2]) <= 10 for k in cache.keys())
    with pytest.raises(ValueError, match="max_side"):
        build_cache(root, tmp_path / "small", max_side=12, tokenize=False)


def test_a_root_without_datasets_is_refused_before_the_output_is_made(tmp_path):
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(FileNotFoundError, match="no FashionGen"):
        build_cache(tmp_path / "empty_root", tmp_path / "out" / "cache")
    assert not (tmp_path / "out").exists()


def test_token_cache_is_content_addressed(tmp_path, monkeypatch):
    texts = ["a red dress.Silk.", "blue shirt, has long sleeves"]
    ids = tokenize_texts(texts, tmp_path)
    assert ids.shape == (2, 77) and ids.dtype == torch.int64 and ids[0, 0] == 49406
    assert (tmp_path / "tokens" / f"{text_digest(texts)}.npy").is_file()
    import famevil_fast.data.tokens as tokens

    def fail(*a):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(tokens, "_tokenize", fail)
    assert torch.equal(tokenize_texts(texts, tmp_path), ids)
    assert text_digest(texts) != text_digest(texts[::-1])
    with pytest.raises(AssertionError):
        tokenize_texts(["new text"], tmp_path)


def test_build_cache_prefills_the_tokens_the_loaders_use(tmp_path_factory, tmp_path, monkeypatch):
    root = synthetic(tmp_path_factory)
    build_cache(root, tmp_path / "c")
    import famevil_fast.data.tokens as tokens
    from famevil_fast.data.tasks import train_table

    monkeypatch.setattr(tokens, "_tokenize", lambda *a: (_ for _ in ()).throw(AssertionError("not cached")))
    for task in ("itc", "tgir"):
        assert len(train_table(task, root, cache_dir=tmp_path / "c")) > 0


def test_cache_backend_skips_a_batch_whose_images_are_all_missing(tmp_path):
    root = small_fashiongen_root(tmp_path, n=2)
    (root / "FashionGen" / "train" / "1_0.png").write_bytes(b"broken")
    build_cache(root, tmp_path / "cache", tokenize=False)
    paths = ["FashionGen/train/1_0.png", "FashionGen/train/nope.png"]
    for resampler in ("pil", "torch"):
        backend = CacheBackend(tmp_path / "cache", 16, resampler=resampler)
        for n in (1, 2):
            out = backend.load(paths[:n], CropPlan(counter_uniforms(0, 0, np.arange(n))))
            assert out.pixels.shape == (0, 3, 16, 16) and not out.ok.any() and len(out.failures) == n


def test_16bit_png_is_cached_scaled_to_8_bits(tmp_path):
    values = (np.arange(40 * 56).reshape(40, 56) / (40 * 56 - 1) * 65535).astype(np.uint16)
    (tmp_path / "data").mkdir()
    Image.fromarray(values).save(tmp_path / "data" / "g16.png")
    build_cache(tmp_path / "data", tmp_path / "cache", keys=["g16.png"], tokenize=False)
    cached = ImageCache(tmp_path / "cache").get("g16.png")
    assert np.array_equal(cached[..., 0], np.rint(values / 257.0).astype(np.uint8))


def _interrupted_build(root, out, monkeypatch, **kw):
    real = cache_mod._decode
    calls = {"n": 0}

    def dying(*args):
        calls["n"] += 1
        if calls["n"] > 14:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(cache_mod, "_decode", dying)
    with pytest.raises(KeyboardInterrupt):
        build_cache(root, out, shard_bytes=500, num_threads=1, tokenize=False, **kw)
    monkeypatch.setattr(cache_mod, "_decode", real)
    assert list((out / "shards").glob("*.json")) and not (out / "cache.json").exists()


def test_resume_with_another_max_side_or_root_is_refused(tmp_path, monkeypatch):
    root = small_fashiongen_root(tmp_path, n=12)
    out = tmp_path / "cache"
    _interrupted_build(root, out, monkeypatch, max_side=12)
    manifest = json.loads(sorted((out / "shards").glob("*.json"))[0].read_text())
    assert manifest["max_side"] == 12
    with pytest.raises(ValueError, match="--max-side 12"):
        build_cache(root, out, shard_bytes=500, max_side=16, tokenize=False)
    with pytest.raises(ValueError, match="--max-side 12"):
        build_cache(root, out, shard_bytes=500, tokenize=False)
    other = small_fashiongen_root(tmp_path / "other", n=12)
    with pytest.raises(ValueError, match="data root"):
        build_cache(other, out, shard_bytes=500, max_side=12, tokenize=False)
    build_cache(root, out, shard_bytes=500, max_side=12, tokenize=False)
    cache = ImageCache(out)
    assert len(cache) == 24 and all(max(cache.get(k).shape[:2]) <= 12 for k in cache.keys())


def test_unreadable_manifest_or_index_is_named_and_rebuilt(tmp_path):
    root = small_fashiongen_root(tmp_path, n=6)
    out = tmp_path / "cache"
    build_cache(root, out, shard_bytes=1500, tokenize=False)
    manifest = sorted((out / "shards").glob("*.json"))[1]
    manifest.write_text('{"file": "shard_00001.bin", "keys": ["\x01')
    with pytest.raises(CacheCorruptError, match=manifest.name):
        ImageCache(out)
    with pytest.warns(UserWarning, match=manifest.name):
        build_cache(root, out, shard_bytes=1500, tokenize=False)
    assert len(ImageCache(out)) == 12
    (out / "cache.json").write_text("")
    with pytest.raises(CacheCorruptError, match="cache.json"):
        ImageCache(out)
    with pytest.warns(UserWarning, match="cache.json"):
        summary = build_cache(root, out, shard_bytes=1500, tokenize=False)
    assert summary.new_images == 0 and len(ImageCache(out)) == 12


def test_truncated_token_file_fails_verify_and_is_rebuilt(tmp_path):
    texts = ["a red dress.Silk.", "blue shirt, has long sleeves"]
    root = small_fashiongen_root(tmp_path, n=2)
    out = tmp_path / "cache"
    build_cache(root, out)
    ids = tokenize_texts(texts, out)
    path = out / "tokens" / f"{text_digest(texts)}.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CacheCorruptError, match=path.name):
        ImageCache(out)
    with pytest.warns(UserWarning, match=path.name):
        assert torch.equal(tokenize_texts(texts, out), ids)
    ImageCache(out)
    path.write_bytes(b"")  # a stale file no text list needs: rerunning `cache` removes it
    with pytest.warns(UserWarning, match=path.name):
        build_cache(root, out)
    ImageCache(out)


def test_cache_backend_checks_the_data_root(tmp_path):
    root = small_fashiongen_root(tmp_path, n=2)
    build_cache(root, tmp_path / "cache", tokenize=False)
    other = small_fashiongen_root(tmp_path / "other", n=2)
    with pytest.warns(UserWarning, match="built from data root") as warned:
        CacheBackend(tmp_path / "cache", 16, root=other)  # moved, or annotations without images: served
    message = str(warned[0].message)
    assert os.path.realpath(root) in message and os.path.realpath(other) in message
    key = "FashionGen/train/1_0.png"
    expected = CacheBackend(tmp_path / "cache", 16, root=root).load([key], CropPlan()).pixels
    inner = CacheBackend(tmp_path / "cache", 16, root=root / "FashionGen").load(["train/1_0.png"], CropPlan())
    assert inner.ok.all() and torch.equal(inner.pixels, expected)
    # the FashionGen directory passed without telling the backend: a clear error, not empty batches
    with pytest.raises(ValueError, match="relative to"):
        CacheBackend(tmp_path / "cache", 16).load(["train/1_0.png"], CropPlan())
    # a cache of the FashionGen directory used with the data root above it
    build_cache(root / "FashionGen", tmp_path / "inner", keys=["train/1_0.png"], tokenize=False)
    outer = CacheBackend(tmp_path / "inner", 16, root=root).load([key, "FashionIQ/x.png"], CropPlan())
    assert outer.ok.tolist() == [True, False] and torch.equal(outer.pixels, expected)


def test_cache_with_a_max_side_below_the_image_size_warns(tmp_path):
    root = small_fashiongen_root(tmp_path, n=2)
    build_cache(root, tmp_path / "cache", max_side=12, tokenize=False)
    with pytest.warns(UserWarning, match="--max-side 12.*image size 16"):
        CacheBackend(tmp_path / "cache", 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CacheBackend(tmp_path / "cache", 12)


def test_an_image_that_broke_stays_unserved_when_its_file_is_then_removed(tmp_path):
    """An image cached, then replaced by a broken file (listed as failed, its old entry no longer served),
    then removed: the next conversion tries it again and lists it as failed again, rather than serving the
    pixels it had before it broke."""
    root = small_fashiongen_root(tmp_path, n=3)
    out, key = tmp_path / "cache", "FashionGen/train/1_0.png"
    quiet = {"shard_bytes": 1 << 20, "num_threads": 1, "tokenize": False}
    build_cache(root, out, **quiet)
    for shard in (out / "shards").glob("*.bin"):
        os.utime(shard, (1e9, 1e9))  # cached long ago: the broken file below is newer
    (root / key).write_bytes(b"broken")
    with pytest.warns(UserWarning, match="changed since they were cached"):
        build_cache(root, out, **quiet)
    assert key in ImageCache(out).failed and key not in ImageCache(out)
    (root / key).unlink()
    build_cache(root, out, **quiet)
    cache = ImageCache(out)
    assert key in cache.failed and key not in cache


def test_a_conversion_removes_the_index_a_killed_one_left_half_written(tmp_path):
    root = small_fashiongen_root(tmp_path, n=2)
    out = tmp_path / "cache"
    build_cache(root, out, num_threads=1, tokenize=False)
    stale = out / ".cache.json.k1ll3d.tmp"
    stale.write_text('{"version": ')
    build_cache(root, out, num_threads=1, tokenize=False)
    assert not stale.exists() and len(ImageCache(out)) == 4


def test_an_image_changed_while_its_shard_is_written_is_decoded_again(tmp_path, monkeypatch):
    """An image rewritten after it was decoded but before its shard was finished is newer than the time
    its entry records, so the next conversion decodes it again instead of serving the old pixels."""
    root = small_fashiongen_root(tmp_path, n=3)
    out, key = tmp_path / "cache", "FashionGen/train/1_0.png"
    quiet = {"shard_bytes": 1 << 20, "num_threads": 1, "tokenize": False}
    decode = cache_mod._decode

    def decode_then_change(root_dir, k, max_side):
        pixels = decode(root_dir, k, max_side)
        if k == key:
            Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(root / key)
        return pixels

    monkeypatch.setattr(cache_mod, "_decode", decode_then_change)
    build_cache(root, out, **quiet)
    monkeypatch.setattr(cache_mod, "_decode", decode)
    with pytest.warns(UserWarning, match="1 images changed since they were cached"):
        assert build_cache(root, out, **quiet).new_images == 1
    assert (ImageCache(out).get(key) == 99).all()


def test_a_rebuild_of_some_keys_keeps_the_other_failures(tmp_path):
    """A failure recorded by an earlier conversion stays recorded (its old entry unserved) when a later one
    is given other keys."""
    root = small_fashiongen_root(tmp_path, n=3)
    out, broken, other = tmp_path / "cache", "FashionGen/train/1_0.png", "FashionGen/train/2_0.png"
    quiet = {"shard_bytes": 1 << 20, "num_threads": 1, "tokenize": False}
    build_cache(root, out, **quiet)
    (root / broken).write_bytes(b"broken")
    with pytest.warns(UserWarning, match="changed since they were cached"):
        build_cache(root, out, **quiet)
    assert broken in ImageCache(out).failed
    summary = build_cache(root, out, keys=[other], **quiet)
    assert summary.failed == 0
    cache = ImageCache(out)
    assert broken in cache.failed and broken not in cache and other in cache


@pytest.mark.parametrize("damage", ["fewer_offsets", "offset_past_the_end", "negative_offset"])
def test_a_manifest_whose_entries_do_not_fit_is_named_and_rebuilt(tmp_path, damage):
    """A manifest whose keys, offsets and shapes do not line up, or whose entry leaves its shard, is named
    when the cache opens (not a reshape error at the first read) and rebuilt by the next conversion."""
    root = small_fashiongen_root(tmp_path, n=3)
    out = tmp_path / "cache"
    quiet = {"shard_bytes": 1 << 20, "num_threads": 1, "tokenize": False}
    build_cache(root, out, **quiet)
    path = sorted((out / "shards").glob("*.json"))[0]
    manifest = json.loads(path.read_text())
    if damage == "fewer_offsets":
        manifest["offsets"] = manifest["offsets"][:-1]
    else:
        manifest["offsets"][-1] = manifest["bytes"] if damage == "offset_past_the_end" else -1
    path.write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match=rf"{path.name} holds .*rerun `famevil-fast cache`"):
        ImageCache(out)
    with pytest.warns(UserWarning, match=path.name):
        build_cache(root, out, **quiet)
    assert len(ImageCache(out)) == 6


def _paint(path, value, when):
    """Replace the image ``path`` with a uniform 8 x 8 one of ``value``, modified at ``when``."""
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    os.utime(path, (when, when))


def test_an_image_replaced_by_a_copy_keeping_an_older_time_is_decoded_again(tmp_path):
    """A replacement whose modification time is older than the cache (``cp -p``, ``rsync -a``, ``tar x``)
    differs from the size and time its entry records, so the next conversion decodes it again."""
    root = small_fashiongen_root(tmp_path, n=3)
    out, key = tmp_path / "cache", "FashionGen/train/1_0.png"
    quiet = {"shard_bytes": 1 << 20, "num_threads": 1, "tokenize": False}
    build_cache(root, out, **quiet)
    _paint(root / key, 77, 1e9)  # 2001: older than every shard
    with pytest.warns(UserWarning, match="1 images changed since they were cached"):
        assert build_cache(root, out, **quiet).new_images == 1
    assert (ImageCache(out).get(key) == 77).all()


def test_an_image_dated_in_the_future_is_decoded_once(tmp_path, monkeypatch):
    """An unchanged image whose modification time lies after every conversion (a clock ahead of this one)
    matches its source record: later conversions leave it cached."""
    root = small_fashiongen_root(tmp_path, n=3)
    out, key = tmp_path / "cache", "FashionGen/train/1_0.png"
    quiet = {"shard_bytes": 1 << 20, "num_threads": 1, "tokenize": False}
    future = time.time() + 10**6
    os.utime(root / key, (future, future))
    build_cache(root, out, **quiet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_cache(root, out, **quiet).new_images == 0


def test_entries_without_source_records_fall_back_to_the_decoding_time(tmp_path):
    """A shard written before source records existed: an image newer than its shard's decoding is decoded
    again (and recorded this time), an older one is kept."""
    root = small_fashiongen_root(tmp_path, n=3)
    out, newer, older = tmp_path / "cache", "FashionGen/train/1_0.png", "FashionGen/train/2_0.png"
    quiet = {"shard_bytes": 1 << 20, "num_threads": 1, "tokenize": False}
    build_cache(root, out, **quiet)
    (manifest_path,) = (out / "shards").glob("*.json")
    manifest = json.loads(manifest_path.read_text())
    del manifest["sources"]
    manifest_path.write_text(json.dumps(manifest))
    shard = out / "shards" / manifest["file"]
    built = shard.stat().st_mtime
    _paint(root / newer, 55, built + 100)
    _paint(root / older, 66, built - 100)
    with pytest.warns(UserWarning, match="1 images changed since they were cached"):
        build_cache(root, out, **quiet)
    cache = ImageCache(out)
    assert (cache.get(newer) == 55).all() and not (cache.get(older) == 66).all()
    (new_manifest,) = set((out / "shards").glob("*.json")) - {manifest_path}
    assert json.loads(new_manifest.read_text())["sources"][0][1] == (root / newer).stat().st_mtime_ns
