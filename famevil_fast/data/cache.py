"""Pre-decoded image cache: uint8 HWC images in memory-mapped shards, an index, and tokenised text.

Layout of a cache directory::

    cache.json                  written last: format version, shard list with SHA-256, failed images
    shards/shard_00000.bin      raw concatenated (h, w, 3) uint8 images
    shards/shard_00000.json     shard manifest: keys (image paths relative to the data root), byte offsets,
                                shapes, size and SHA-256 of the .bin, the data root and max_side
    tokens/<digest>.npy         CLIP token ids of every text list the loaders use (see ``tokens``)
    compacting.json             only while ``cache_compact.compact_cache`` runs (its journal, see there)

Writes are atomic (temporary file, fsync, rename; a shard's manifest is renamed only after its data), so a
killed conversion leaves only complete shards behind and running it again resumes after them. Opening a
cache verifies every shard's size and (by default) its SHA-256: a corrupted shard raises
:class:`CacheCorruptError` naming it, and rebuilding replaces exactly the shards that fail. An unreadable
shard manifest or ``cache.json`` is named the same way when opening and treated as missing (rebuilt, with a
warning) when converting; resuming with another data root or ``max_side`` than the existing shards were
built with is refused, naming the setting.

A shard manifest records each entry's source (``sources``: size and modification time in nanoseconds of
the image file, taken before it was read); a conversion decodes again every image whose file no longer
matches, into a new shard, and the old entry's bytes stay behind (``famevil_fast.data.cache_compact``
rewrites the cache without such entries, keeping the records). Entries of shards written before that record
fall back to time: a shard's data file carries the time its first entry's decoding started, and a compacted
shard records (``written``) when each entry was first decoded; a file modified after that is changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from famevil_fast.data.backends.base import default_threads
from famevil_fast.data.backends.pil_backend import PIL_DECODE_ERRORS, decode_error
from famevil_fast.data.records import shared_reads
from famevil_fast.data.transforms import to_rgb
from famevil_fast.files import atomic_write_json

CACHE_FORMAT = 1
DEFAULT_SHARD_BYTES = 1 << 30


class CacheCorruptError(ValueError):
    """A cache file does not match its recorded size or checksum, or cannot be read."""


def _load_json(path: Path) -> dict:
    """A JSON object from ``path``; ValueError naming the file when it is not readable JSON."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return obj


@dataclass(frozen=True)
class CacheEntry:
    shard: int
    offset: int
    height: int
    width: int


# ------------------------------------------------------------------------------------------ which images


def dataset_splits(root: str | os.PathLike) -> list[tuple[str, str, list]]:
    """(dataset, split, records) of every split file found under ``root``: the product datasets' products
    (FashionGen, Fashion200k, PolyvoreOutfits, BigFACAD) and FashionIQ's triplets."""
    from famevil_fast.data.fashioniq import read_fashioniq
    from famevil_fast.data.registry import SPLITS
    from famevil_fast.data.tasks import product_datasets_under, read_products

    found: list[tuple[str, str, list]] = []
    for dataset in product_datasets_under(root):  # (``fashionall`` is the union of their train splits)
        for split in SPLITS[dataset]:
            try:
                found.append((dataset, split, read_products(dataset, root, split, allow_empty=True)))
            except FileNotFoundError:
                continue
    for split in ("train", "val"):
        try:
            found.append(("fashioniq", split, read_fashioniq(root, split, allow_empty=True)))
        except FileNotFoundError:
            continue
    return found


def dataset_image_keys(root: str | os.PathLike) -> list[str]:
    """Every image path (relative to ``root``) referenced by the datasets found under ``root``, sorted."""
    return sorted(_image_keys(dataset_splits(root), root))


def _image_keys(splits: list[tuple[str, str, list]], root: str | os.PathLike) -> set[str]:
    if not splits:
        raise FileNotFoundError(
            "cache: no FashionGen, FashionIQ, Fashion200k, PolyvoreOutfits or BigFACAD split files under "
            f"{root}"
        )
    keys: set[str] = set()
    for dataset, _, records in splits:
        if dataset == "fashioniq":
            keys.update(p for t in records for p in (t.candidate, t.target))
        else:
            keys.update(v for p in records for v in p.images)
    return keys


