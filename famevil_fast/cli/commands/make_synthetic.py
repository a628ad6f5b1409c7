"""``famevil-fast make-synthetic``: write the built-in synthetic FashionGen + FashionIQ dataset."""

from __future__ import annotations

import argparse

from famevil_fast.cli.options import positive_int

NAME = "make-synthetic"
HELP = "Generate the synthetic fashion dataset (FashionGen- and FashionIQ-format files with drawn images)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="output directory (receives FashionGen/, FashionIQ/, synthetic.json)")
    parser.add_argument("--products", type=positive_int, default=1000, help="FashionGen-style products")
    parser.add_argument(
        "--fiq-images",
        type=positive_int,
        default=None,
        help="about this many FashionIQ-style images, drawn in families of variants (at least 24; "
        "default: --products)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed; the output is identical for a seed")
    parser.add_argument("--image-size", type=positive_int, default=256, help="image height in pixels")
    parser.add_argument("--val-fraction", type=float, default=0.15, help="share of products in the val split")
    parser.add_argument(
        "--workers", type=positive_int, default=None, help="drawing processes (default: all cores)"
    )


def run(args: argparse.Namespace) -> int:
    from famevil_fast.data.synthetic.generate import make_synthetic

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
    return 0
