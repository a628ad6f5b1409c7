"""The synthetic catalogue's vocabulary: garments, colours, patterns, attributes and the id spaces.

Every product is a garment kind drawn with one colour, one pattern (with a second colour when patterned)
and the attributes its kind defines (sleeve length, garment length, neckline, ...). The sub-category of a
product is its garment kind split by the kind's defining attribute (``"maxi dress"``, ``"wide trousers"``):
from the image alone, sub-category recognition needs the silhouette, not only the colour; but a product's
title always names the kind and the defining attribute (and its description states every attribute), so SCR,
which reads the product text beside the image, can be solved from the text alone. Ids are stable: they are
positions in the tuples below, and the sub-category ids fit the 121-way FashionGen head.
"""

from __future__ import annotations

from dataclasses import dataclass

# name -> RGB. Names are used verbatim in the generated text.
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (28, 28, 30),
    "white": (250, 250, 248),
    "grey": (140, 142, 146),
    "navy": (26, 38, 92),
    "blue": (45, 110, 215),
    "red": (205, 32, 38),
    "pink": (240, 140, 185),
    "green": (40, 140, 70),
    "olive": (120, 125, 50),
    "yellow": (245, 205, 40),
    "orange": (240, 120, 30),
    "purple": (120, 60, 160),
    "brown": (110, 70, 40),
    "beige": (215, 195, 160),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

PATTERNS: tuple[str, ...] = ("plain", "stripes", "checks", "dots", "diagonal", "colour-block")

# attribute type -> its values (order defines the value ids)
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "sleeve": ("sleeveless", "short", "long"),
    "length": ("mini", "knee", "maxi"),
    "neckline": ("round", "v-neck", "turtleneck"),
    "pocket": ("no pocket", "chest pocket"),
    "shape": ("straight", "flared"),
    "fit": ("slim", "wide"),
    "leg": ("short", "bermuda"),
    "closure": ("single-breasted", "double-breasted", "zip"),
    "handle": ("top handle", "shoulder strap"),
    "heel": ("flat", "high heel"),
    "brim": ("narrow brim", "wide brim"),
    "fringe": ("plain ends", "fringed"),
}


@dataclass(frozen=True)
class Garment:
    """One garment kind: its attribute types with the values allowed for it, and the defining attribute."""

    name: str
    plural: str
    attributes: dict[str, tuple[str, ...]]
    defining: str
    materials: tuple[str, ...]


GARMENTS: tuple[Garment, ...] = (
    Garment(
        "t-shirt",
        "t-shirts",
        {"sleeve": ("short", "long"), "neckline": ("round", "v-neck")},
        "sleeve",
        ("cotton", "jersey", "linen"),
    ),
    Garment(
        "shirt",
        "shirts",
        {"sleeve": ("short", "long"), "pocket": ("no pocket", "chest pocket")},
        "sleeve",
        ("cotton", "poplin", "linen", "silk"),
    ),
    Garment(
        "top",
        "tops",
        {"sleeve": ("sleeveless", "short"), "neckline": ("round", "v-neck")},
        "sleeve",
        ("jersey", "silk", "viscose"),
    ),
    Garment(
        "sweater",
        "sweaters",
        {"neckline": ("round", "v-neck", "turtleneck")},
        "neckline",
        ("wool", "cashmere", "cotton"),
    ),
    Garment(
        "dress",
        "dresses",
        {
            "length": ("mini", "knee", "maxi"),
            "sleeve": ("sleeveless", "short", "long"),
            "neckline": ("round", "v-neck"),
        },
        "length",
        ("silk", "crepe", "cotton", "viscose"),
    ),
    Garment(
        "skirt",
        "skirts",
        {"length": ("mini", "knee", "maxi"), "shape": ("straight", "flared")},
        "length",
        ("wool", "denim", "cotton", "leather"),
    ),
    Garment("trousers", "trousers", {"fit": ("slim", "wide")}, "fit", ("wool", "denim", "cotton", "linen")),
    Garment("shorts", "shorts", {"leg": ("short", "bermuda")}, "leg", ("denim", "cotton", "linen")),
    Garment(
        "coat",
        "coats",
        {"length": ("knee", "maxi"), "closure": ("single-breasted", "double-breasted")},
        "length",
        ("wool", "cashmere", "gabardine"),
    ),
    Garment(
        "jacket",
        "jackets",
        {"closure": ("single-breasted", "zip")},
        "closure",
        ("denim", "leather", "nylon", "wool"),
    ),
    Garment(
        "bag", "bags", {"handle": ("top handle", "shoulder strap")}, "handle", ("leather", "canvas", "suede")
    ),
    Garment("shoe", "shoes", {"heel": ("flat", "high heel")}, "heel", ("leather", "suede", "canvas")),
    Garment("hat", "hats", {"brim": ("narrow brim", "wide brim")}, "brim", ("felt", "straw", "wool")),
    Garment(
        "scarf", "scarves", {"fringe": ("plain ends", "fringed")}, "fringe", ("wool", "silk", "cashmere")
    ),
)
GARMENT_INDEX: dict[str, int] = {g.name: i for i, g in enumerate(GARMENTS)}

# FashionIQ categories (garment_class ids 0, 1, 2) and the garment kinds each one draws from.
FIQ_GARMENTS: dict[str, tuple[str, ...]] = {
    "dress": ("dress",),
    "shirt": ("shirt",),
    "toptee": ("t-shirt", "top"),
}

# Attribute types a modification caption may change, per garment kind (colour and pattern always may).
FIQ_MUTABLE: dict[str, tuple[str, ...]] = {
    "dress": ("length", "sleeve", "neckline"),
    "shirt": ("sleeve", "pocket"),
    "t-shirt": ("sleeve", "neckline"),
    "top": ("sleeve", "neckline"),
}


def _subcategories() -> tuple[tuple[str, str], ...]:
    out = []
    for g in GARMENTS:
        for value in g.attributes[g.defining]:
            out.append((g.name, value))
    return tuple(out)


SUBCATEGORIES: tuple[tuple[str, str], ...] = _subcategories()
SUBCATEGORY_INDEX: dict[tuple[str, str], int] = {s: i for i, s in enumerate(SUBCATEGORIES)}


def _attribute_vocabulary() -> tuple[str, ...]:
    words = [f"garment:{g.name}" for g in GARMENTS]
    words += [f"colour:{c}" for c in COLOUR_NAMES]
    words += [f"pattern:{p}" for p in PATTERNS]
    words += [f"second-colour:{c}" for c in COLOUR_NAMES]
    for kind, values in ATTRIBUTE_VALUES.items():
        words += [f"{kind}:{v}" for v in values]
    materials = sorted({m for g in GARMENTS for m in g.materials})
    words += [f"material:{m}" for m in materials]
    return tuple(words)


ATTRIBUTE_VOCABULARY: tuple[str, ...] = _attribute_vocabulary()
ATTRIBUTE_ID: dict[str, int] = {w: i for i, w in enumerate(ATTRIBUTE_VOCABULARY)}

assert len(SUBCATEGORIES) <= 121, "sub-category ids must fit the 121-way head"
assert len(ATTRIBUTE_VOCABULARY) <= 2232, "attribute ids must fit the FashionGen attribute vocabulary"


def subcategory_name(subcategory_id: int) -> str:
    garment, value = SUBCATEGORIES[subcategory_id]
    return f"{value} {garment}"
