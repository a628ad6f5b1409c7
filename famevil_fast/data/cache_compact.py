"""Compaction of a pre-decoded image cache (``famevil-fast cache --compact OUT``).

An image decoded again because its file changed goes into a new shard and its old entry's bytes stay in
the old shard; :func:`compact_cache` rewrites the cache so that it holds only the entries its index serves.
The layout and the write rules are those of :mod:`famevil_fast.data.cache`; a shard written here records
in its manifest (``written``) when each entry was first decoded, so that the changed-image check of a later
conversion sees the same times as before.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from famevil_fast.data.cache import (
    DEFAULT_SHARD_BYTES,
    CacheEntry,
    ImageCache,
    _load_json,
    _progress,
    _read_index,
    _shard_record,
    _ShardSeries,
    _source_records,
    _verify_shards,
    _write_times,
)
from famevil_fast.files import atomic_write_json, fsync_directory

JOURNAL = "compacting.json"
_SHARD_FILE = re.compile(r"^\.?shard_(\d+)\.")  # shard_N.bin / .json, their .tmp files and atomic_write's


@dataclass(frozen=True)
class CompactSummary:
    """What :func:`compact_cache` did. ``bytes_*`` count the shard data files on disk (also those the index
    does not list); ``shards_*`` the shards ``cache.json`` lists."""

    shards_before: int
    shards_after: int
    bytes_before: int
    bytes_after: int
    kept: int  # entries the index serves, all kept
    dropped: int  # entries it no longer serves (an image decoded again since, or undecodable now), removed
    rewritten: int  # served entries copied into new shards
    resumed: bool  # an interrupted compaction was finished or cleaned up first

    @property
    def reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after


@dataclass
class _Plan:
    """What compaction does to each shard ``cache.json`` lists, and to the files it does not list."""

    keep: list[dict]  # cache.json records of shards whose every entry is served: left as they are
    rewrite: list[tuple[dict, list[int]]]  # (manifest, positions of its served entries) of mixed shards
    drop: list[str]  # data files of the shards none of whose entries is served
    strays: list[Path]  # leftovers the index does not list: temporary files, data without a manifest
    dropped: int = 0

    def replaced(self) -> list[str]:
        """The data files of the listed shards that the compacted index no longer lists."""
        return [m["file"] for m, _ in self.rewrite] + self.drop


def compact_cache(
    out: str | os.PathLike,
    shard_bytes: int | None = None,
    num_threads: int | None = None,
    progress: bool = False,
) -> CompactSummary:
    """Rewrite the cache in ``out`` so that it holds only the entries its index serves (the newest entry of
    each image that decodes), removing the bytes of superseded ones.

    Shards whose every entry is served are left as they are, shards with none are removed, and the served
    entries of the others are copied (SHA-256 of their shards checked first) into new shards of about
    ``shard_bytes`` (default: the largest shard's size), numbered after every shard file on disk. The order
    of the steps keeps a complete cache at every moment: the journal ``compacting.json`` (the files to
    replace, the first new number), the new shards (data fsynced and renamed, then manifest), the new
    ``cache.json`` by atomic rename, and only then the removal of the replaced shards and of the journal.
    A rerun finds the journal and finishes (new index in place) or undoes (it is not) the interrupted run
    before compacting. Nothing is rewritten when nothing is to reclaim. The failed-image list and the
    token files are kept; copied entries keep the time they were first decoded (see :func:`_write_times`).

    Do not run it while a conversion writes to ``out``; readers that already have the cache open keep
    their memory maps of the removed shards (POSIX), one opening it during the swap may find a shard gone.
    """
    out_p = _cache_dir(out)
    shard_dir = out_p / "shards"
    bytes_before = _shard_bytes_on_disk(shard_dir)
    shards_before = len(_read_index(out_p / "cache.json")["shards"])
    resumed = _finish_interrupted(out_p, shard_dir)
    cache = ImageCache(out_p, verify=False)  # sizes and manifests; checksums of the shards read below
    plan = _plan(cache, out_p, shard_dir)
    kept, shards_after = len(cache), len(cache.index["shards"])
    if plan.rewrite or plan.drop:
        sources = {m["file"] for m, _ in plan.rewrite}
        _verify_shards(shard_dir, [s for s in cache.index["shards"] if s["file"] in sources], num_threads)
        size = shard_bytes or max((s["bytes"] for s in cache.index["shards"]), default=DEFAULT_SHARD_BYTES)
        shards_after = len(plan.keep) + _commit(cache, out_p, plan, size, progress)
        del cache  # its memory maps of the shards about to be removed (Windows cannot remove mapped files)
        _remove_replaced(out_p, plan)
    for path in plan.strays:  # (no index lists them: removed at any time)
        path.unlink(missing_ok=True)
    return CompactSummary(
        shards_before=shards_before,
        shards_after=shards_after,
        bytes_before=bytes_before,
        bytes_after=_shard_bytes_on_disk(shard_dir),
        kept=kept,
        dropped=plan.dropped,
        rewritten=sum(len(live) for _, live in plan.rewrite),
        resumed=resumed,
    )


def _cache_dir(out: str | os.PathLike) -> Path:
    """``out`` when it is a cache directory; FileNotFoundError / NotADirectoryError saying what it is."""
    out_p = Path(out)
    if not out_p.exists():
        raise FileNotFoundError(f"image cache {out_p} does not exist")
    if not out_p.is_dir():
        raise NotADirectoryError(f"image cache {out_p} is not a directory")
    if not (out_p / "cache.json").is_file():
        unfinished = any((out_p / "shards").glob("shard_*.json"))
        raise FileNotFoundError(
            f"{out_p} is not an image cache: it holds no cache.json"
            + (
                " (only the shards of an unfinished conversion: finish it with `famevil-fast cache DATA_ROOT "
                f"{out_p}`)"
                if unfinished
                else " (give the directory that `famevil-fast cache DATA_ROOT OUT` built as OUT)"
            )
        )
    return out_p


def _shard_number(path: Path) -> int | None:
    match = _SHARD_FILE.match(path.name)
    return int(match.group(1)) if match else None


def _files_in(shard_dir: Path) -> list[Path]:
    """The files in ``shard_dir``, sorted ([] when there is no such directory)."""
    return sorted(p for p in shard_dir.iterdir() if p.is_file()) if shard_dir.is_dir() else []


def _shard_bytes_on_disk(shard_dir: Path) -> int:
    """Bytes of the shard data files (and temporary files) in ``shard_dir``."""
    return sum(p.stat().st_size for p in _files_in(shard_dir) if p.suffix in (".bin", ".tmp"))


def _remove_shard(data: Path) -> None:
    """Remove a shard: data first, then manifest (a manifest without data is seen as incomplete)."""
    data.unlink(missing_ok=True)
    data.with_suffix(".json").unlink(missing_ok=True)


def _finish_interrupted(out: Path, shard_dir: Path) -> bool:
    """Finish or undo a compaction that was interrupted (its journal is there): remove the replaced shards
    the current index no longer lists (it was written: finish) and the new shards it does not list (it was
    not: undo), then temporary files and the journal. Never removes a shard the index lists; of the shards
    it does not list, only those compaction wrote (their manifests record ``written``: a conversion killed
    since may have left complete shards of its own) and data files without a manifest. With an unreadable
    journal, the new shards are recognised the same way and no replaced shard is removed (then complete
    but unlisted, they stop the compaction that follows, naming them, until a conversion of OUT takes them
    back into its index). Whether there was one."""
    for tmp in out.glob(f".{JOURNAL}.*.tmp"):
        tmp.unlink(missing_ok=True)
    journal_path = out / JOURNAL
    if not journal_path.is_file():
        return False
    try:
        journal = _load_json(journal_path)
        replaced, first = list(journal["replaces"]), int(journal["writes_from"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"cache: ignoring the unreadable compaction journal {journal_path} ({e})", stacklevel=3)
        replaced, first = [], None
    listed = {s["file"] for s in _read_index(out / "cache.json")["shards"]}
    for name in replaced:
        if name not in listed:
            _remove_shard(shard_dir / Path(name).name)
    for path in _files_in(shard_dir):
        number = _shard_number(path)
        new = number is not None and (first is None or number >= first)
        unlisted = path.with_suffix(".bin").name not in listed
        if path.suffix == ".tmp" or (new and unlisted and _written_by_compaction(path)):
            path.unlink(missing_ok=True)
    for tmp in out.glob(".cache.json.*.tmp"):
        tmp.unlink(missing_ok=True)
    journal_path.unlink()
    return True


def _written_by_compaction(path: Path) -> bool:
    """Whether the shard of ``path`` (its data or manifest) was written by compaction: its manifest records
    ``written``, or there is none (a data file whose manifest was never written)."""
    manifest = path.with_suffix(".json")
    if not manifest.is_file():
        return True
    try:
        return "written" in _load_json(manifest)
    except (OSError, ValueError):
        return True  # unreadable: no conversion can resume it either


def _plan(cache: ImageCache, out: Path, shard_dir: Path) -> _Plan:
    """Sort the shards of ``cache`` by how many of their entries it serves, and find the files it does not
    list; ValueError when those include complete shards of an unfinished conversion."""
    files = [s["file"] for s in cache.index["shards"]]
    twice = sorted({f for f in files if files.count(f) > 1})
    if twice:
        raise ValueError(
            f"cache {out}: cache.json lists {', '.join(twice)} more than once; rebuild the index with "
            f"`famevil-fast cache {cache.root or 'DATA_ROOT'} {out}` before compacting"
        )
    plan = _Plan(keep=[], rewrite=[], drop=[], strays=[])
    for position, shard in enumerate(cache.index["shards"]):
        manifest = _load_json(shard_dir / Path(shard["file"]).with_suffix(".json").name)
        live = [
            j
            for j, (key, offset) in enumerate(zip(manifest["keys"], manifest["offsets"]))
            if _served(cache.entry(key), position, int(offset))
        ]
        plan.dropped += len(manifest["keys"]) - len(live)
        if len(live) == len(manifest["keys"]):
            plan.keep.append(shard)
        elif live:
            plan.rewrite.append((manifest, live))
        else:
            plan.drop.append(shard["file"])
    plan.strays = _strays(cache, out, shard_dir)
    return plan


def _served(entry: CacheEntry | None, position: int, offset: int) -> bool:
    return entry is not None and entry.shard == position and entry.offset == offset


def _strays(cache: ImageCache, out: Path, shard_dir: Path) -> list[Path]:
    """The files of ``shard_dir`` that ``cache.json`` does not list: temporary files, and data files or
    manifests of incomplete shards. Complete shards it does not list belong to an unfinished conversion
    (resuming it reuses them): ValueError naming them, so that they are not removed."""
    listed = {s["file"] for s in cache.index["shards"]}
    strays, unfinished = [], []
    for path in _files_in(shard_dir):
        if path.suffix == ".tmp":
            strays.append(path)
        elif _shard_number(path) is not None and path.with_suffix(".bin").name not in listed:
            if path.suffix == ".json" and _complete_manifest(path):
                unfinished.append(path.with_suffix(".bin").name)
            elif path.suffix in (".bin", ".json"):
                strays.append(path)
    if unfinished:
        root = cache.root or "DATA_ROOT"
        raise ValueError(
            f"cache {out}: {len(unfinished)} complete shards ({', '.join(unfinished[:3])}"
            f"{', ...' if len(unfinished) > 3 else ''}) of an unfinished conversion are not in cache.json; "
            f"finish it first (famevil-fast cache {root} {out}), then compact"
        )
    return strays


def _complete_manifest(path: Path) -> bool:
    """Whether ``path`` is a readable shard manifest whose data file has the size it records."""
    try:
        manifest = _load_json(path)
        return path.with_suffix(".bin").stat().st_size == manifest["bytes"]
    except (OSError, ValueError, KeyError):
        return False


def _commit(cache: ImageCache, out: Path, plan: _Plan, shard_bytes: int, progress: bool) -> int:
    """The first steps of ``plan`` (see :func:`compact_cache`): the journal, the new shards, the new
    ``cache.json``; how many new shards."""
    shard_dir = out / "shards"
    first = 1 + max((n for p in _files_in(shard_dir) if (n := _shard_number(p)) is not None), default=-1)
    atomic_write_json(out / JOURNAL, {"replaces": plan.replaced(), "writes_from": first})
    fsync_directory(out)  # the journal is durable before any shard is written
    new = _copy_served(cache, shard_dir, plan.rewrite, first, shard_bytes, progress)
    fsync_directory(shard_dir)
    index = {**cache.index, "shards": plan.keep + [_shard_record(m) for m in new]}
    atomic_write_json(out / "cache.json", index)
    fsync_directory(out)
    return len(new)


def _remove_replaced(out: Path, plan: _Plan) -> None:
    """The last steps of ``plan``, once the new ``cache.json`` is in place: remove the shards it replaces,
    then the journal."""
    listed = {s["file"] for s in _read_index(out / "cache.json")["shards"]}
    for name in plan.replaced():
        if name not in listed:
            _remove_shard(out / "shards" / name)
    (out / JOURNAL).unlink()


def _copy_served(
    cache: ImageCache,
    shard_dir: Path,
    rewrite: list[tuple[dict, list[int]]],
    first: int,
    shard_bytes: int,
    progress: bool,
) -> list[dict]:
    """Copy the served entries of the shards ``rewrite`` (in order) into new shards numbered from
    ``first``, each entry with the time it was first decoded and its source record; their manifests."""
    new: dict[int, dict] = {}
    series = _ShardSeries(shard_dir, new, shard_bytes, cache.root, cache.max_side, first=first)
    bar = _progress(sum(len(live) for _, live in rewrite), progress, desc="compact")
    for manifest, live in rewrite:
        written, sources = _write_times(shard_dir, manifest), _source_records(manifest)
        for j in live:
            key = manifest["keys"][j]
            series.add(key, cache.get(key), written[j], source=sources[j])
        bar(len(live))
    series.finish()
    return [new[n] for n in sorted(new)]
