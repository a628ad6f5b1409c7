"""Compaction of the pre-decoded image cache: reclaimed bytes, identical pixels, untouched when there is
nothing to reclaim, complete after an interruption at any step, the changed-image check of later
conversions, and the CLI."""

import contextlib
import json
import os
import shutil
import time
import warnings

import numpy as np
import pytest
from test_data_fixtures import noise_image, small_fashiongen_root

import famevil_fast.data.cache as cache_mod
from famevil_fast.cli.main import main
from famevil_fast.data.cache import CacheCorruptError, ImageCache, build_cache
from famevil_fast.data.cache_compact import compact_cache

A, B, C, D, E, F = (f"FashionGen/train/{name}.png" for name in ("0_0", "1_0", "1_1", "2_0", "4_0", "3_0"))
NOW = time.time()


def _set_mtime(path, when):
    os.utime(path, (when, when))


def _change(root, key, when, seed):
    """Replace the image ``key`` with other pixels, modified at ``when``."""
    noise_image(root / key, 21, 27, seed=seed, smooth=True)
    _set_mtime(root / key, when)


def _build(root, out, **kw):
    """One conversion writing one shard, quiet about the images it finds changed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_cache(root, out, shard_bytes=1 << 20, num_threads=1, **kw)


def _age_new_shard(out, when):
    _set_mtime(max((out / "shards").glob("*.bin")), when)


def _superseded_cache(tmp_path):
    """A cache of 12 images whose four conversions left superseded entries: shard 0 (all images), shard 1
    (B, C, D: all decoded again later), shard 2 (B, C, D; F undecodable now), shard 3 (D)."""
    root, out = small_fashiongen_root(tmp_path, n=6), tmp_path / "cache"
    for image in root.rglob("*.png"):
        _set_mtime(image, NOW - 10000)
    _build(root, out)  # with the token files
    _age_new_shard(out, NOW - 9000)
    for round_, (changed, written) in enumerate(
        [((B, C, D), NOW - 8000), ((B, C, D), NOW - 7000), ((D,), NOW - 6000)]
    ):
        for key in changed:
            _change(root, key, written - 500, seed=100 * round_ + len(key) + ord(key[-5]))
        if round_ == 1:
            (root / F).write_bytes(b"broken")
            _set_mtime(root / F, written - 500)
        _build(root, out, tokenize=False)
        _age_new_shard(out, written)
    return root, out


def _pixels(out):
    cache = ImageCache(out)
    return {key: np.array(cache.get(key)) for key in cache.keys()}, dict(cache.failed)


def _assert_serves(out, pixels, failed):
    """The cache ``out`` opens (checksums verified) and serves exactly ``pixels``, with ``failed``."""
    served, served_failed = _pixels(out)
    assert served_failed == failed and served.keys() == pixels.keys()
    assert all(np.array_equal(served[key], pixels[key]) for key in pixels)


def _files(directory):
    """Every file under ``directory``: (size, modification time, inode) by relative path."""
    return {
        p.relative_to(directory).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _decoded(monkeypatch):
    """The keys every later conversion decodes, recorded."""
    seen: list[str] = []
    real = cache_mod._decode
    monkeypatch.setattr(
        cache_mod, "_decode", lambda root, key, side: seen.append(key) or real(root, key, side)
    )
    return seen


def _served_bytes(pixels):
    return sum(p.nbytes for p in pixels.values())


# ---------------------------------------------------------------- what compaction does


def test_compaction_reclaims_superseded_bytes_and_serves_the_same_pixels(tmp_path):
    root, out = _superseded_cache(tmp_path)
    pixels, failed = _pixels(out)
    assert sorted(failed) == [F] and len(pixels) == 11
    tokens = {k: v[:2] for k, v in _files(out / "tokens").items()}
    kept_shard = _files(out / "shards")["shard_00003.bin"]
    summary = compact_cache(out)
    assert (summary.shards_before, summary.shards_after, summary.kept, summary.resumed) == (4, 2, 11, False)
    assert summary.dropped == 4 + 3 + 1  # shard 0: B, C, D, F; shard 1: all; shard 2: D
    assert summary.rewritten == 10  # shard 0's 8 served entries and shard 2's B and C
    assert summary.bytes_after == _served_bytes(pixels) < summary.bytes_before
    assert summary.reclaimed == summary.bytes_before - summary.bytes_after > 0
    names = sorted(_files(out / "shards"))
    assert names == ["shard_00003.bin", "shard_00003.json", "shard_00004.bin", "shard_00004.json"]
    assert _files(out / "shards")["shard_00003.bin"] == kept_shard  # whole shards are left as they are
    assert not (out / "compacting.json").exists()
    _assert_serves(out, pixels, failed)
    assert {k: v[:2] for k, v in _files(out / "tokens").items()} == tokens
    manifest = json.loads((out / "shards" / "shard_00004.json").read_text())
    assert manifest["written"] == [NOW - 9000] * 8 + [NOW - 7000] * 2  # when each was first decoded
    # a reader ignoring them takes the earliest: decodes again rather than miss a changed image
    assert (out / "shards" / "shard_00004.bin").stat().st_mtime == pytest.approx(NOW - 9000, abs=1e-3)
    assert manifest["root"] == os.path.abspath(root) and manifest["max_side"] is None


@pytest.mark.skipif(os.name != "posix", reason="a mapped file can be removed on POSIX systems only")
def test_a_reader_that_has_the_cache_open_keeps_serving_the_same_pixels(tmp_path):
    _, out = _superseded_cache(tmp_path)
    pixels, _ = _pixels(out)
    reader = ImageCache(out)  # memory maps of shards 0-3
    compact_cache(out)
    assert not (out / "shards" / "shard_00000.bin").exists()
    assert all(np.array_equal(reader.get(key), pixels[key]) for key in pixels)


def test_nothing_to_reclaim_rewrites_nothing(tmp_path, capsys):
    root, out = small_fashiongen_root(tmp_path, n=6), tmp_path / "cache"
    _build(root, out)
    before = _files(out)
    summary = compact_cache(out)
    assert (summary.reclaimed, summary.dropped, summary.rewritten, summary.kept) == (0, 0, 0, 12)
    assert summary.shards_before == summary.shards_after == 1
    assert _files(out) == before
    assert main(["cache", "--compact", str(out), "--no-progress"]) == 0
    assert "nothing to reclaim, 12 images in 1 shards" in capsys.readouterr().out
    assert _files(out) == before


def test_a_compacted_cache_is_compacted_again_as_a_no_op(tmp_path):
    _, out = _superseded_cache(tmp_path)
    compact_cache(out)
    before = _files(out)
    assert compact_cache(out).reclaimed == 0 and _files(out) == before


def test_leftovers_of_a_killed_conversion_are_removed_without_rewriting_the_index(tmp_path):
    root, out = small_fashiongen_root(tmp_path, n=6), tmp_path / "cache"
    _build(root, out)
    (out / "shards" / "shard_00001.bin.tmp").write_bytes(b"x" * 100)  # killed while writing
    (out / "shards" / "shard_00002.bin").write_bytes(b"y" * 50)  # killed before its manifest
    index = _files(out)["cache.json"]
    summary = compact_cache(out)
    assert summary.reclaimed == 150 and summary.rewritten == 0
    assert sorted(_files(out / "shards")) == ["shard_00000.bin", "shard_00000.json"]
    assert _files(out)["cache.json"] == index


# ---------------------------------------------------------------- later conversions


def test_a_later_conversion_decodes_only_what_changed(tmp_path, monkeypatch):
    root, out = _superseded_cache(tmp_path)
    _change(root, A, NOW - 3000, seed=7)  # after its shard was written, before the compaction
    plain = tmp_path / "plain"
    shutil.copytree(out, plain)  # (copy2: modification times kept)
    compact_cache(out)
    decoded = _decoded(monkeypatch)
    _build(root, plain, tokenize=False)
    without_compaction = sorted(decoded)
    decoded.clear()
    _build(root, out, tokenize=False)
    assert sorted(decoded) == without_compaction == [A, F]  # F is undecodable: tried on every run
    cache = ImageCache(out)
    assert np.array_equal(cache.get(A), ImageCache(plain).get(A))
    decoded.clear()
    assert _build(root, out, tokenize=False).new_images == 0 and decoded == [F]
    _change(root, E, time.time() + 100, seed=8)  # an image of the compacted shard, changed afterwards
    decoded.clear()
    _build(root, out, tokenize=False)
    assert sorted(decoded) == sorted([E, F])
    assert np.array_equal(
        ImageCache(out).get(E), np.asarray(noise_image(tmp_path / "e.png", 21, 27, 8, True))
    )


# ---------------------------------------------------------------- interruptions


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even the clean-up of ``finally`` blocks."""


