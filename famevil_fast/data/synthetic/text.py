"""Wording of the synthetic catalogue: product titles, descriptions and modification captions.

Every phrase is drawn from several paraphrases so that a model must read the attributes, not memorise
templates. Titles and descriptions state every visible attribute of a product (plus its material, which the
image does not show); a pair of modification captions names exactly the attributes in which the target
differs from the reference, split between the two captions as two annotators would.
"""

from __future__ import annotations

import numpy as np

from famevil_fast.data.synthetic.render import ProductSpec
from famevil_fast.data.synthetic.vocab import GARMENT_INDEX, GARMENTS

_PATTERN_ADJ = {
    "stripes": ("striped", "stripe"),
    "checks": ("checked", "check", "gingham"),
    "dots": ("polka-dot", "dotted"),
    "diagonal": ("diagonal-stripe", "bias-striped"),
    "colour-block": ("colour-block", "two-tone"),
}
_PATTERN_NOUN = {
    "stripes": ("stripes",),
    "checks": ("checks", "a check pattern"),
    "dots": ("polka dots", "dots"),
    "diagonal": ("diagonal stripes",),
    "colour-block": ("a colour-block design", "a two-tone design"),
}
_PATTERN_SENTENCE = {
    "plain": ("Solid {c} colour.", "Plain {c} fabric.", "Solid tone throughout."),
    "stripes": ("{s} horizontal stripes throughout.", "Striped in {s}.", "{S} stripes on a {c} ground."),
    "checks": ("Check pattern in {c} and {s}.", "{S} checks throughout.", "Gingham check in {s}."),
    "dots": ("{S} polka dots all over.", "Dotted with {s} spots.", "Allover {s} dot print."),
    "diagonal": ("{S} diagonal stripes.", "Bias stripes in {s}.", "Diagonal {s} striping throughout."),
    "colour-block": (
        "Colour-block design with a {s} lower half.",
        "Two-tone: {c} above, {s} below.",
        "{S} panel across the lower half.",
    ),
}
_ATTR_TITLE = {
    "sleeve": {"sleeveless": "sleeveless", "short": "short-sleeve", "long": "long-sleeve"},
    "length": {"mini": "mini", "knee": "knee-length", "maxi": "maxi"},
    "neckline": {"round": "crew-neck", "v-neck": "v-neck", "turtleneck": "turtleneck"},
    "pocket": {"no pocket": "", "chest pocket": "pocket"},
    "shape": {"straight": "straight", "flared": "flared"},
    "fit": {"slim": "slim-fit", "wide": "wide-leg"},
    "leg": {"short": "short", "bermuda": "bermuda"},
    "closure": {"single-breasted": "single-breasted", "double-breasted": "double-breasted", "zip": "zip-up"},
    "handle": {"top handle": "top-handle", "shoulder strap": "shoulder"},
    "heel": {"flat": "flat", "high heel": "high-heel"},
    "brim": {"narrow brim": "narrow-brim", "wide brim": "wide-brim"},
    "fringe": {"plain ends": "", "fringed": "fringed"},
}
_ATTR_SENTENCE = {
    ("sleeve", "sleeveless"): ("Sleeveless.", "No sleeves.", "Sleeveless cut."),
    ("sleeve", "short"): ("Short sleeves.", "Short sleeved.", "Cut with short sleeves."),
    ("sleeve", "long"): ("Long sleeves.", "Long sleeved.", "Full-length sleeves."),
    ("length", "mini"): ("Mini length.", "Hem falls above the knee.", "Short mini cut."),
    ("length", "knee"): ("Knee length.", "Hem falls at the knee.", "Midi length to the knee."),
    ("length", "maxi"): ("Maxi length.", "Floor-length hem.", "Long maxi cut."),
    ("neckline", "round"): ("Round neckline.", "Crew neck.", "Rounded collarless neck."),
    ("neckline", "v-neck"): ("V-neck.", "V-neckline.", "Plunging v neck."),
    ("neckline", "turtleneck"): ("Turtleneck.", "High roll neck.", "Turtleneck collar."),
    ("pocket", "no pocket"): ("Clean front without pockets.", "No chest pocket."),
    ("pocket", "chest pocket"): ("Patch pocket at chest.", "Chest pocket.", "One pocket at the chest."),
    ("shape", "straight"): ("Straight silhouette.", "Straight cut.", "Pencil shape."),
    ("shape", "flared"): ("Flared silhouette.", "A-line flare.", "Pleated flared cut."),
    ("fit", "slim"): ("Slim fit.", "Narrow tapered legs.", "Skinny leg."),
    ("fit", "wide"): ("Wide leg.", "Relaxed wide legs.", "Palazzo cut."),
    ("leg", "short"): ("Short inseam.", "Mid-thigh length.", "Short cut legs."),
    ("leg", "bermuda"): ("Bermuda length.", "Knee-length legs.", "Long bermuda cut."),
    ("closure", "single-breasted"): (
        "Single-breasted button closure.",
        "Button closure at front.",
        "Single row of buttons.",
    ),
    ("closure", "double-breasted"): ("Double-breasted.", "Two rows of buttons.", "Double-breasted closure."),
    ("closure", "zip"): ("Zip closure at front.", "Full zip.", "Zip fastening."),
    ("handle", "top handle"): ("Rolled top handle.", "Single top handle.", "Carry handle at top."),
    ("handle", "shoulder strap"): (
        "Adjustable shoulder strap.",
        "Long shoulder strap.",
        "Strap for shoulder carry.",
    ),
    ("heel", "flat"): ("Flat rubber sole.", "Flat heel.", "Low flat sole."),
    ("heel", "high heel"): ("Stiletto heel.", "High heel.", "Tall slim heel."),
    ("brim", "narrow brim"): ("Narrow brim.", "Short brim.", "Small curled brim."),
    ("brim", "wide brim"): ("Wide brim.", "Broad floppy brim.", "Extra-wide brim."),
    ("fringe", "plain ends"): ("Clean finished ends.", "Hemmed edges."),
    ("fringe", "fringed"): ("Fringed ends.", "Tasselled fringe at both ends.", "Fringe trim."),
}
_FILLERS = (
    "Tonal stitching.",
    "Regular fit.",
    "Relaxed fit.",
    "Made in Italy.",
    "Made in Portugal.",
    "Unlined.",
    "Logo label at interior.",
    "Dry clean.",
    "Machine wash cold.",
    "Signature hardware.",
    "Lightweight.",
    "Soft hand feel.",
    "Tailored fit.",
    "Seasonal collection piece.",
    "Designed for everyday wear.",
)


