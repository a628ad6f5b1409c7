"""Reading split files: the common case's quick checks agree with the full ones (same records, same errors),
each file is parsed once only within a ``shared_reads()`` scope, the cached images' look-ups on a thread
pool, and ``famevil-fast cache DATA_ROOT OUT --verify`` accepted when DATA_ROOT built OUT."""

import json
import os
import posixpath
import time
from pathlib import Path

import pytest
from test_data_fixtures import fashiongen_row, noise_image

from famevil_fast.data import cache as cache_mod
from famevil_fast.data import fashiongen, records, tasks
from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.data.image_paths import clean_image_path, image_paths, is_absolute_image_path, path_inside
from famevil_fast.data.records import IDS, INT, STR, STR_OR_STRS, STRS, check_types, shared_reads


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    then = time.time() - 3600  # a settled file
    os.utime(path, (then, then))


# ------------------------------------------------------- quick checks agree with the full ones


def _full_check(row, kinds):
    try:
        records._check_types(row, kinds, Path("f.json"), 0)
    except ValueError as e:
        return str(e)
    return None


def _check(row, kinds):
    try:
        check_types(row, kinds, Path("f.json"), 0)
    except ValueError as e:
        return str(e)
    return None


class _Int(int):
    pass


VALUES = [
    0, -1, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 2**70, True, False, _Int(3), 1.0, "1", None,
    [], [1, 2], [2**63 - 1, -(2**63)], [1, 2**63], [-(2**64)], [1, True], [1, "2"], [1.5], ["a", "b"],
    ["a", 1], "a", "", [""], (1, 2), {"a": 1},
]  # fmt: skip


@pytest.mark.parametrize("kind", [INT, STR, STRS, IDS, STR_OR_STRS])
def test_the_quick_type_check_agrees_with_the_full_one(kind):
    for value in VALUES:
        row = {"id": 7, "field": value}
        assert _check(row, {"field": kind}) == _full_check(row, {"field": kind}), value
        kinds = {"id": INT, "field": kind, "absent": INT}
        assert _check(row, kinds) == _full_check(row, kinds), value
    row = {"a": "x", "b": 2**64, "c": True}  # the first failing field is the one named
    kinds = {"a": INT, "b": INT, "c": INT}
    assert (
        _check(row, kinds)
        == _full_check(row, kinds)
        == ("f.json: entry 0: field 'a' must be an integer, got \"x\"")
    )
    kinds = {"b": IDS}
    assert _check({"b": [1, 2**64]}, kinds) == (
        f"f.json: entry 0: field 'b' holds {2**64}, outside the 64-bit integer range the tensors keep"
    )


def _each_in_full(paths, prefix, folder, root, where):
    """image_paths' rules applied path by path with no shortcut (clean, then relative or absolute)."""
    head = folder + "/"
    out = []
    for raw in paths:
        p = clean_image_path(raw)
        if not p:
            raise ValueError(f"{where}: image path {raw!r} names no file")
        if not is_absolute_image_path(p):
            joined = posixpath.normpath(prefix + (p if p.startswith(head) else head + p))
            if joined.split("/")[0] in (".", ".."):
                raise ValueError(f"{where}: image path {raw!r} climbs out of the data root")
            out.append(joined)
        else:
            rel = path_inside(p, root)
            if rel is None:
                raise ValueError(f"{where}: image path {raw!r} is absolute")
            out.append(rel)
    return tuple(out)


def test_plain_image_paths_give_what_the_full_rules_give(tmp_path):
    paths = [
        "a.png", "train/a.png", "val/a.png", "trainx/a.png", ".a.png", "a/.b.png", "a/./b.png", "./a.png",
        "a//b.png", "a\\b.png", "train\\a.png", "a/", "a/.", "..", "../a.png", "a/../b.png", "x:y.png",
        "ab:c.png", "é/ü.png", "a b.png", f"{tmp_path}/FashionGen/train/1.png", "\\\\server\\x.png",
        "../val/a.png", "train/../val/a.png", "../../../a.png", "../../x/a.png", "a/../../..",
    ]  # fmt: skip
    for raw in paths:
        got = expected = None
        try:
            got = image_paths([raw], "FashionGen/", "train", tmp_path, "entry 0")
        except ValueError as e:
            got = str(e).split(" is absolute")[0].split(" climbs out")[0]
        try:
            expected = _each_in_full([raw], "FashionGen/", "train", tmp_path, "entry 0")
        except ValueError as e:
            expected = str(e).split(" is absolute")[0].split(" climbs out")[0]
        assert got == expected, raw
    with pytest.raises(ValueError, match=r"^entry 0: image path '\.' names no file$"):
        image_paths(["a.png", "."], "", "images", tmp_path, "entry 0")


