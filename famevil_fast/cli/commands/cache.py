"""``famevil-fast cache``: decode a dataset once into memory-mapped uint8 shards plus cached token ids."""

from __future__ import annotations

import argparse
import json
import os

from famevil_fast.cli.options import positive_int

NAME = "cache"
HELP = "Pre-decode dataset images into memory-mapped shards (resumable, checksummed) and tokenise the text."
DEFAULT_SHARD_MB = 1024  # --shard-mb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = (
        "%(prog)s [-h] [--max-side MAX_SIDE] [--shard-mb SHARD_MB] [--threads THREADS]\n"
        "                          [--no-progress] dataset_dir out\n"
        "       %(prog)s --verify [--threads THREADS] out"
    )
    parser.add_argument(
        "dataset_dir",
        nargs="?",
        help="data root holding FashionGen/, FashionIQ/, Fashion200k/, PolyvoreOutfits/ and/or BigFACAD/ "
        "(every split's images; fashionall's are those of its four datasets); with --verify only the data "
        "root the cache was built from is accepted (it is not read)",
    )
    parser.add_argument("out", help="cache directory (an interrupted conversion resumes here)")
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
        "--threads", type=positive_int, default=None, help="decoding threads (default: up to 8)"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="only verify the checksums of the existing cache OUT (give OUT alone: nothing is decoded)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


BUILD_ONLY = {"--max-side": "max_side", "--shard-mb": "shard_mb", "--no-progress": "no_progress"}


def check_arguments(args: argparse.Namespace) -> None:
    """ValueError for a combination that would leave something unused: --verify reads only OUT (a building
    option given with it would be ignored; a dataset directory is accepted only when it is the data root
    the cache records in its cache.json, the form ``famevil-fast cache DATA_ROOT OUT --verify`` had before);
    without it both directories are needed."""
    if args.verify:
        if args.dataset_dir is not None and not _built_from(args.out, args.dataset_dir):
            raise ValueError(
                f"--verify checks the existing cache and reads no dataset: give the cache directory alone "
                f"(famevil-fast cache --verify {args.out}), not {args.dataset_dir!r} too"
            )
        unused = [name for name, attr in BUILD_ONLY.items() if getattr(args, attr)]
        if unused:
            verb = "applies" if len(unused) == 1 else "apply"
            raise ValueError(f"{_and(unused)} only {verb} when building a cache, not with --verify")
    elif args.dataset_dir is None:
        raise ValueError(
            f"building a cache needs the dataset directory and the cache directory: famevil-fast cache "
            f"DATASET_DIR {args.out} (or famevil-fast cache --verify {args.out} to check an existing cache)"
        )


def _and(names: list[str]) -> str:
    """``"a"``, ``"a and b"``, ``"a, b and c"``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _built_from(out: str, root: str) -> bool:
    """Whether the cache in ``out`` records ``root`` as the data root it was built from (its cache.json's
    ``root``, both paths resolved); False when it records none or cannot be read."""
    try:
        with open(os.path.join(out, "cache.json"), encoding="utf-8") as f:
            built = json.load(f).get("root")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(built, str) and os.path.realpath(built) == os.path.realpath(root)


def run(args: argparse.Namespace) -> int:
    from famevil_fast.data.cache import CacheCorruptError, ImageCache, build_cache

    check_arguments(args)
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