# ------------------------------------------------------------------------------------------ writing


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _decode(root: str, key: str, max_side: int | None) -> tuple[np.ndarray, list[int]] | str:
    """(the pixels of the image ``key``, its source record: [size, mtime_ns] of the file, taken before it is
    read), or why it cannot be decoded."""
    path = os.path.join(root, key)
    try:
        source = _source_record(os.stat(path))
        with Image.open(path) as im:
            im = to_rgb(im)
            if max_side is not None and max(im.size) > max_side:
                scale = max_side / max(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                im = im.resize(size, Image.Resampling.BILINEAR)
            return np.asarray(im), source
    except PIL_DECODE_ERRORS as e:
        return decode_error(e)


def _source_record(stat: os.stat_result) -> list[int]:
    """What identifies a version of a source image: its size and modification time in nanoseconds."""
    return [int(stat.st_size), int(stat.st_mtime_ns)]


class _ShardWriter:
    def __init__(self, directory: Path, number: int) -> None:
        self.number = number
        self.bin = directory / f"shard_{number:05d}.bin"
        self.tmp = directory / f"shard_{number:05d}.bin.tmp"
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.keys: list[str] = []
        self.offsets: list[int] = []
        self.shapes: list[tuple[int, int]] = []
        self.written: list[float] = []  # when each entry was first decoded (compaction only)
        self.sources: list[list[int] | None] = []  # each entry's source record, None where unknown
        self.decoding_started: float | None = None  # when the first entry's decoding started (builds)
        self.size = 0

    def add(
        self,
        key: str,
        pixels: np.ndarray,
        written: float | None = None,
        started: float | None = None,
        source: list[int] | None = None,
    ) -> None:
        data = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
        self.file.write(data)
        self.hash.update(data)
        self.keys.append(key)
        self.offsets.append(self.size)
        self.shapes.append((int(pixels.shape[0]), int(pixels.shape[1])))
        if written is not None:
            self.written.append(written)
        self.sources.append(source)
        if started is not None and self.decoding_started is None:
            self.decoding_started = started  # entries come in decoding order: the first is the earliest
        self.size += len(data)

    def finish(self, root: str | None, max_side: int | None) -> dict:
        """Flush the data to disk, rename it into place, then write the manifest. The data file's
        modification time is set before the rename to the earliest recorded write time (compaction; a reader
        that ignores ``written`` then decodes again rather than miss a changed image) or to the time the
        first entry's decoding started (a build: an image changed while the shard was written is newer)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        earliest = min(self.written) if self.written else self.decoding_started
        if earliest is not None:  # an image changed since its entry was decoded is newer than the file
            os.utime(self.tmp, (earliest, earliest))
        os.replace(self.tmp, self.bin)
        manifest = {
            "file": self.bin.name,
            "bytes": self.size,
            "sha256": self.hash.hexdigest(),
            "keys": self.keys,
            "offsets": self.offsets,
            "shapes": self.shapes,
            "root": root,
            "max_side": max_side,
        }
        if root is None:  # a cache.json that predates the field: the shard inherits it the same way
            del manifest["root"]
        if self.written:
            manifest["written"] = self.written
        if any(source is not None for source in self.sources):
            manifest["sources"] = self.sources
        atomic_write_json(self.bin.with_suffix(".json"), manifest)
        return manifest


_UNKNOWN = object()


def _complete_shards(
    shard_dir: Path, verify: bool, root: str, max_side: int | None, legacy: dict | None = None
) -> dict[int, dict]:
    """Manifests of shards whose data file exists with the recorded size (and checksum when ``verify``).

    An unreadable manifest (entries that do not line up or leave the shard included) is removed with its
    data (rebuilt), with a warning naming it. A shard built from another data root or with another
    ``max_side`` is refused (ValueError naming the setting); manifests that predate those fields take them
    from ``legacy`` (the previous ``cache.json``), else are rebuilt.
    """
    done = {}
    for manifest_path in sorted(shard_dir.glob("shard_*.json")):
        data = manifest_path.with_suffix(".bin")
        try:
            manifest = _load_json(manifest_path)
            bad = [k for k in ("file", "bytes", "sha256", "keys", "offsets", "shapes") if k not in manifest]
            if bad:
                raise ValueError(f"{manifest_path} lacks {', '.join(bad)}")
            if manifest["file"] != data.name:  # a copy of another shard's manifest
                raise ValueError(f"{manifest_path} describes {manifest['file']}, not {data.name}")
            _check_entries(manifest, manifest_path, int(manifest["bytes"]))
            number = int(manifest_path.stem.split("_")[1])
        except (OSError, ValueError) as e:
            warnings.warn(f"cache: unreadable shard manifest, rebuilding the shard: {e}", stacklevel=3)
            manifest_path.unlink()
            data.unlink(missing_ok=True)
            continue
        data = shard_dir / manifest["file"]
        built_root = manifest.get("root", legacy.get("root", _UNKNOWN) if legacy else _UNKNOWN)
        built_side = manifest.get("max_side", legacy.get("max_side", _UNKNOWN) if legacy else _UNKNOWN)
        if built_root is _UNKNOWN or built_side is _UNKNOWN:
            warnings.warn(
                f"cache: {manifest_path} does not record its data root and max_side; rebuilding the shard",
                stacklevel=3,
            )
            good = False
        elif built_side != max_side:
            raise ValueError(
                f"cache {shard_dir.parent}: shard {manifest_path.name} was built with --max-side "
                f"{built_side} (max_side={built_side}), this run asks for {max_side}; resume with "
                f"--max-side {built_side}, or use a new directory to build another size"
            )
        elif not _same_path(built_root, root):
            raise ValueError(
                f"cache {shard_dir.parent}: shard {manifest_path.name} was built from data root "
                f"{built_root}, not {root}; use a new cache directory for another dataset"
            )
        else:
            good = data.is_file() and data.stat().st_size == manifest["bytes"]
        if good and verify:
            good = _sha256_file(data) == manifest["sha256"]
        if good:
            done[number] = manifest
        else:
            manifest_path.unlink()
            data.unlink(missing_ok=True)
    return done


def _changed_since_cached(
    root: str,
    shard_dir: Path,
    shards: dict[int, dict],
    num_threads: int | None = None,
    keys: set[str] | None = None,
) -> set[str]:
    """The cached keys (only those of ``keys`` when given) whose source file under ``root`` is not the one
    the newest shard holding them decoded (a later shard's entry is the one served): its size or
    modification time differs from the entry's source record, or, for an entry without one (a shard written
    before they were recorded), it was modified after the entry was decoded (see ``_write_times``). The
    source files are looked at by ``num_threads`` threads (default: :func:`default_threads`), as a network
    filesystem answers each look-up slowly."""
    cached: dict[str, tuple[float, list[int] | None]] = {}
    for number in sorted(shards):
        manifest = shards[number]
        records = zip(_write_times(shard_dir, manifest), _source_records(manifest))
        cached.update(zip(manifest["keys"], records))
    items = [(key, *record) for key, record in cached.items() if keys is None or key in keys]
    threads = min(num_threads or default_threads(), -(-len(items) // _STATS_PER_TASK))
    if threads <= 1:
        return _changed(root, items)
    step = max(1, min(_STATS_PER_TASK, -(-len(items) // (4 * threads))))
    parts = [items[i : i + step] for i in range(0, len(items), step)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return set().union(*pool.map(lambda part: _changed(root, part), parts))


_STATS_PER_TASK = 256  # source files one thread looks at per task of _changed_since_cached


def _write_times(shard_dir: Path, manifest: dict) -> list[float]:
    """When each entry of a shard was decoded: the ``written`` times a compacted shard records, else (or
    when they do not fit its keys) the modification time of its data file (when a build started decoding
    its first entry)."""
    keys, times = manifest["keys"], manifest.get("written")
    if isinstance(times, list) and len(times) == len(keys):
        if all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in times):
            return [float(t) for t in times]
    return [(shard_dir / manifest["file"]).stat().st_mtime] * len(keys)


def _source_records(manifest: dict) -> list[list[int] | None]:
    """Each entry's source record ([size, mtime_ns] of the image file it was decoded from), None for an
    entry without one; all None when the manifest records none or records that do not fit its keys."""
    keys, sources = manifest["keys"], manifest.get("sources")
    if isinstance(sources, list) and len(sources) == len(keys) and all(map(_is_source_record, sources)):
        return [None if source is None else [int(v) for v in source] for source in sources]
    return [None] * len(keys)


def _is_source_record(source: object) -> bool:
    if source is None:
        return True
    return (
        isinstance(source, list)
        and len(source) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in source)
    )


def _changed(root: str, items: list[tuple[str, float, list[int] | None]]) -> set[str]:
    """The keys of ``items`` ((key, when its entry was decoded, its source record or None)) whose file under
    ``root`` differs from the source record, or without one, is newer than the entry."""
    changed = set()
    for key, when, source in items:
        try:
            stat = os.stat(os.path.join(root, key))
        except OSError:
            continue
        modified = stat.st_mtime > when if source is None else _source_record(stat) != source
        if modified:
            changed.add(key)
    return changed


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


@dataclass
class CacheSummary:
    images: int
    new_images: int
    failed: int
    shards: int
    bytes: int
    datasets: tuple[str, ...] = ()  # "dataset/split" of every split file whose images were listed


def build_cache(
    root: str | os.PathLike,
    out: str | os.PathLike,
    keys: Sequence[str] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_side: int | None = None,
    num_threads: int | None = None,
    verify_existing: bool = True,
    tokenize: bool = True,
    progress: bool = False,
) -> CacheSummary:
    """Decode the images of ``root`` (``keys``, default: all images its datasets reference) into ``out``.

    Resumes after the complete shards already in ``out`` (re-checking their checksums when
    ``verify_existing``); ``max_side`` shrinks larger images keeping their aspect ratio. With ``tokenize``
    the token ids of every text list the loaders use are cached under ``out/tokens``.
    """
    root_s = os.fspath(root)
    out_p = Path(out)
    with shared_reads():  # the image list and the token cache read the same split files
        keys, found = _keys_to_cache(root_s, keys)  # checked before anything is written
        index_path = out_p / "cache.json"
        previous = _previous_index(index_path, out_p, root_s, max_side)
        shard_dir = _clean_shard_dir(out_p)
        abs_root = os.path.abspath(root_s)
        shards = _complete_shards(shard_dir, verify_existing, abs_root, max_side, previous or None)
        failed_before = dict(previous.get("failed", {})) if previous else {}
        todo = _keys_to_decode(keys, root_s, shard_dir, shards, num_threads, failed_before)
        series = _ShardSeries(shard_dir, shards, shard_bytes, abs_root, max_side)
        failed = _decode_into(series, todo, root_s, max_side, num_threads or default_threads(), progress)
        asked = set(keys)  # earlier failures outside this run's keys stay failed (their old entries hidden)
        still_failed = {**{k: why for k, why in failed_before.items() if k not in asked}, **failed}
        ordered = [shards[n] for n in sorted(shards)]
        if tokenize:
            _cache_tokens(root_s, out_p)
        atomic_write_json(index_path, _index(abs_root, max_side, still_failed, ordered))
    return CacheSummary(
        images=len({k for m in ordered for k in m["keys"]}),
        new_images=len(todo) - len(failed),
        failed=len(failed),
        shards=len(ordered),
        bytes=sum(m["bytes"] for m in ordered),
        datasets=found,
    )


def _clean_shard_dir(out: Path) -> Path:
    """``out/shards``, created when missing, without the temporary files of a killed conversion (its shard
    files, and its ``cache.json`` cut short by SIGKILL before the rename)."""
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*shard_dir.glob("*.tmp"), *out.glob(".cache.json.*.tmp")]:
        stale.unlink(missing_ok=True)
    return shard_dir


def _keys_to_cache(root: str, keys: Sequence[str] | None) -> tuple[list[str], tuple[str, ...]]:
    """(the sorted distinct image keys to cache, "dataset/split" of every split file they were listed
    from): ``keys`` when given (no split file read), else every image the datasets under ``root`` name."""
    if keys is not None:
        return sorted(set(keys)), ()
    splits = dataset_splits(root)
    return sorted(_image_keys(splits, root)), tuple(f"{dataset}/{split}" for dataset, split, _ in splits)


def _previous_index(index_path: Path, out: Path, root: str, max_side: int | None) -> dict:
    """The ``cache.json`` of an earlier conversion into ``out`` ({} when there is none, or when it is
    unreadable: it is written last, so rewritten, with a warning); ValueError when it was built with another
    ``max_side`` or from another data root."""
    previous: dict = {}
    if index_path.is_file():
        try:
            previous = _read_index(index_path)
        except CacheCorruptError as e:
            warnings.warn(f"cache: {e}; rebuilding it", stacklevel=3)
    if previous and previous.get("max_side") != max_side:
        raise ValueError(
            f"cache {out} was built with --max-side {previous.get('max_side')} "
            f"(max_side={previous.get('max_side')}), not {max_side}; use a new directory for another size"
        )
    if previous and "root" in previous and not _same_path(previous["root"], root):
        raise ValueError(
            f"cache {out} was built from data root {previous['root']}, not {os.path.abspath(root)}; "
            "use a new cache directory for another dataset"
        )
    return previous


def _keys_to_decode(
    keys: list[str],
    root: str,
    shard_dir: Path,
    shards: dict[int, dict],
    num_threads: int | None = None,
    failed_before: Collection[str] = (),
) -> list[str]:
    """The ``keys`` (in order) that no complete shard holds, whose image changed since it was cached (a
    warning counts these), or that failed to decode last time (an older entry of such an image must not be
    served again because its broken file was since removed or touched back)."""
    have = {k for m in shards.values() for k in m["keys"]}
    changed = _changed_since_cached(root, shard_dir, shards, num_threads, keys=set(keys))
    if changed:
        warnings.warn(
            f"cache: {len(changed)} images changed since they were cached (e.g. {sorted(changed)[0]}); "
            "decoding them again",
            stacklevel=3,
        )
    return [k for k in keys if k not in have or k in changed or k in failed_before]


class _ShardSeries:
    """New shards numbered after the complete ones in ``shards``, each finished (data, then manifest, added
    to ``shards``) once it holds ``shard_bytes``."""

    def __init__(
        self,
        shard_dir: Path,
        shards: dict[int, dict],
        shard_bytes: int,
        root: str | None,
        max_side: int | None,
        first: int | None = None,
    ) -> None:
        self.shard_dir, self.shards, self.shard_bytes = shard_dir, shards, shard_bytes
        self.root, self.max_side = root, max_side
        self.number = max(shards, default=-1) + 1 if first is None else first
        self.writer: _ShardWriter | None = None

    def add(
        self,
        key: str,
        pixels: np.ndarray,
        written: float | None = None,
        started: float | None = None,
        source: list[int] | None = None,
    ) -> None:
        """Append one entry: ``written`` when it was first decoded (compaction), or ``started`` when its
        decoding started (a build); ``source`` its source record (see ``_source_record``) when known."""
        if self.writer is None:
            self.writer = _ShardWriter(self.shard_dir, self.number)
        self.writer.add(key, pixels, written, started, source)
        if self.writer.size >= self.shard_bytes:
            self.finish()

    def finish(self) -> None:
        """Finish the shard being written, if any."""
        if self.writer is not None:
            self.shards[self.number] = self.writer.finish(self.root, self.max_side)
            self.number += 1
            self.writer = None


def _decode_into(
    series: _ShardSeries, todo: list[str], root: str, max_side: int | None, threads: int, progress: bool
) -> dict[str, str]:
    """Decode the images ``todo`` on ``threads`` threads, a chunk at a time, into ``series`` (in order);
    the images that could not be decoded, with why."""
    failed: dict[str, str] = {}
    chunk = max(64, threads * 16)
    bar = _progress(len(todo), progress)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            started = time.time()  # a file changed after this is newer than the shard that holds it
            for key, result in zip(part, pool.map(lambda k: _decode(root, k, max_side), part)):
                if isinstance(result, str):
                    failed[key] = result
                else:
                    pixels, source = result
                    series.add(key, pixels, started=started, source=source)
            bar(len(part))
    series.finish()
    return failed


def _cache_tokens(root: str, out: Path) -> None:
    """Cache the token ids of every text list the loaders use under ``out/tokens``, first removing the
    unreadable token files (also those no text list needs any more) with a warning each."""
    from famevil_fast.data.tasks import all_texts
    from famevil_fast.data.tokens import tokenize_texts, unreadable_token_files

    for bad in unreadable_token_files(out):
        warnings.warn(f"cache: token file {bad} is unreadable; removing it", stacklevel=3)
        bad.unlink()
    for texts in all_texts(root):
        tokenize_texts(texts, out)


def _index(root: str, max_side: int | None, failed: dict[str, str], shards: list[dict]) -> dict:
    """The ``cache.json`` of ``shards`` (in order)."""
    return {
        "format": CACHE_FORMAT,
        "root": root,
        "max_side": max_side,
        "failed": failed,
        "shards": [_shard_record(m) for m in shards],
    }


def _shard_record(manifest: dict) -> dict:
    """A shard's entry in ``cache.json``."""
    return {
        "file": manifest["file"],
        "bytes": manifest["bytes"],
        "sha256": manifest["sha256"],
        "images": len(manifest["keys"]),
    }


def _progress(total: int, enabled: bool, desc: str = "cache"):
    if not enabled or total == 0:
        return lambda n: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc=desc)
    return bar.update


