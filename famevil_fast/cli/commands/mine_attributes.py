"""``famevil-fast mine-attributes``: the pseudo-attribute vocabulary of the PAC objective and every product's
attribute ids, mined from the training texts (see ``famevil_fast.data.attributes``)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from famevil_fast.cli.options import non_negative_int, output_file, positive_int

NAME = "mine-attributes"
HELP = "Mine PAC pseudo-attributes (frequent nouns/adjectives of the training texts) into an attribute file."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from famevil_fast.data.fashionall import NAME as UNION
    from famevil_fast.data.fashionall import UNION_DATASETS

    parser.add_argument(
        "root",
        help="data root holding FashionGen/ (or Fashion200k/, PolyvoreOutfits/, BigFACAD/; all four for "
        "fashionall)",
    )
    parser.add_argument(
        "--out", type=output_file, default=None, help="output JSON (default: ROOT/pseudo_attributes.json)"
    )
    parser.add_argument(
        "--dataset",
        default="fashiongen",
        choices=[*UNION_DATASETS, UNION],
        help="which dataset's product texts to mine; fashionall = the train splits of those of the four "
        "found under ROOT (FashionViL's pre-training set; products keyed by their union ids)",
    )
    parser.add_argument(
        "--min-count", type=positive_int, default=5, help="keep words found in at least this many products"
    )
    parser.add_argument(
        "--max-attributes", type=positive_int, default=None, help="keep at most this many (most frequent)"
    )
    parser.add_argument(
        "--show", type=non_negative_int, default=20, help="print this many of the most frequent attributes"
    )


def run(args: argparse.Namespace) -> int:
    from famevil_fast.data.attributes import mine_dataset, write_attribute_file
    from famevil_fast.data.fashionall import DIRECTORIES, UNION_DATASETS, union_source

    mined = mine_dataset(args.root, args.dataset, args.min_count, args.max_attributes)
    out = Path(args.out) if args.out else Path(args.root) / "pseudo_attributes.json"
    write_attribute_file(out, mined.vocabulary, mined.products, args.dataset)
    vocab = mined.vocabulary
    splits = ", ".join(f"{len(rows)} {name}" for name, rows in mined.products.items())
    print(
        f"wrote {out}: {len(vocab)} attributes (in >= {args.min_count} training products), products: {splits}"
    )
    if args.dataset == "fashionall":
        parts = Counter(union_source(pid)[0] for pid in mined.split("train"))
        found = " + ".join(f"{DIRECTORIES[d]} {parts[d]:,}" for d in UNION_DATASETS if d in parts)
        missing = ", ".join(f"{DIRECTORIES[d]}/" for d in UNION_DATASETS if d not in parts)
        print(f"fashionall train: {found}" + (f"; not found: {missing}" if missing else ""))
    top = ", ".join(f"{a} ({c})" for a, c in list(zip(vocab.attributes, vocab.counts))[: args.show])
    if top:
        print(f"most frequent: {top}")
    return 0
