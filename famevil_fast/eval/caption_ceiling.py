"""How high the captioning scores can go on the built-in synthetic catalogue.

The generator knows every product's specification, so it can write captions with partial knowledge of a
product: for each level below, every validation view gets a caption in the generator's own wording, drawn
for a spec that agrees with the product on the known fields and is drawn at random elsewhere, and the
captions are scored with the FIC protocol (one sample per view, the CLIP round trip of the product text as
the reference). "every attribute" is the ceiling of a model that reads the image perfectly but cannot know
the wording the catalogue happened to use; "nothing" is a caption of a random product.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.data.synthetic import text
from famevil_fast.data.synthetic.generate import sample_product, spec_from_attribute_ids
from famevil_fast.data.synthetic.render import ProductSpec
from famevil_fast.data.synthetic.vocab import COLOUR_NAMES
from famevil_fast.eval.captioning import caption_scores_of_sets

Redraw = Callable[[ProductSpec, np.random.Generator], ProductSpec]


def _known(spec: ProductSpec, rng: np.random.Generator, *fields: str) -> ProductSpec:
    """A random spec of the same garment (when known) that copies ``fields`` from ``spec``."""
    other = sample_product(rng, spec.garment if "garment" in fields else None)
    if "colour" in fields:
        second = other.second
        if second == spec.colour:  # a pattern's second colour differs from the main one
            second = str(rng.choice([c for c in COLOUR_NAMES if c != spec.colour]))
        other = other.replace(colour=spec.colour, second=second)
    if "pattern" in fields:
        other = other.replace(pattern=spec.pattern, second=spec.second)
    return other


LEVELS: dict[str, Redraw] = {
    "every attribute": lambda spec, rng: spec,
    "garment, colour, pattern": lambda spec, rng: _known(spec, rng, "garment", "colour", "pattern"),
    "garment, colour": lambda spec, rng: _known(spec, rng, "garment", "colour"),
    "garment": lambda spec, rng: _known(spec, rng, "garment"),
    "colour": lambda spec, rng: _known(spec, rng, "colour"),
    "nothing": lambda spec, rng: _known(spec, rng),
}


def redrawn_captions(specs: Sequence[ProductSpec], level: str, seed: int = 0) -> list[str]:
    """One generator caption (title + "." + description) per spec, knowing what ``level`` names."""
    if level not in LEVELS:
        raise ValueError(f"unknown knowledge level {level!r}; expected one of {list(LEVELS)}")
    rng = np.random.default_rng(seed)
    captions = []
    for spec in specs:
        drawn = LEVELS[level](spec, rng)
        captions.append(f"{text.title(drawn, rng)}.{text.description(drawn, rng)}")
    return captions


def caption_ceiling(
    root: str | os.PathLike,
    split: str = "val",
    levels: Sequence[str] = tuple(LEVELS),
    metrics: Sequence[str] = ("bleu4", "rouge_l", "cider"),
    tokenizer: str = "auto",
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Scores (percent) of captions redrawn at each knowledge level, one sample per view of ``split``.

    ValueError when ``root`` is not a synthetic catalogue (no ``synthetic.json`` beside ``FashionGen/``).
    """
    from famevil_fast.text import decode, tokenize

    if not any((Path(d) / "synthetic.json").exists() for d in (root, Path(root).parent)):
        raise ValueError(f"{root} is not a synthetic catalogue (no synthetic.json from make-synthetic)")
    products = read_fashiongen(root, split)
    if not products:
        raise ValueError(f"FashionGen {split} split under {root} has no products")
    specs = [spec_from_attribute_ids(p.attributes_id) for p in products]
    views = [len(p.images) for p in products]
    references = decode(tokenize([p.text for p in products]))
    per_view_refs = [ref for ref, n in zip(references, views) for _ in range(n)]
    per_level = []
    for i, level in enumerate(levels):
        captions = decode(tokenize(redrawn_captions(specs, level, seed + i)))  # as a model would emit
        per_level.append([c for c, n in zip(captions, views) for _ in range(n)])
    scores = caption_scores_of_sets(per_level, per_view_refs, metrics=metrics, tokenizer=tokenizer)
    return dict(zip(levels, scores))


def ceiling_table(scores: dict[str, dict[str, float]]) -> str:
    """The scores of :func:`caption_ceiling` as a fixed-width table, one row per knowledge level."""
    metrics = list(next(iter(scores.values())))
    width = max(len(level) for level in scores)
    lines = [f"  {'known':<{width}}  " + "  ".join(f"{m:>8}" for m in metrics)]
    for level, row in scores.items():
        lines.append(f"  {level:<{width}}  " + "  ".join(f"{row[m]:>8.2f}" for m in metrics))
    return "\n".join(lines)