def test_parent_components_are_resolved_and_may_not_leave_the_data_root(tmp_path):
    """One image written two ways is one record (and one cache key); '..' out of the root is refused."""
    raw = ["../val/a.png", "a/../b.png", "../../Fashion200k/images/c.jpg"]
    expected = ("FashionGen/val/a.png", "FashionGen/train/b.png", "Fashion200k/images/c.jpg")
    assert image_paths(raw, "FashionGen/", "train", tmp_path) == expected
    for escaping in ["../../../x.png", "../../.."]:
        with pytest.raises(ValueError, match=r"^entry 3: image path '[./xpng]+' climbs out of the data root"):
            image_paths([escaping], "FashionGen/", "train", tmp_path, "entry 3")


def test_a_read_with_plain_and_odd_rows_gives_the_same_records_as_before(tmp_path):
    rows = [
        fashiongen_row(1, ["1_0.png", "train/1_1.png"]),
        fashiongen_row(2, ["train\\2_0.png", "./2_1.png", "2_0.png"]),
        dict(fashiongen_row(3, "3_0.png"), attributes_id=[2**63 - 1, 0], category_id=-(2**63)),
    ]
    _write(tmp_path / "FashionGen" / "train_info.json", rows)
    with pytest.warns(records.DuplicateViewsWarning, match=r"entry 1 \(id 2\) lists FashionGen/train/2_0"):
        products = read_fashiongen(tmp_path, "train")
    assert [p.images for p in products] == [
        ("FashionGen/train/1_0.png", "FashionGen/train/1_1.png"),
        ("FashionGen/train/2_0.png", "FashionGen/train/2_1.png"),
        ("FashionGen/train/3_0.png",),
    ]
    assert products[2].attributes_id == (2**63 - 1, 0) and products[2].category_id == -(2**63)


# ------------------------------------------------------- shared_reads()


@pytest.fixture
def count_parses(monkeypatch):
    parsed = []
    real = records.load_json_list

    def counting(path, *args, **kwargs):
        rows = real(path, *args, **kwargs)
        parsed.append(Path(path).parent.name + "/" + Path(path).name)
        return rows

    monkeypatch.setattr(records, "load_json_list", counting)
    monkeypatch.setattr(fashiongen, "load_json_list", counting)
    return parsed


def test_outside_shared_reads_every_read_parses_and_nothing_is_kept(tmp_path, count_parses):
    _write(tmp_path / "FashionGen" / "train_info.json", [fashiongen_row(1, ["a.png"])])
    for _ in range(2):
        assert [p.id for p in read_fashiongen(tmp_path, "train")] == [1]
    assert count_parses == ["FashionGen/train_info.json"] * 2
    assert not records._READS


def test_shared_reads_nest_and_drop_what_they_kept_when_the_outermost_ends(tmp_path, count_parses):
    _write(tmp_path / "FashionGen" / "train_info.json", [fashiongen_row(1, ["a.png"])])
    with shared_reads():
        first = read_fashiongen(tmp_path, "train")
        with shared_reads():
            assert read_fashiongen(tmp_path, "train") == first
        assert records._READS  # the inner scope's end keeps the outer one's reads
        assert read_fashiongen(tmp_path, "train") == first
        first.clear()  # each read gets its own list
        assert len(read_fashiongen(tmp_path, "train")) == 1
    assert count_parses == ["FashionGen/train_info.json"]
    assert not records._READS
    with pytest.raises(RuntimeError), shared_reads():
        raise RuntimeError
    assert records._SCOPES == 0


def test_a_fashionall_pac_loader_parses_each_file_once(tmp_path, count_parses):
    from test_data_fashionall import make_union

    from famevil_fast.data.pretrain import build_pretrain_loader

    root = make_union(tmp_path)
    for path in root.glob("*/*_info.json"):
        os.utime(path, (time.time() - 3600,) * 2)
    loader = build_pretrain_loader(
        "pac", root, 4, image_size=16, device="cpu", prefetch=0, backend="pil", dataset="fashionall"
    )  # mined attributes (train and val) and the table (train) from the same files
    loader.close()
    assert sorted(count_parses) == sorted(set(count_parses))
    assert "FashionGen/train_info.json" in count_parses and "FashionGen/val_info.json" in count_parses
    assert not records._READS