@contextlib.contextmanager
def _killed_at(monkeypatch, step):
    """Let ``step`` file renames and removals happen, then fail every later one with :class:`Killed`."""
    done = {"n": 0}

    def guard(real):
        def operation(*args, **kwargs):
            if done["n"] >= step:
                raise Killed
            done["n"] += 1
            return real(*args, **kwargs)

        return operation

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", guard(os.replace))
        patch.setattr(os, "unlink", guard(os.unlink))
        yield done


def test_compaction_killed_at_any_step_leaves_a_complete_cache_and_a_rerun_finishes(tmp_path, monkeypatch):
    root, base = _superseded_cache(tmp_path)
    pixels, failed = _pixels(base)
    clean = tmp_path / "clean"
    shutil.copytree(base, clean)
    with _killed_at(monkeypatch, 10**9) as done:
        expected = compact_cache(clean, shard_bytes=8000)  # new shards of 4 images
    steps, final = done["n"], sorted(_files(clean / "shards"))
    new = expected.shards_after - 1  # (shard 3 is kept)
    assert (
        new >= 2 and steps == 1 + 2 * new + 1 + 3 * 2 + 1
    )  # journal, new shards, index, old shards, journal
    decoded = _decoded(monkeypatch)
    for step in range(steps):
        for build_between in (False, True):
            out = tmp_path / f"killed_{step}_{build_between}"
            shutil.copytree(base, out)
            with _killed_at(monkeypatch, step), pytest.raises(Killed):
                compact_cache(out, shard_bytes=8000)
            _assert_serves(out, pixels, failed)  # openable (checksums verified), nothing lost
            if build_between:  # a conversion run on the interrupted compaction decodes nothing new
                decoded.clear()
                _build(root, out, tokenize=False)
                assert decoded == [F], (step, decoded)
            summary = compact_cache(out, shard_bytes=8000)
            assert summary.resumed == (step > 0), step
            assert summary.bytes_after == expected.bytes_after, step
            if not build_between:
                assert sorted(_files(out / "shards")) == final, step
            _assert_serves(out, pixels, failed)
            leftovers = [
                p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == "compacting.json"
            ]
            assert not leftovers, (step, leftovers)