def _pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def title(spec: ProductSpec, rng: np.random.Generator) -> str:
    """A short product title naming colour, pattern, the defining attribute and the garment kind: the
    sub-category is always stated (a scarf's plain ends by the absence of "fringed")."""
    garment = GARMENTS[GARMENT_INDEX[spec.garment]]
    key = _ATTR_TITLE[garment.defining][spec.attr(garment.defining)]
    pattern = "" if spec.pattern == "plain" else _pick(rng, _PATTERN_ADJ[spec.pattern])
    forms = [
        f"{spec.colour} {pattern} {key} {spec.garment}",
        f"{key} {pattern} {spec.garment} in {spec.colour}",
        f"{spec.colour} {key} {spec.material} {pattern} {spec.garment}",
    ]
    if spec.pattern != "plain":
        forms.append(
            f"{key} {spec.garment} in {spec.colour} with {spec.second} "
            f"{_pick(rng, _PATTERN_NOUN[spec.pattern])}"
        )
    return " ".join(_pick(rng, forms).split())


def description(spec: ProductSpec, rng: np.random.Generator) -> str:
    """Several sentences stating every attribute of ``spec`` in varied wording and order, plus fillers."""
    c, s = spec.colour, spec.second or spec.colour
    lead = _pick(
        rng,
        (
            f"{_article(spec.material).capitalize()} {spec.material} {spec.garment} in {c}.",
            f"{c.capitalize()} {spec.garment} in {spec.material}.",
            f"{spec.material.capitalize()} {spec.garment} in a {c} shade.",
        ),
    )
    body = [_pick(rng, _PATTERN_SENTENCE[spec.pattern]).format(c=c, s=s, S=s.capitalize())]
    for kind, value in spec.attrs:
        body.append(_pick(rng, _ATTR_SENTENCE[(kind, value)]))
    n_fill = int(rng.integers(1, 4))
    body += [str(x) for x in rng.choice(_FILLERS, size=n_fill, replace=False)]
    order = rng.permutation(len(body))
    return " ".join([lead] + [body[i] for i in order])


# ---------------------------------------------------------------------------------------------------
# Modification captions (FashionIQ style)

_LENGTH_RANK = {"mini": 0, "knee": 1, "maxi": 2}
_SLEEVE_RANK = {"sleeveless": 0, "short": 1, "long": 2}


