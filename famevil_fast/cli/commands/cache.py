"""``famevil-fast cache``: decode a dataset once into memory-mapped uint8 shards plus cached token ids."""

from __future__ import annotations

import argparse

from famevil_fast.cli.options import positive_int

NAME = "cache"
HELP = "Pre-decode dataset images into memory-mapped shards (resumable, checksummed) and tokenise the text."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dataset_dir",
        help="data root holding FashionGen/, FashionIQ/, Fashion200k/, PolyvoreOutfits/ and/or BigFACAD/ "
        "(every split's images; fashionall's are those of its four datasets)",
    )
    parser.add_argument("out", help="cache directory (an interrupted conversion resumes here)")
    parser.add_argument(
        "--max-side", type=positive_int, default=None, help="shrink larger images to this longest side"
    )
    parser.add_argument("--shard-mb", type=positive_int, default=1024, help="approximate shard size in MiB")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="decoding threads (default: up to 8)"
    )
    parser.add_argument(
        "--verify", action="store_true", help="only verify the checksums of an existing cache"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from famevil_fast.data.cache import CacheCorruptError, ImageCache, build_cache

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
        shard_bytes=args.shard_mb << 20,
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