def test_an_unreadable_journal_is_ignored_with_a_warning(tmp_path):
    _, out = _superseded_cache(tmp_path)
    (out / "compacting.json").write_text("{")
    with pytest.warns(UserWarning, match="compacting.json"):
        summary = compact_cache(out)
    assert summary.resumed and summary.shards_after == 2 and not (out / "compacting.json").exists()


# ---------------------------------------------------------------- errors


def test_what_is_not_a_complete_cache_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compact_cache(tmp_path / "none")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        compact_cache(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="not an image cache: it holds no cache.json"):
        compact_cache(tmp_path)
    _, out = _superseded_cache(tmp_path)
    shard = out / "shards" / "shard_00002.bin"  # one whose served entries are copied
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    before = _files(out)
    with pytest.raises(CacheCorruptError, match="shard_00002.bin fails its checksum"):
        compact_cache(out)
    assert _files(out) == before


def test_shards_of_an_unfinished_conversion_are_not_compacted_away(tmp_path):
    root, out = small_fashiongen_root(tmp_path, n=6), tmp_path / "cache"
    _build(root, out)
    for suffix in (".bin", ".json"):  # complete, but not in cache.json yet
        shutil.copy(out / "shards" / f"shard_00000{suffix}", out / "shards" / f"shard_00007{suffix}")
    before = _files(out)
    with pytest.raises(
        ValueError, match=r"shard_00007.bin\) of an unfinished conversion.*famevil-fast cache"
    ):
        compact_cache(out)
    assert _files(out) == before


# ---------------------------------------------------------------- famevil-fast cache --compact OUT


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("famevil-fast cache: error: "), err
    return err[0]


def test_cli_compacts_prints_the_bytes_reclaimed_and_verifies_afterwards(tmp_path, capsys):
    _, out = _superseded_cache(tmp_path)
    capsys.readouterr()
    assert main(["cache", "--compact", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr()
    assert "compact: 100%" in printed.err and "10/10" in printed.err  # the progress bar: entries copied
    line = printed.out.strip()
    assert (
        "\n" not in line
        and line.startswith(f"cache {out}: reclaimed ")
        and "8 entries no longer served" in line
    )
    assert "11 images in 2 shards" in line and "was 4 shards" in line
    assert main(["cache", "--verify", str(out)]) == 0
    assert "11 images, 2 shards, checksums match" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cache", "--compact", "ROOT", "OUT"], "--compact rewrites the existing cache and reads no dataset"),
        (
            ["cache", "--compact", "--max-side", "64", "OUT"],
            "--max-side only applies when building a cache, not with --compact",
        ),
        (
            ["cache", "--compact", "--shard-mb", "8", "OUT"],
            "--shard-mb only applies when building a cache, not with --compact",
        ),
        (["cache", "--compact", "--verify", "OUT"], "--verify and --compact are separate runs"),
        (["cache", "--compact", "NO_SUCH_DIR"], "image cache NO_SUCH_DIR does not exist"),
    ],
)
def test_cli_refusals_are_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in _error_line(capsys)


