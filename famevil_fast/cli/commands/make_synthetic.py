"""``famevil-fast make-synthetic``: write the built-in synthetic FashionGen + FashionIQ dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from famevil_fast.cli.options import int_at_least, integer, non_negative_int, positive_int

# make_synthetic's own minimums, repeated here so that the parser is built without importing the generator
MIN_PRODUCTS = 2
MIN_IMAGE_SIZE = 32
MIN_FIQ_IMAGES = 24  # the fewest FashionIQ-style images that make up train and val families of variants
# the most products, and FashionIQ-style images, that all look different (make_synthetic's MAX_PRODUCTS and
# MAX_FIQ_IMAGES: the colour, pattern and attribute combinations of every garment kind, and three times those
# of shirts, the FashionIQ category with the fewest)
MAX_PRODUCTS = 52668
MAX_FIQ_IMAGES = 11090
# FashionGen's images are 256 px, so 4x that is plenty for a stand-in; drawing an image takes about
# 5 * size**2 bytes in each drawing process (5 MB at 1024, 50 GB at 100,000)
MAX_IMAGE_SIZE = 1024
# at most this many of the files left in place are named
NAMED_LEFT_FILES = 5

NAME = "make-synthetic"
HELP = "Generate the synthetic fashion dataset (FashionGen- and FashionIQ-format files with drawn images)."


def fiq_image_count(text: str) -> int:
    """argparse type of --fiq-images: an integer of at least MIN_FIQ_IMAGES (a smaller one is refused, not
    raised to it)."""
    return int_at_least(text, MIN_FIQ_IMAGES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir",
        help="output directory (receives FashionGen/, FashionIQ/, synthetic.json); an earlier synthetic "
        "dataset there is rewritten (its files that the new one does not write are removed; other files "
        "are left, and those in FashionGen/ or FashionIQ/ named), a directory holding another program's "
        "synthetic.json or synthetic.writing or other FashionGen/ or FashionIQ/ dataset files is refused, "
        "and so is a dataset folder that is a link out of it",
    )
    parser.add_argument(
        "--products",
        type=integer,
        default=1000,
        help=f"FashionGen-style products, all of different looks (at least {MIN_PRODUCTS}; at most "
        f"{MAX_PRODUCTS}, the combinations of kind, colours, pattern and attributes there are)",
    )
    parser.add_argument(
        "--fiq-images",
        type=fiq_image_count,
        default=None,
        help="about this many FashionIQ-style images, drawn in families of variants, all of different looks "
        f"(at least {MIN_FIQ_IMAGES}; at most {MAX_FIQ_IMAGES}, as a third are shirts and "
        f"{MAX_FIQ_IMAGES // 3} shirts look different; default: --products, raised to {MIN_FIQ_IMAGES} when "
        f"fewer and lowered to {MAX_FIQ_IMAGES} when more)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="random seed; the output is identical for a seed"
    )
    parser.add_argument(
        "--image-size",
        type=integer,
        default=256,
        help=f"image height in pixels (at least {MIN_IMAGE_SIZE}; at most {MAX_IMAGE_SIZE}, 4x FashionGen's "
        "256 px, as drawing an image takes about 5 x size^2 bytes of memory per drawing process)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.15,
        help="share of the products in the val split (each FashionGen split keeps at least one); FashionIQ's "
        "val split takes this share of its families of variants, but at least 0.2 of them",
    )
    parser.add_argument(
        "--workers", type=positive_int, default=None, help="drawing processes (default: all cores)"
    )


def check_sizes(args: argparse.Namespace) -> None:
    """ValueError (one line, naming the option and its bound) for a size make_synthetic cannot draw (more
    products or FashionIQ images than there are looks) or should not (an image size that would fill the
    memory); checked here rather than by the parser, so that every value out of range gets the same one-line
    message, before anything is written."""
    for option, value, low in (
        ("--products", args.products, MIN_PRODUCTS),
        ("--image-size", args.image_size, MIN_IMAGE_SIZE),
    ):
        if value < low:
            raise ValueError(f"{option} must be at least {low}, got {value}")
    for option, value, high in (
        ("--products", args.products, MAX_PRODUCTS),
        ("--fiq-images", args.fiq_images, MAX_FIQ_IMAGES),
        ("--image-size", args.image_size, MAX_IMAGE_SIZE),
    ):
        if value is not None and value > high:
            raise ValueError(f"{option} must be at most {high}, got {value}")
    if not 0.0 < args.val_fraction < 1.0:  # (NaN included)
        raise ValueError(f"--val-fraction must lie strictly between 0 and 1, got {args.val_fraction}")


def left_files_note(root: Path, left: list[str]) -> str | None:
    """A line naming ``left``, the files under ``root``'s FashionGen/ and FashionIQ/ that the dataset
    make-synthetic wrote there does not write (a rewrite leaves them in place, also under names it gives);
    None when there are none."""
    if not left:
        return None
    named = ", ".join(left[:NAMED_LEFT_FILES])
    if len(left) > NAMED_LEFT_FILES:
        named += f" and {len(left) - NAMED_LEFT_FILES} more"
    files = "file" if len(left) == 1 else "files"
    return f"note: left {len(left)} {files} that make-synthetic does not write in {root}: {named}"


def run(args: argparse.Namespace) -> int:
    from famevil_fast.data.synthetic.generate import make_synthetic

    check_sizes(args)
    s = make_synthetic(
        args.dir,
        products=args.products,
        seed=args.seed,
        image_size=args.image_size,
        fiq_images=args.fiq_images,
        val_fraction=args.val_fraction,
        workers=args.workers,
    )
    print(
        f"wrote {s.root}: FashionGen {s.products_train} train / {s.products_val} val products "
        f"({s.fashiongen_images} PNG), FashionIQ {s.fashioniq_images} JPEG, "
        f"triplets {s.triplets_train} train / {s.triplets_val} val, in {s.seconds:.1f} s"
    )
    note = left_files_note(Path(args.dir), s.left)
    if note:
        print(note)
    return 0