def _read_index(path: Path) -> dict:
    """``cache.json``; CacheCorruptError naming it when unreadable, ValueError for another format."""
    try:
        index = _load_json(path)
        if not isinstance(index.get("shards"), list) or not isinstance(index.get("failed", {}), dict):
            raise ValueError(f"{path} lacks its shard list")
    except ValueError as e:
        raise CacheCorruptError(f"image cache index {e}; rerun `famevil-fast cache` to rebuild it") from e
    if index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: cache format {index.get('format')} is not the supported {CACHE_FORMAT}")
    return index


def _verify_shards(shard_dir: Path, shards: list[dict], num_threads: int | None = None) -> None:
    """Recompute the SHA-256 of the ``cache.json`` shard records ``shards``; CacheCorruptError naming the
    first shard that differs."""
    with ThreadPoolExecutor(max_workers=num_threads or default_threads()) as pool:
        digests = list(pool.map(lambda s: _sha256_file(shard_dir / s["file"]), shards))
    for shard, digest in zip(shards, digests):
        if digest != shard["sha256"]:
            raise CacheCorruptError(
                f"image cache: shard {shard_dir / shard['file']} fails its checksum (corrupted); "
                "rerun `famevil-fast cache` to rebuild it"
            )


# ------------------------------------------------------------------------------------------ reading