def test_cli_names_a_corrupted_shard(tmp_path, capsys):
    _, out = _superseded_cache(tmp_path)
    shard = out / "shards" / "shard_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    capsys.readouterr()
    assert main(["cache", "--compact", str(out), "--no-progress"]) == 2
    assert "shard_00000.bin has" in _error_line(capsys)


def test_cli_help_shows_the_compact_form(capsys):
    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--compact [--threads THREADS] [--no-progress] out" in text and "bytes reclaimed" in text


def _stray_conversion_shard(out, number):
    """A complete shard no index lists, as a conversion killed before writing cache.json leaves it (no
    ``written`` times: compaction did not write it)."""
    source = out / "shards" / "shard_00003"
    target = out / "shards" / f"shard_{number:05d}"
    shutil.copyfile(source.with_suffix(".bin"), target.with_suffix(".bin"))
    manifest = json.loads(source.with_suffix(".json").read_text())
    assert "written" not in manifest
    target.with_suffix(".json").write_text(json.dumps({**manifest, "file": target.with_suffix(".bin").name}))
    return target.with_suffix(".bin")


def test_a_killed_conversion_s_shard_survives_the_rerun_of_an_interrupted_compaction(tmp_path, monkeypatch):
    """After a compaction killed before its new index, a conversion killed before its own index leaves a
    complete shard numbered among the compaction's new ones: the rerun undoes only what compaction wrote,
    and stops naming the conversion's shard rather than deleting it."""
    _, out = _superseded_cache(tmp_path)
    pixels, failed = _pixels(out)
    with _killed_at(monkeypatch, 2), pytest.raises(Killed):  # the journal and one new shard's data
        compact_cache(out, shard_bytes=8000)
    writes_from = json.loads((out / "compacting.json").read_text())["writes_from"]
    stray = _stray_conversion_shard(out, writes_from + 1)
    with pytest.raises(ValueError, match=rf"complete shards \({stray.name}\) of an unfinished conversion"):
        compact_cache(out, shard_bytes=8000)
    assert stray.is_file() and stray.with_suffix(".json").is_file()
    assert not (out / "compacting.json").exists()  # the interrupted compaction itself was undone
    _assert_serves(out, pixels, failed)


def test_an_index_listing_a_shard_twice_is_refused_before_anything_is_removed(tmp_path):
    _, out = _superseded_cache(tmp_path)
    index = json.loads((out / "cache.json").read_text())
    index["shards"].insert(0, index["shards"][-1])
    (out / "cache.json").write_text(json.dumps(index))
    before = _files(out)
    with pytest.raises(ValueError, match=r"cache.json lists shard_00003.bin more than once"):
        compact_cache(out)
    assert _files(out) == before


def test_a_conversion_does_not_trust_a_manifest_copied_from_another_shard(tmp_path):
    """A stray copy of shard 0's manifest under another number would make the index list shard 0 twice."""
    root, out = _superseded_cache(tmp_path)
    shutil.copyfile(out / "shards" / "shard_00000.json", out / "shards" / "shard_00007.json")
    with pytest.warns(UserWarning, match=r"shard_00007.json describes shard_00000.bin"):
        build_cache(root, out, shard_bytes=1 << 20, num_threads=1, tokenize=False)
    files = [s["file"] for s in json.loads((out / "cache.json").read_text())["shards"]]
    assert len(files) == len(set(files)) and "shard_00007.bin" not in files


def test_compaction_keeps_the_source_records(tmp_path, monkeypatch):
    """A copied entry keeps its source record: an image replaced after the compaction by a file dated
    before every conversion is still seen as changed."""
    root, out = _superseded_cache(tmp_path)
    compact_cache(out)
    _change(root, B, NOW - 20000, seed=9)  # B's served entry was copied into a new shard
    decoded = _decoded(monkeypatch)
    _build(root, out, tokenize=False)
    assert sorted(decoded) == sorted([B, F])
