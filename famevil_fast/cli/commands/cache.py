"""``famevil-fast cache``: decode a dataset once into memory-mapped uint8 shards plus cached token ids; verify
or compact an existing cache."""

from __future__ import annotations

import argparse
import json
import os

from famevil_fast.cli.options import positive_int

NAME = "cache"
HELP = (
    "Pre-decode dataset images into memory-mapped shards (resumable, checksummed) and tokenise the text; "
    "verify or compact an existing cache."
)
DEFAULT_SHARD_MB = 1024  # --shard-mb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        "%(prog)s [-h] [--max-side MAX_SIDE] [--shard-mb SHARD_MB] [--threads THREADS]\n"
        "                          [--no-progress] dataset_dir out\n"
        "       %(prog)s --verify [--threads THREADS] out\n"
        "       %(prog)s --compact [--threads THREADS] [--no-progress] out"
    )
    parser.add_argument(
        "dataset_dir",
        nargs="?",
        help="data root holding FashionGen/, FashionIQ/, Fashion200k/, PolyvoreOutfits/ and/or BigFACAD/ "
        "(every split's images; fashionall's are those of its four datasets); with --verify only the data "
        "root the cache was built from is accepted (it is not read); not with --compact",
    )
    parser.add_argument("out", help="cache directory (an interrupted conversion or compaction resumes here)")
    parser.add_argument(
        "--max-side", type=positive_int, default=None, help="shrink larger images to this longest side"
    )
    parser.add_argument(
        "--shard-mb",
        type=positive_int,
        default=None,
        help=f"approximate shard size in MiB (default: {DEFAULT_SHARD_MB})",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="decoding threads, or checksum threads with --verify and --compact (default: up to 8)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="only verify the checksums of the existing cache OUT (give OUT alone: nothing is decoded)",
    )
    parser.add_argument(
        "--compact",
        action="store_true",
        help="rewrite the existing cache OUT without the entries it no longer serves (images decoded again "
        "since, or no longer decodable) and report the bytes reclaimed; give OUT alone, nothing is decoded. "
        "Safe to interrupt (rerun it to finish); do not run it while a conversion or a training run uses OUT",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


BUILD_ONLY = {"--max-side": "max_side", "--shard-mb": "shard_mb", "--no-progress": "no_progress"}
COMPACT_TOO = frozenset({"--no-progress"})  # building options that --compact uses as well


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError for a combination that would leave something unused: --verify and --compact read only OUT
    (a building option given with them would be ignored, but for --compact's --no-progress; with --verify a
    dataset directory is accepted only when it is the data root the cache records in its cache.json, the
    form ``famevil-fast cache DATA_ROOT OUT --verify`` had before); they are separate runs; without them
    both directories are needed."""
    if args.verify and args.compact:
        raise ValueError(
            f"--verify and --compact are separate runs: famevil-fast cache --compact {args.out}, then "
            f"famevil-fast cache --verify {args.out}"
        )
    if args.verify:
        recorded = _recorded_root(args.out)
        if args.dataset_dir is not None and not _same_path(recorded, args.dataset_dir):
            built = f" ({args.out} was built from {recorded})" if recorded else ""
            raise ValueError(
                f"--verify checks the existing cache and reads no dataset: give the cache directory alone "
                f"(famevil-fast cache --verify {args.out}), not {args.dataset_dir!r} too{built}"
            )
        _refuse_building_options(args, "--verify")
    elif args.compact:
        if args.dataset_dir is not None:
            raise ValueError(
                f"--compact rewrites the existing cache and reads no dataset: give the cache directory alone "
                f"(famevil-fast cache --compact {args.out}), not {args.dataset_dir!r} too"
            )
        _refuse_building_options(args, "--compact", allowed=COMPACT_TOO)
    elif args.dataset_dir is None:
        raise ValueError(
            f"building a cache needs the dataset directory and the cache directory: famevil-fast cache "
            f"DATASET_DIR {args.out} (or famevil-fast cache --verify {args.out} to check an existing cache)"
        )


def _refuse_building_options(
    args: argparse.Namespace, mode: str, allowed: frozenset[str] = frozenset()
) -> None:
    """ValueError naming the building options (but ``allowed``) given with ``mode``."""
    unused = [name for name, attr in BUILD_ONLY.items() if getattr(args, attr) and name not in allowed]
    if unused:
        verb = "applies" if len(unused) == 1 else "apply"
        raise ValueError(f"{_and(unused)} only {verb} when building a cache, not with {mode}")


def _and(names: list[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _recorded_root(out: str) -> str | None:
    """The data root the cache in ``out`` records in its cache.json; None when it records none or cannot be
    read."""
    try:
        with open(os.path.join(out, "cache.json"), encoding="utf-8") as f:
            built = json.load(f).get("root")
    except (OSError, ValueError, AttributeError):
        return None
    return built if isinstance(built, str) else None


def _same_path(recorded: str | None, root: str) -> bool:
    return recorded is not None and os.path.realpath(recorded) == os.path.realpath(root)


def run(args: argparse.Namespace) -> int:
    from famevil_fast.data.cache import CacheCorruptError, ImageCache, build_cache

    check_arguments(args)
    if args.compact:
        return _compact(args)
    if args.verify:
        try:
            cache = ImageCache(args.out, verify=True, num_threads=args.threads)
        except CacheCorruptError as e:
            print(f"corrupt: {e}")
            return 1
        print(f"{args.out}: {len(cache)} images, {len(cache.index['shards'])} shards, checksums match")
        return 0
    s = build_cache(
        args.dataset_dir,
        args.out,
        shard_bytes=(args.shard_mb or DEFAULT_SHARD_MB) << 20,
        max_side=args.max_side,
        num_threads=args.threads,
        progress=not args.no_progress,
    )
    print(
        f"cache {args.out}: {s.images} images in {s.shards} shards ({s.bytes / 2**20:.1f} MiB), "
        f"{s.new_images} decoded now, {s.failed} could not be decoded"
    )
    if s.datasets:
        print(f"splits: {', '.join(s.datasets)}")
    return 0


def _compact(args: argparse.Namespace) -> int:
    """``--compact``: rewrite OUT without its superseded entries and print one summary line."""
    from famevil_fast.data.cache_compact import compact_cache

    s = compact_cache(args.out, num_threads=args.threads, progress=not args.no_progress)
    resumed = " (an interrupted compaction was finished or undone first)" if s.resumed else ""
    if s.reclaimed == 0 and s.rewritten == 0 and s.dropped == 0:
        print(
            f"cache {args.out}: nothing to reclaim, {s.kept} images in {s.shards_after} shards "
            f"({_size(s.bytes_after)}){resumed}"
        )
    else:
        print(
            f"cache {args.out}: reclaimed {_size(s.reclaimed)} ({s.dropped} entries no longer served "
            f"dropped): {s.kept} images in {s.shards_after} shards, {_size(s.bytes_after)} (was "
            f"{s.shards_before} shards, {_size(s.bytes_before)}){resumed}"
        )
    return 0


def _size(n: int) -> str:
    """``n`` bytes in B, KiB, MiB or GiB."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"