def _check_entries(manifest: dict, manifest_path: Path, size: int) -> None:
    """CacheCorruptError naming the manifest unless its keys, offsets and shapes line up and every entry
    (offset + h * w * 3 bytes) lies inside the shard's ``size`` bytes."""
    keys, offsets, shapes = manifest["keys"], manifest["offsets"], manifest["shapes"]
    problem = None
    if not len(keys) == len(offsets) == len(shapes):
        problem = f"{len(keys)} keys, {len(offsets)} offsets and {len(shapes)} shapes"
    elif keys:
        try:
            start = np.asarray(offsets, dtype=np.int64)
            hw = np.asarray(shapes, dtype=np.int64).reshape(len(keys), 2)
        except (TypeError, ValueError) as e:
            problem = f"offsets or shapes that are not integers ({e})"
        else:
            end = start + hw[:, 0] * hw[:, 1] * 3
            bad = np.flatnonzero((start < 0) | (hw <= 0).any(axis=1) | (end > size))
            if len(bad):
                problem = f"entry {keys[bad[0]]!r} outside the shard's {size} bytes"
    if problem:
        raise CacheCorruptError(
            f"image cache: shard manifest {manifest_path} holds {problem}; rerun `famevil-fast cache` to "
            "rebuild it"
        )


class ImageCache:
    """Read-only view of a cache directory: ``get(key)`` returns a zero-copy (h, w, 3) uint8 array."""

    def __init__(self, path: str | os.PathLike, verify: bool = True, num_threads: int | None = None) -> None:
        self.path = Path(path)
        index_path = self.path / "cache.json"
        if not index_path.is_file():
            raise FileNotFoundError(
                f"image cache: {index_path} not found (build it with `famevil-fast cache`)"
            )
        self.index = _read_index(index_path)
        self.max_side: int | None = self.index.get("max_side")
        self.root: str | None = self.index.get("root")  # the data root the cache was built from
        self.failed: dict[str, str] = dict(self.index.get("failed", {}))
        shard_dir = self.path / "shards"
        self._check_sizes(shard_dir)
        if verify:
            self.verify(num_threads)
        # plain ndarray views of the memory maps: slicing an np.memmap runs Python code per image (3 us
        # against 0.5, under the GIL that the gather threads share)
        self._maps: list[np.ndarray] = []
        self._entries: dict[str, CacheEntry] = {}
        for number, shard in enumerate(self.index["shards"]):
            manifest_path = shard_dir / Path(shard["file"]).with_suffix(".json").name
            try:
                manifest = _load_json(manifest_path)
                fields = manifest["sha256"], manifest["keys"], manifest["offsets"], manifest["shapes"]
            except (OSError, ValueError, KeyError) as e:
                what = f"lacks {e}" if isinstance(e, KeyError) else str(e)
                raise CacheCorruptError(
                    f"image cache: shard manifest {manifest_path} is unreadable ({what}); "
                    "rerun `famevil-fast cache` to rebuild it"
                ) from e
            if manifest.get("max_side", self.max_side) != self.max_side:
                raise CacheCorruptError(
                    f"image cache: shard manifest {manifest_path} records max_side={manifest['max_side']}, "
                    f"cache.json max_side={self.max_side}; rerun `famevil-fast cache` to rebuild it"
                )
            if fields[0] != shard["sha256"]:
                raise CacheCorruptError(f"image cache: manifest of {shard['file']} disagrees with cache.json")
            _check_entries(manifest, manifest_path, int(shard["bytes"]))
            self._maps.append(np.memmap(shard_dir / shard["file"], dtype=np.uint8, mode="r").view(np.ndarray))
            for key, offset, (h, w) in zip(manifest["keys"], manifest["offsets"], manifest["shapes"]):
                self._entries[key] = CacheEntry(number, int(offset), int(h), int(w))
        for key in self.failed:  # cached once, undecodable when the cache was last updated
            self._entries.pop(key, None)

    def _check_sizes(self, shard_dir: Path) -> None:
        for shard in self.index["shards"]:
            data = shard_dir / shard["file"]
            if not data.is_file():
                raise CacheCorruptError(f"image cache: shard {data} is missing")
            if data.stat().st_size != shard["bytes"]:
                raise CacheCorruptError(
                    f"image cache: shard {data} has {data.stat().st_size} bytes, expected {shard['bytes']}; "
                    "rerun `famevil-fast cache` to rebuild it"
                )

    def verify(self, num_threads: int | None = None) -> None:
        """Recompute every shard's SHA-256; CacheCorruptError naming the first shard that differs."""
        _verify_shards(self.path / "shards", self.index["shards"], num_threads)
        from famevil_fast.data.tokens import unreadable_token_files

        bad = unreadable_token_files(self.path)
        if bad:
            raise CacheCorruptError(
                f"image cache: token file {bad[0]} is unreadable (truncated or corrupted)"
                + (f", and {len(bad) - 1} more" if len(bad) > 1 else "")
                + "; rerun `famevil-fast cache` to rebuild it"
            )

    def key_mapping(self, root: str | os.PathLike) -> tuple[str, str]:
        """How the image paths of a dataset at ``root`` become this cache's keys: (prefix to add, prefix to
        strip). The cache's keys are relative to the data root it was built from; ``root`` may be that
        root, a directory under it (``root/FashionGen`` for a cache of ``root``) or above it. Any other root
        (the dataset moved, or its annotation files copied without the images, or another dataset) keeps the
        keys as they are, with a warning naming both roots: the same relative names of another dataset
        would get this cache's images."""
        if self.root is None:
            return "", ""
        built, given = os.path.realpath(self.root), os.path.realpath(root)
        if built == given:
            return "", ""
        if given.startswith(built.rstrip(os.sep) + os.sep):
            return Path(os.path.relpath(given, built)).as_posix() + "/", ""
        if built.startswith(given.rstrip(os.sep) + os.sep):
            return "", Path(os.path.relpath(built, given)).as_posix() + "/"
        warnings.warn(
            f"image cache {self.path} was built from data root {built}, but the dataset is at {given}: "
            "the cache's images are served for this dataset's file names. If it is another dataset, build "
            f"its own cache with `famevil-fast cache {os.fspath(root)} NEW_CACHE_DIR`",
            UserWarning,
            stacklevel=3,
        )
        return "", ""

    def key_function(self, root: str | os.PathLike | None) -> Callable[[str], str | None]:
        """Maps an image path of the dataset at ``root`` (None: the cache's own root) to its key in this
        cache, or to None when the path lies outside the directory the cache was built from (see
        ``key_mapping``)."""
        add, strip = ("", "") if root is None else self.key_mapping(root)
        if strip:
            return lambda path: path[len(strip) :] if path.startswith(strip) else None
        return (lambda path: add + path) if add else (lambda path: path)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> Iterable[str]:
        return self._entries.keys()

    def entry(self, key: str) -> CacheEntry | None:
        return self._entries.get(key)

    def get(self, key: str) -> np.ndarray:
        e = self._entries[key]
        n = e.height * e.width * 3
        return self._maps[e.shard][e.offset : e.offset + n].reshape(e.height, e.width, 3)

    def reason_missing(self, key: str) -> str:
        if key in self.failed:
            return f"could not be decoded when cached: {self.failed[key]}"
        return "not in the image cache"