def _colour_phrase(old: ProductSpec, new: ProductSpec, rng: np.random.Generator) -> str:
    return _pick(
        rng,
        (
            f"is {new.colour}",
            f"is {new.colour} instead of {old.colour}",
            f"is {new.colour} colored",
            f"change the colour to {new.colour}",
        ),
    )


def _pattern_phrase(old: ProductSpec, new: ProductSpec, rng: np.random.Generator) -> str:
    if new.pattern == "plain":
        return _pick(rng, ("is plain", "is solid with no pattern", f"has no {_PATTERN_NOUN[old.pattern][0]}"))
    noun = _pick(rng, _PATTERN_NOUN[new.pattern])
    forms = [f"has {new.second} {noun}" if noun[0] != "a" else f"has {noun} in {new.second}"]
    if old.pattern != "plain":
        forms.append(
            f"has {new.second} {_PATTERN_NOUN[new.pattern][0]} instead of {_PATTERN_NOUN[old.pattern][0]}"
        )
    else:
        forms.append(f"is {_PATTERN_ADJ[new.pattern][0]} with {new.second}")
    return _pick(rng, forms)


def _second_phrase(old: ProductSpec, new: ProductSpec, rng: np.random.Generator) -> str:
    noun = _PATTERN_NOUN[new.pattern][0]
    return _pick(
        rng,
        (
            f"the {noun} are {new.second}" if noun.endswith("s") else f"{noun} is {new.second}",
            f"has {new.second} {noun} instead of {old.second}",
        ),
    )


def _attr_phrase(kind: str, old: str, new: str, rng: np.random.Generator) -> str:
    if kind == "sleeve":
        relative = "longer sleeves" if _SLEEVE_RANK[new] > _SLEEVE_RANK[old] else "shorter sleeves"
        absolute = {"sleeveless": "is sleeveless", "short": "has short sleeves", "long": "has long sleeves"}[
            new
        ]
        return _pick(rng, (absolute, f"has {relative}", absolute))
    if kind == "length":
        relative = "is longer" if _LENGTH_RANK[new] > _LENGTH_RANK[old] else "is shorter"
        absolute = {"mini": "is a mini length", "knee": "is knee length", "maxi": "is floor length"}[new]
        return _pick(rng, (relative, absolute))
    if kind == "neckline":
        return {
            "round": _pick(rng, ("has a round neck", "has a crew neck")),
            "v-neck": _pick(rng, ("has a v-neck", "has a v neckline")),
            "turtleneck": "has a turtleneck",
        }[new]
    if kind == "pocket":
        return (
            "has a chest pocket"
            if new == "chest pocket"
            else _pick(rng, ("has no pocket", "has no chest pocket"))
        )
    raise ValueError(f"no caption wording for attribute {kind!r}")


def changes(old: ProductSpec, new: ProductSpec) -> list[str]:
    """Names of the attributes in which ``new`` differs from ``old`` (colour, pattern, second, attr kinds)."""
    out = []
    if old.colour != new.colour:
        out.append("colour")
    if old.pattern != new.pattern:
        out.append("pattern")
    elif new.pattern != "plain" and old.second != new.second:
        out.append("second")
    a, b = dict(old.attrs), dict(new.attrs)
    out += [k for k in a if a[k] != b[k]]
    return out


def change_phrase(kind: str, old: ProductSpec, new: ProductSpec, rng: np.random.Generator) -> str:
    if kind == "colour":
        return _colour_phrase(old, new, rng)
    if kind == "pattern":
        return _pattern_phrase(old, new, rng)
    if kind == "second":
        return _second_phrase(old, new, rng)
    return _attr_phrase(kind, old.attr(kind), new.attr(kind), rng)


def modification_captions(old: ProductSpec, new: ProductSpec, rng: np.random.Generator) -> list[str]:
    """Two captions that together name exactly the changes from ``old`` to ``new``."""
    kinds = changes(old, new)
    if not kinds:
        raise ValueError("reference and target are identical; a modification needs at least one change")
    if len(kinds) == 1:
        return [change_phrase(kinds[0], old, new, rng), change_phrase(kinds[0], old, new, rng)]
    order = [kinds[i] for i in rng.permutation(len(kinds))]
    cut = int(rng.integers(1, len(order)))
    first, second = order[:cut], order[cut:]
    # annotators sometimes repeat a change the other one already named
    if rng.random() < 0.3:
        second = second + [first[0]]
    return [" and ".join(change_phrase(k, old, new, rng) for k in part) for part in (first, second)]
