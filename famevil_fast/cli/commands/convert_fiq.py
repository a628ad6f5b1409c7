"""``famevil-fast convert-fiq``: build FashionIQ val caption files with gallery rows from ``image_splits``."""

from __future__ import annotations

import argparse

NAME = "convert-fiq"
HELP = "Add target_id / fake_data / garment_class gallery rows to raw FashionIQ val caption files."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("fiq_dir", help="FashionIQ directory holding captions/ and image_splits/")
    parser.add_argument(
        "--out",
        default=None,
        help="write here instead of rewriting captions/ in place "
        "(in place keeps the raw files as cap.<cat>.val.raw.json)",
    )
    parser.add_argument("--categories", nargs="+", default=["dress", "shirt", "toptee"], help="categories")


def run(args: argparse.Namespace) -> int:
    from famevil_fast.data.fiq_convert import convert_fashioniq_val

    sizes = convert_fashioniq_val(args.fiq_dir, args.out, args.categories)
    for cat, n in sizes.items():
        print(f"{cat}: gallery of {n} images")
    return 0