def test_build_cache_parses_each_split_file_once(tmp_path, count_parses):
    rows = [fashiongen_row(i, [f"{i}_0.png"]) for i in range(3)]
    for i in range(3):
        noise_image(tmp_path / "data" / "FashionGen" / "train" / f"{i}_0.png", 8, 6, seed=i)
    _write(tmp_path / "data" / "FashionGen" / "train_info.json", rows)
    cache_mod.build_cache(tmp_path / "data", tmp_path / "cache", num_threads=1)  # image list, then tokens
    assert count_parses == ["FashionGen/train_info.json"]
    assert not records._READS
    tasks.train_table("itc", tmp_path / "data", check_files=False)
    assert count_parses == ["FashionGen/train_info.json"] * 2


# ------------------------------------------------------- cached images looked at on a thread pool


def test_changed_images_are_found_the_same_on_a_thread_pool(tmp_path):
    root, shard_dir = tmp_path / "data", tmp_path / "shards"
    shard_dir.mkdir()
    then = time.time() - 7200
    keys = []
    for i in range(1000):
        key = f"FashionGen/train/{i}.png"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(b"x")
        os.utime(root / key, (then, then) if i % 7 else (then + 7000, then + 7000))
        keys.append(key)
    for number in range(2):
        (shard_dir / f"{number}.bin").write_bytes(b"")
        os.utime(shard_dir / f"{number}.bin", (then + 3600 * (1 + 1.9 * number),) * 2)
    shards = {
        0: {"file": "0.bin", "keys": keys[:600] + ["FashionGen/train/missing.png"]},
        1: {"file": "1.bin", "keys": keys[500:]},  # newer than every image: nothing of it changed
    }
    expected = {k for i, k in enumerate(keys[:500]) if not i % 7}
    for threads in (1, 2, 8):
        assert cache_mod._changed_since_cached(os.fspath(root), shard_dir, shards, threads) == expected
    assert cache_mod._changed_since_cached(os.fspath(root), shard_dir, {}, 4) == set()


# ------------------------------------------------------- famevil-fast cache DATA_ROOT OUT --verify


def _built_cache(tmp_path):
    root = tmp_path / "data"
    for i in range(2):
        noise_image(root / "FashionGen" / "train" / f"{i}.png", 9, 7, seed=i)
    _write(root / "FashionGen" / "train_info.json", [fashiongen_row(i, [f"{i}.png"]) for i in range(2)])
    out = tmp_path / "cache"
    cache_mod.build_cache(root, out, num_threads=1, tokenize=False)
    return root, out


def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("famevil-fast cache: error: "), err
    return err[0]


def test_cache_verify_accepts_the_data_root_the_cache_was_built_from(tmp_path, capsys, monkeypatch):
    from famevil_fast.cli.main import main

    root, out = _built_cache(tmp_path)
    assert main(["cache", str(root), str(out), "--verify"]) == 0
    assert "2 images, 1 shards, checksums match" in capsys.readouterr().out
    (tmp_path / "link").symlink_to(root)  # compared resolved
    monkeypatch.chdir(tmp_path)
    assert main(["cache", "link/", "cache", "--verify", "--threads", "1"]) == 0
    capsys.readouterr()

    other = tmp_path / "other"
    other.mkdir()
    assert main(["cache", str(other), str(out), "--verify"]) == 2
    assert _error(capsys).endswith(
        f"--verify checks the existing cache and reads no dataset: give the cache directory alone "
        f"(famevil-fast cache --verify {out}), not {str(other)!r} too ({out} was built from "
        f"{os.path.abspath(root)})"
    )
    (out / "cache.json").write_text("[]")  # records no root: not accepted
    assert main(["cache", str(root), str(out), "--verify"]) == 2
    assert "reads no dataset" in _error(capsys)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-side", "64"], "--max-side only applies when building a cache, not with --verify"),
        (["--shard-mb", "8", "--no-progress"], "--shard-mb and --no-progress only apply when building"),
        (
            ["--max-side", "64", "--shard-mb", "8", "--no-progress"],
            "--max-side, --shard-mb and --no-progress only apply when building",
        ),
    ],
)
def test_cache_verify_names_the_building_options_it_does_not_use(options, message, capsys):
    from famevil_fast.cli.main import main

    assert main(["cache", "--verify", *options, "OUT"]) == 2
    assert message in _error(capsys)


def test_a_process_forked_inside_a_scope_starts_outside_any():
    with shared_reads():
        pid = os.fork()
        if pid == 0:  # the child: no scope, nothing kept
            os._exit(0 if records._SCOPES == 0 and not records._READS else 1)
        _, status = os.waitpid(pid, 0)
        assert records._SCOPES == 1
    assert os.waitstatus_to_exitcode(status) == 0
