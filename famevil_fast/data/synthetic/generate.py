"""Writes a complete synthetic dataset: FashionGen-style products and FashionIQ-style triplets.

Layout (the same as the real datasets, as FashionViL lays them out)::

    DIR/FashionGen/{train,val}/<id>_<view>.png     1-4 views per product, palette PNG
    DIR/FashionGen/{train,val}_info.json            products: images, id, title, description,
                                                    attributes_id, category_id, subcategory_id
    DIR/FashionIQ/images/<name>.jpg                 one JPEG per product, varied aspect
    DIR/FashionIQ/image_splits/split.<cat>.<split>.json
    DIR/FashionIQ/captions/cap.<cat>.<split>.json   train rows: candidate, target, captions;
                                                    val rows add target_id, fake_data, garment_class
    DIR/FashionIQ/synthetic_attributes.json         the drawn attributes of every FashionIQ image
    DIR/synthetic.json                              generator settings, counts, vocabularies

The paths of the files follow from four settings alone (products, seed, val_fraction and the FashionIQ image
count; the image size changes none), which ``synthetic.json`` records with the sha256 of the sorted paths.
``DIR/synthetic.writing`` holds them too: it is written before anything is removed or written and removed once
``synthetic.json`` (written last) is in place, so a directory holding it is an interrupted run's, which a new
run completes. A ``synthetic.json`` the generator did not write is refused (it would be overwritten), and so
are a directory holding neither file whose ``FashionGen/`` or ``FashionIQ/`` holds dataset JSON files (another
dataset's) and a folder the files go to that is a link out of ``DIR``. A run that rewrites an earlier dataset
(its ``synthetic.json``, or the marker an interrupted run left, parsed and taken only when the generator wrote
it) removes that one's ``synthetic.json`` first, so that a half-rewritten directory is never taken for a
complete dataset, then rebuilds the earlier dataset's paths from its settings (the random draws that name the
files, no image drawn) and, only when they hash to the recorded sha256, removes those it does not write again
and the earlier JSON files, so that the directory ends up holding what a fresh one would. No other file is
removed: a user's own files stay, also under names the generator gives (the marker lists those found at the
run's own paths before it wrote any, which a later run leaves even when this one was stopped before drawing
over them), and so do all files of a dataset whose paths cannot be rebuilt (an older generator's, or a record
edited by hand), and any file reached through a link out of ``DIR``; ``files_not_written_by_make_synthetic``
names those under ``FashionGen/`` and ``FashionIQ/``.

All randomness is drawn in one process from ``numpy.random.default_rng(seed)`` before any image is drawn,
so the output is identical for a seed whatever the number of worker processes.

Every product looks different from every other of its part (FashionGen, or its FashionIQ category): its
kind, colours, pattern and attributes make a combination no other has (the material does not show). There
are ``MAX_PRODUCTS`` (52,668) such combinations, 3,696 of them shirts, so at most ``MAX_PRODUCTS`` products
and ``MAX_FIQ_IMAGES`` (11,090, a third of them shirts) FashionIQ images are made; more are refused
(ValueError). A product is drawn at random until its look is new (31 tries at most); past that, one of the
looks left is drawn.

FashionIQ-style images come in families: a base product and variants that change one to three attributes
(at most 8 members; every category has at least two families, one of them in val). Triplets pair members of
a family, so the target shares every unnamed attribute with the reference. The validation gallery holds
every family member, so neither the caption alone (other gallery items mostly agree with the target on
every attribute it names) nor the reference alone (its siblings and itself are in the gallery) singles out
the target. But a family has fewer members than R@10's 10, so either alone goes far at R@10 and R@50: on
the demo's CPU dataset (2000 products, seed 0; about 140 val gallery images per category), ranking the
gallery by how many attributes differ from the reference (the reference itself last) scores R@10 71 and
R@50 97 (mean 84), and ranking by agreement with the target on the attributes the captions name R@10 61
and R@50 93 (mean 77), against a mean of 21 by chance (both knowing every attribute exactly, ties broken at
random; averaged over the three categories). A model's TGIR score is to be read against those, not against
chance alone.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import multiprocessing
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from famevil_fast.data.fiq_convert import fashioniq_val_rows
from famevil_fast.data.synthetic import text
from famevil_fast.data.synthetic.render import ProductSpec, ViewSpec, render_image
from famevil_fast.data.synthetic.vocab import (
    ATTRIBUTE_ID,
    ATTRIBUTE_VOCABULARY,
    COLOUR_NAMES,
    FIQ_GARMENTS,
    FIQ_MUTABLE,
    GARMENT_INDEX,
    GARMENTS,
    PATTERNS,
    SUBCATEGORIES,
    SUBCATEGORY_INDEX,
)
from famevil_fast.files import atomic_write_json

FIQ_CATEGORIES: tuple[str, ...] = ("dress", "shirt", "toptee")
_PATTERN_P = np.asarray([0.3] + [0.14] * (len(PATTERNS) - 1))
_BACKGROUNDS = ((255, 255, 255), (245, 245, 245), (236, 236, 238), (243, 239, 231), (232, 236, 241))
# 2: the record and the marker hold the settings the file paths follow from; raise it whenever the same
# settings would give other paths, so that no rewrite removes files by paths rebuilt with other code (the
# recorded sha256 of the paths would stop such a rewrite too, and remove nothing). Still 2 though settings
# that drew a product look twice, or a FashionIQ category of one family (no val triplets), now give other
# paths: no other settings' do, and an earlier dataset of those is left in place (its sha256 differs), named
GENERATOR_VERSION = 2
RECORD_FILE = "synthetic.json"
WRITING_MARKER = "synthetic.writing"
# where the dataset's JSON files lie (relative to DIR), as ``make_synthetic`` lays them out
DATASET_JSON_FOLDERS = ("FashionGen", "FashionIQ", "FashionIQ/captions", "FashionIQ/image_splits")
DATASET_FOLDERS = ("FashionGen", "FashionIQ")
MIN_PRODUCTS = 2
MIN_IMAGE_SIZE = 32
MIN_FIQ_IMAGES = 24  # the fewest FashionIQ-style images that make up train and val families
# the JSON files every dataset holds (relative to DIR)
_JSON_FILES = frozenset(
    [
        "FashionGen/train_info.json",
        "FashionGen/val_info.json",
        "FashionIQ/synthetic_attributes.json",
        *(
            f"FashionIQ/{folder}/{prefix}.{category}.{split}.json"
            for folder, prefix in (("captions", "cap"), ("image_splits", "split"))
            for category in FIQ_CATEGORIES
            for split in ("train", "val")
        ),
    ]
)
# the keys every synthetic.json of the generator holds (version 1 on), and every marker (version 2 on)
_COUNT_KEYS = ("fashiongen_images", "fashioniq_images")
_RECORD_KEYS = ("generator_version", "seed", "products_train", "products_val", *_COUNT_KEYS)
_MARKER_KEYS = ("generator_version", "settings", *_COUNT_KEYS)
# the sha256 of the sorted paths of the dataset's files, in the record and the marker: a rewrite removes the
# earlier dataset's files only when the paths rebuilt from its settings hash the same
_DIGEST_KEY = "paths_sha256"
# in the marker once it names the run's own paths: those where files lay before the run wrote any (a user's,
# or those of a dataset whose paths cannot be rebuilt), which a later run does not remove
_KEPT_KEY = "kept"
_V1_MARKER_START = "make-synthetic is writing a synthetic dataset here"
_MARKER_NOTE = (
    "make-synthetic is writing a synthetic dataset here; if this file remains, the run was interrupted: "
    "run make-synthetic again to complete it"
)


@dataclass(frozen=True)
class _Settings:
    """What the paths of a dataset's files follow from (``fiq_images``: the FashionIQ image count asked for,
    at least 24)."""

    products: int
    seed: int
    val_fraction: float
    fiq_images: int


@dataclass
class SyntheticSummary:
    root: str
    seed: int
    image_size: int
    products_train: int
    products_val: int
    fashiongen_images: int
    fashioniq_images: int
    triplets_train: int
    triplets_val: int
    seconds: float
    # files under FashionGen/ and FashionIQ/ this dataset does not write (left in place), relative to root
    left: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ sampling


def _other(rng: np.random.Generator, options: Iterable[str], *exclude: str | None) -> str:
    pool = [o for o in options if o not in exclude]
    return pool[int(rng.integers(len(pool)))]


def sample_product(rng: np.random.Generator, garment: str | None = None) -> ProductSpec:
    g = GARMENTS[int(rng.integers(len(GARMENTS)))] if garment is None else GARMENTS[GARMENT_INDEX[garment]]
    colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    pattern = PATTERNS[int(rng.choice(len(PATTERNS), p=_PATTERN_P))]
    second = None if pattern == "plain" else _other(rng, COLOUR_NAMES, colour)
    attrs = tuple((k, vals[int(rng.integers(len(vals)))]) for k, vals in g.attributes.items())
    material = g.materials[int(rng.integers(len(g.materials)))]
    return ProductSpec(g.name, colour, pattern, second, attrs, material)


def garment_looks(garment: str) -> int:
    """How many products of kind ``garment`` look different: colours x patterns (a patterned one in a second
    colour) x the combinations of the kind's attributes (the material does not show)."""
    g = GARMENTS[GARMENT_INDEX[garment]]
    colourings = len(COLOUR_NAMES) * (1 + (len(PATTERNS) - 1) * (len(COLOUR_NAMES) - 1))
    return colourings * math.prod(len(values) for values in g.attributes.values())


def _looks_of(garment: str) -> list[tuple]:
    """The visual keys of every product of kind ``garment``, in a fixed order."""
    g = GARMENTS[GARMENT_INDEX[garment]]
    colourings = [(c, "plain", None) for c in COLOUR_NAMES] + [
        (c, p, s) for c in COLOUR_NAMES for p in PATTERNS[1:] for s in COLOUR_NAMES if s != c
    ]
    kinds = list(g.attributes)
    attrs = [tuple(zip(kinds, values)) for values in itertools.product(*g.attributes.values())]
    return [(g.name, *colouring, a) for colouring in colourings for a in attrs]


class _Looks:
    """The looks (visual keys) of the products drawn so far; ``unseen`` draws one not drawn yet."""

    def __init__(self) -> None:
        self.seen: set[tuple] = set()
        self._pools: dict[tuple[str, ...], list[tuple]] = {}  # made on first need, drawn ones dropped lazily

    def __contains__(self, key: object) -> bool:
        return key in self.seen

    def add(self, key: tuple) -> None:
        self.seen.add(key)

    def unseen(self, rng: np.random.Generator, garments: tuple[str, ...]) -> tuple:
        """A look of one of ``garments`` not drawn yet, each equally likely."""
        pool = self._pools.get(garments)
        if pool is None:
            pool = self._pools[garments] = [key for g in garments for key in _looks_of(g)]
        while pool:
            i = int(rng.integers(len(pool)))
            key = pool[i]
            pool[i] = pool[-1]
            pool.pop()
            if key not in self.seen:
                return key
        raise ValueError(f"every look of {', '.join(garments)} is drawn already")


def _unique_product(
    rng: np.random.Generator, looks: _Looks, garment: str | None = None, pool: tuple[str, ...] | None = None
) -> ProductSpec:
    """A product whose look is not in ``looks`` (then added to it): of kind ``garment`` (any when None) as
    long as drawing at random finds one in 31 tries, else one of the looks of ``pool`` (default: that kind,
    or every kind) not drawn yet."""
    spec = sample_product(rng, garment)
    for _ in range(30):
        if spec.visual_key() not in looks:
            break
        spec = sample_product(rng, garment)
    if spec.visual_key() in looks:  # the space is filling up: draw among the looks left
        if pool is None:
            pool = tuple(g.name for g in GARMENTS) if garment is None else (garment,)
        name, colour, pattern, second, attrs = looks.unseen(rng, pool)
        g = GARMENTS[GARMENT_INDEX[name]]
        spec = ProductSpec(
            name, colour, pattern, second, attrs, g.materials[int(rng.integers(len(g.materials)))]
        )
    looks.add(spec.visual_key())
    return spec


# the most products that look different: FashionGen-style products are all distinct, so no more are drawn
MAX_PRODUCTS = sum(garment_looks(g.name) for g in GARMENTS)
# the most FashionIQ-style images (a third to each category) that look different within their category,
# bound by the category with the fewest looks (shirts)
MAX_FIQ_IMAGES = (
    len(FIQ_CATEGORIES) * min(sum(garment_looks(g) for g in FIQ_GARMENTS[c]) for c in FIQ_CATEGORIES)
    + len(FIQ_CATEGORIES)
    - 1
)


def _view(rng: np.random.Generator, kind: str) -> ViewSpec:
    background = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    brightness = float(rng.uniform(0.9, 1.0))
    jitter = rng.uniform(-0.03, 0.03, size=2)
    if kind == "detail":
        c = rng.uniform(0.3, 0.7, size=2)
        return ViewSpec(
            float(rng.uniform(1.4, 1.9)),
            float(c[0]),
            float(c[1]),
            bool(rng.random() < 0.5),
            False,
            background,
            brightness,
        )
    scale = float(rng.uniform(0.6, 0.75)) if kind == "far" else float(rng.uniform(0.82, 0.94))
    return ViewSpec(
        scale,
        0.5 + float(jitter[0]),
        0.5 + float(jitter[1]),
        kind == "mirror" or (kind == "back" and bool(rng.random() < 0.5)),
        kind == "back",
        background,
        brightness,
    )


def _product_views(rng: np.random.Generator) -> list[ViewSpec]:
    n = int(rng.integers(1, 5))
    kinds = ["front"] + [
        str(k) for k in rng.choice(["mirror", "back", "detail", "far"], size=n - 1, replace=False)
    ]
    return [_view(rng, k) for k in kinds]


def attribute_ids(spec: ProductSpec) -> list[int]:
    words = [f"garment:{spec.garment}", f"colour:{spec.colour}", f"pattern:{spec.pattern}"]
    if spec.second is not None:
        words.append(f"second-colour:{spec.second}")
    words += [f"{k}:{v}" for k, v in spec.attrs]
    words.append(f"material:{spec.material}")
    return [ATTRIBUTE_ID[w] for w in words]


_SPEC_FIELDS = {"garment", "colour", "pattern", "second-colour", "material"}


def spec_from_attribute_ids(ids: Iterable[int]) -> ProductSpec:
    """The product spec that :func:`attribute_ids` encoded (the inverse of that function)."""
    words = []
    for i in ids:
        if not 0 <= int(i) < len(ATTRIBUTE_VOCABULARY):
            raise ValueError(f"attribute id {i} is not in the synthetic attribute vocabulary")
        words.append(ATTRIBUTE_VOCABULARY[int(i)].split(":", 1))
    fields = dict(words)
    missing = sorted({"garment", "colour", "pattern", "material"} - set(fields))
    if missing:
        raise ValueError(f"attribute ids name no {', '.join(missing)}: not a synthetic product")
    attrs = tuple((kind, value) for kind, value in words if kind not in _SPEC_FIELDS)
    return ProductSpec(
        fields["garment"],
        fields["colour"],
        fields["pattern"],
        fields.get("second-colour"),
        attrs,
        fields["material"],
    )


def subcategory_id(spec: ProductSpec) -> int:
    g = GARMENTS[GARMENT_INDEX[spec.garment]]
    return SUBCATEGORY_INDEX[(g.name, spec.attr(g.defining))]


# ------------------------------------------------------------------------------------------ FashionGen part


@dataclass
class _Job:
    path: str
    spec: ProductSpec
    view: ViewSpec
    width: int
    height: int


def fashiongen_split(products: int, val_fraction: float) -> tuple[int, int]:
    """The FashionGen-style products (train, val) of a dataset of ``products`` (at least 2): ``val_fraction``
    of them, rounded, in val, and at least one in each split."""
    n_val = min(products - 1, max(1, round(products * val_fraction)))
    return products - n_val, n_val


def _fashiongen(rng: np.random.Generator, n: int, val_fraction: float, root: Path, size: int):
    seen = _Looks()
    n_val = fashiongen_split(n, val_fraction)[1]
    is_val = np.zeros(n, dtype=bool)
    is_val[rng.permutation(n)[:n_val]] = True
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    jobs: list[_Job] = []
    for i in range(n):
        spec = _unique_product(rng, seen)
        split = "val" if is_val[i] else "train"
        pid = 100000 + i
        views = _product_views(rng)
        images = [f"{split}/{pid}_{k}.png" for k in range(len(views))]
        jobs += [_Job(str(root / "FashionGen" / p), spec, v, size, size) for p, v in zip(images, views)]
        rows[split].append(
            {
                "images": images,
                "id": pid,
                "title": text.title(spec, rng),
                "description": text.description(spec, rng),
                "attributes_id": attribute_ids(spec),
                "category_id": GARMENT_INDEX[spec.garment],
                "subcategory_id": subcategory_id(spec),
            }
        )
    return rows, jobs


# ------------------------------------------------------------------------------------------ FashionIQ part


def _moves(rng: np.random.Generator, base: ProductSpec) -> list[tuple[str, object]]:
    """Two or three attribute changes (kind, new value) that can be combined freely on ``base``."""
    kinds = ["colour", "pattern", *FIQ_MUTABLE[base.garment]]
    if base.pattern != "plain":
        kinds.append("second")
    chosen = [str(k) for k in rng.choice(kinds, size=min(len(kinds), int(rng.integers(2, 4))), replace=False)]
    if "pattern" in chosen and "second" in chosen:
        chosen.remove("second")
    moves: list[tuple[str, object]] = []
    used = {base.colour, base.second}
    for kind in chosen:
        if kind == "pattern":
            pattern = _other(rng, PATTERNS, base.pattern)
            second = None if pattern == "plain" else (base.second or _other(rng, COLOUR_NAMES, *used))
            used.add(second)
            moves.append((kind, (pattern, second)))
        elif kind == "second":
            value = _other(rng, COLOUR_NAMES, *used)
            used.add(value)
            moves.append((kind, value))
        elif kind != "colour":
            values = GARMENTS[GARMENT_INDEX[base.garment]].attributes[kind]
            moves.append((kind, _other(rng, values, base.attr(kind))))
    if "colour" in chosen:
        moves.insert(0, ("colour", _other(rng, COLOUR_NAMES, *used)))
    return moves


def _apply(base: ProductSpec, moves: list[tuple[str, object]]) -> ProductSpec:
    spec = base
    for kind, value in moves:
        if kind == "colour":
            spec = spec.replace(colour=value)
        elif kind == "pattern":
            spec = spec.replace(pattern=value[0], second=value[1])
        elif kind == "second":
            spec = spec.replace(second=value)
        else:
            attrs = dict(spec.attrs)
            attrs[kind] = value
            spec = spec.replace(attrs=tuple((k, attrs[k]) for k, _ in spec.attrs))
    return spec


def _family(rng: np.random.Generator, category: str, size: int, seen: _Looks) -> list[ProductSpec]:
    """A base product and variants that apply subsets of the same few moves (a small attribute lattice).

    Every change a caption can name is then shared by another member that differs elsewhere (the caption
    alone is ambiguous) and every member has siblings that keep its other attributes (the reference alone
    is ambiguous).
    """
    garments = FIQ_GARMENTS[category]
    base = _unique_product(rng, seen, garments[int(rng.integers(len(garments)))], pool=garments)
    moves = _moves(rng, base)
    subsets = sorted(
        (tuple(m for b, m in enumerate(moves) if mask >> b & 1) for mask in range(1, 1 << len(moves))),
        key=len,
    )
    members = [base]
    for subset in subsets:
        if len(members) == size:
            break
        variant = _apply(base, list(subset))
        if variant.visual_key() not in seen and text.changes(base, variant):
            seen.add(variant.visual_key())
            members.append(variant)
    return members


def _fiq_name(index: int, seed: int) -> str:
    return f"B{(index * 7919 + seed * 104729 + 12345) % 10**9:09d}"


def _triplets(rng: np.random.Generator, names: list[str], specs: list[ProductSpec]) -> list[dict]:
    pairs = [
        (i, j)
        for i in range(len(specs))
        for j in range(len(specs))
        if i != j and 1 <= len(text.changes(specs[i], specs[j])) <= 3
    ]
    want = min(len(pairs), max(1, round(1.2 * len(specs))))
    chosen = rng.permutation(len(pairs))[:want]
    out = []
    for k in sorted(chosen):
        i, j = pairs[k]
        out.append(
            {
                "candidate": names[i],
                "target": names[j],
                "captions": text.modification_captions(specs[i], specs[j], rng),
            }
        )
    return out


def _fashioniq(
    rng: np.random.Generator, n_images: int, val_fraction: float, seed: int, root: Path, size: int
):
    seen = _Looks()
    per_cat = max(8, n_images // len(FIQ_CATEGORIES))
    counter = 0
    captions: dict[tuple[str, str], list[dict]] = {}
    splits: dict[tuple[str, str], list[str]] = {}
    attributes: dict[str, dict] = {}
    jobs: list[_Job] = []
    for category in FIQ_CATEGORIES:
        families = []
        left = per_cat
        while left >= 4 or not families:
            size_f = min(left, int(rng.integers(4, 9)))
            if left - size_f < 4:
                size_f = left
            families.append(_family(rng, category, max(size_f, 4), seen))
            left -= len(families[-1])
        while len(families) < 2:  # one family (at the fewest images) would leave the val split without one
            families.append(_family(rng, category, 4, seen))
        # val families are drawn among those with room for several triplets
        eligible = [f for f, fam in enumerate(families) if len(fam) >= 3] or list(range(len(families)))
        n_val = min(len(eligible), len(families) - 1, max(1, round(len(families) * val_fraction)))
        val_ids = {eligible[i] for i in rng.permutation(len(eligible))[:n_val]}
        for split in ("train", "val"):
            captions[(category, split)] = []
            splits[(category, split)] = []
        for f, members in enumerate(families):
            split = "val" if f in val_ids else "train"
            names = []
            for spec in members:
                name = _fiq_name(counter, seed)
                counter += 1
                names.append(name)
                width = int(round(size * rng.uniform(0.75, 1.0)))
                view = ViewSpec(
                    float(rng.uniform(0.82, 0.92)),
                    0.5 + float(rng.uniform(-0.02, 0.02)),
                    0.5 + float(rng.uniform(-0.02, 0.02)),
                    bool(rng.random() < 0.15),
                    False,
                    _BACKGROUNDS[int(rng.integers(2))],
                    float(rng.uniform(0.92, 1.0)),
                )
                jobs.append(_Job(str(root / "FashionIQ" / "images" / f"{name}.jpg"), spec, view, width, size))
                attributes[name] = {"category": category, **asdict(spec)}
            splits[(category, split)] += names
            captions[(category, split)] += _triplets(rng, names, members)
    for category in FIQ_CATEGORIES:
        garment_class = FIQ_CATEGORIES.index(category)
        raw = captions[(category, "val")]
        captions[(category, "val")] = fashioniq_val_rows(raw, splits[(category, "val")], garment_class)
    return captions, splits, attributes, jobs


# ------------------------------------------------------------------------------------------ writing


def _render_job(job: _Job) -> None:
    image = render_image(job.spec, job.view, job.width, job.height)
    if os.path.islink(job.path):  # replaced, not followed: its target may lie outside the directory
        os.unlink(job.path)
    if job.path.endswith(".png"):
        image.save(job.path, format="PNG", compress_level=1)
    else:
        image.convert("RGB").save(job.path, format="JPEG", quality=90)


def _render_chunk(jobs: list[_Job]) -> int:
    for job in jobs:
        _render_job(job)
    return len(jobs)


def _render_all(jobs: list[_Job], workers: int) -> None:
    for d in sorted({os.path.dirname(j.path) for j in jobs}):
        os.makedirs(d, exist_ok=True)
    if workers <= 1 or len(jobs) < 64:
        _render_chunk(jobs)
        return
    chunk = max(16, min(256, len(jobs) // (workers * 8)))
    pieces = [jobs[i : i + chunk] for i in range(0, len(jobs), chunk)]
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers) as pool:
        for _ in pool.imap_unordered(_render_chunk, pieces):
            pass


def read_synthetic_record(path: str | os.PathLike) -> dict | None:
    """The generator's record in ``path``: ``synthetic.json`` (``generator_version``, ``seed``,
    ``products_train``, ``products_val`` and the image counts, all integers, beside the rest it records) or,
    for a file named ``synthetic.writing``, the marker of a run writing there (``{"generator_version": 1}``
    for version 1's plain-text marker). None when there is no such file or the generator did not write it
    (another program's file, one that does not parse, or one lacking those keys)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    marker = path.name == WRITING_MARKER
    if marker and text.startswith(_V1_MARKER_START):  # version 1's marker: plain text, no settings
        return {"generator_version": 1}
    try:
        record = json.loads(text)
    except ValueError:
        return None
    keys = _MARKER_KEYS if marker else _RECORD_KEYS
    if not isinstance(record, dict) or any(k not in record for k in keys):
        return None
    integers = ("generator_version", *_COUNT_KEYS) if marker else _RECORD_KEYS
    return record if all(type(record[k]) is int for k in integers) else None


def _generator_record(root: Path) -> dict | None:
    """The record of the dataset ``make_synthetic`` wrote in ``root`` (``synthetic.json``) or was writing
    there (the marker of an interrupted run); None when neither is the generator's."""
    return read_synthetic_record(root / RECORD_FILE) or read_synthetic_record(root / WRITING_MARKER)


def _draw(settings: _Settings, root: Path, image_size: int) -> tuple:
    """Every random draw of a dataset (its rows, texts and image jobs, paths included), no image drawn."""
    rng = np.random.default_rng(settings.seed)
    fg_rows, fg_jobs = _fashiongen(rng, settings.products, settings.val_fraction, root, image_size)
    fiq_val_fraction = max(settings.val_fraction, 0.2)
    fiq = _fashioniq(rng, settings.fiq_images, fiq_val_fraction, settings.seed, root, image_size)
    return fg_rows, fg_jobs, *fiq


def _dataset_paths(root: Path, jobs: list[_Job]) -> set[str]:
    """The paths (relative to ``root``) of the files a dataset with these image jobs writes under
    ``FashionGen/`` and ``FashionIQ/``."""
    return {Path(job.path).relative_to(root).as_posix() for job in jobs} | _JSON_FILES


def _paths_digest(paths: Iterable[str]) -> str:
    """The sha256 of the sorted paths, one a line."""
    return hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()


def _recorded_paths(root: Path, record: dict | None) -> set[str] | None:
    """The paths (relative to ``root``) of the files the dataset of ``record`` writes under ``FashionGen/``
    and ``FashionIQ/``, rebuilt from its settings, less those its marker keeps; None when the record holds no
    settings this generator can rebuild (an older generator's) or the rebuilt paths do not hash to the
    recorded sha256 (a record edited by hand, or one of code that names the files otherwise)."""
    if record is None or record["generator_version"] != GENERATOR_VERSION:
        return None
    try:
        digest, kept = record[_DIGEST_KEY], set(record.get(_KEPT_KEY, []))
        settings = _Settings(**record["settings"])
        _check_arguments(settings.products, MIN_IMAGE_SIZE, settings.val_fraction, settings.fiq_images)
        _, fg_jobs, _, _, _, fiq_jobs = _draw(settings, root, MIN_IMAGE_SIZE)
    except (KeyError, TypeError, ValueError):
        return None
    paths = _dataset_paths(root, fg_jobs + fiq_jobs)
    return paths - kept if _paths_digest(paths) == digest else None


def _files_under(root: Path) -> list[str]:
    """The files anywhere under ``root``'s ``FashionGen/`` and ``FashionIQ/``, relative to ``root`` (POSIX
    separators)."""
    found = [p for folder in DATASET_FOLDERS for p in (root / folder).rglob("*") if p.is_file()]
    return sorted(p.relative_to(root).as_posix() for p in found)


def files_not_written_by_make_synthetic(root: str | os.PathLike) -> list[Path]:
    """The files under ``root``'s ``FashionGen/`` and ``FashionIQ/`` that the dataset recorded there does not
    write (a user's own images or notes, also under names the generator gives): a rewrite leaves them in
    place, and the dataset readers or ``famevil-fast caption DIR/FashionIQ/images`` may still find them.
    Every file there when ``root`` holds no dataset whose paths can be rebuilt (an older generator's)."""
    root = Path(root)
    written = _recorded_paths(root, _generator_record(root)) or set()
    return [root / f for f in _files_under(root) if f not in written]


def _write_marker(root: Path, record: dict) -> None:
    keys = [k for k in (*_MARKER_KEYS, _DIGEST_KEY, _KEPT_KEY) if k in record]
    atomic_write_json(root / WRITING_MARKER, {"note": _MARKER_NOTE, **{k: record[k] for k in keys}})


def _remove_files(root: Path, names: Iterable[str]) -> None:
    """Remove the files ``names`` (relative to ``root``), none in a folder whose real path is outside
    ``root``'s (reached through a link): those stay, and ``files_not_written_by_make_synthetic`` names
    them."""
    real, inside = root.resolve(), {}
    for name in names:
        path = root / name
        if path.parent not in inside:
            inside[path.parent] = path.parent.resolve().is_relative_to(real)
        if inside[path.parent] and not path.is_dir():
            path.unlink(missing_ok=True)


def _replace_earlier(root: Path, record: dict, keep: set[str], earlier: dict | None) -> None:
    """Leave the marker of the run of ``record`` (writing the paths ``keep``) in ``root``, removing the
    earlier ``synthetic.json`` and, when the paths of the earlier dataset (of the generator's record
    ``earlier``, read from ``root``) can be rebuilt, its files not in ``keep`` and its JSON files (written
    again anyway). Until they are removed the marker names the earlier dataset,
    so that a run interrupted meanwhile leaves them findable; then it names this run's and keeps the files
    found at its paths that are not the earlier dataset's, so that a later run does not remove those this
    run was stopped before drawing over."""
    old = _recorded_paths(root, earlier)
    found = sorted(p for p in keep - (old or set()) if os.path.lexists(root / p))
    record = {**record, _KEPT_KEY: found}
    _write_marker(root, record if old is None else earlier)
    (root / RECORD_FILE).unlink(missing_ok=True)
    if old is None:
        return
    _remove_files(root, sorted(old - keep | old & _JSON_FILES))
    _write_marker(root, record)


def dataset_json_files(root: str | os.PathLike) -> list[Path]:
    """The JSON files where a FashionGen or FashionIQ dataset under ``root`` keeps its records (the top
    levels of ``FashionGen/`` and ``FashionIQ/``, and FashionIQ's ``captions/`` and ``image_splits/``);
    image folders are not walked."""
    root = Path(root)
    return sorted(p for folder in DATASET_JSON_FOLDERS for p in (root / folder).glob("*.json") if p.is_file())


def _check_arguments(
    products: int, image_size: int, val_fraction: float, fiq_images: int | None = None
) -> None:
    if products < MIN_PRODUCTS:
        raise ValueError(f"make_synthetic: products must be >= {MIN_PRODUCTS}, got {products}")
    if products > MAX_PRODUCTS:
        raise ValueError(
            f"make_synthetic: products must be <= {MAX_PRODUCTS} (the products that look different), "
            f"got {products}"
        )
    if fiq_images is not None and fiq_images > MAX_FIQ_IMAGES:
        raise ValueError(
            f"make_synthetic: fiq_images must be <= {MAX_FIQ_IMAGES} (three times the {MAX_FIQ_IMAGES // 3} "
            f"shirts that look different), got {fiq_images}"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"make_synthetic: image_size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"make_synthetic: val_fraction must be in (0, 1), got {val_fraction}")


def check_synthetic_record(root: str | os.PathLike) -> dict | None:
    """The generator's record in ``root``: that of ``synthetic.json``, else that of the marker
    ``synthetic.writing`` (an interrupted run's), else None; each file is read once. ValueError naming either
    file when it is there and the generator did not write it (writing the synthetic dataset there would
    overwrite it)."""
    records = []
    for name in (RECORD_FILE, WRITING_MARKER):
        path = Path(root) / name
        record = read_synthetic_record(path)
        if record is None and os.path.lexists(path):
            raise ValueError(
                f"{path} was not written by make-synthetic: writing the synthetic dataset there would "
                "overwrite it; choose another directory"
            )
        records.append(record)
    return records[0] or records[1]


def _check_no_other_dataset(root: Path) -> None:
    """ValueError when ``root``, holding no record of the generator's, has dataset files (JSON) in its
    ``FashionGen/`` or ``FashionIQ/``: another dataset's, which writing the synthetic one would overwrite."""
    folders = {path.relative_to(root).parts[0] for path in dataset_json_files(root)}
    found = [f"{name}/" for name in DATASET_FOLDERS if name in folders]
    if found:
        raise ValueError(
            f"{root} already holds {' and '.join(found)} not written by make-synthetic (no synthetic.json): "
            "writing the synthetic dataset there would overwrite its files; choose another directory"
        )


def _check_folders(root: Path, paths: Iterable[str]) -> None:
    """ValueError naming the first folder the files ``paths`` go to (relative to ``root``) whose real path is
    outside ``root``'s: a link to another directory, whose files writing there would overwrite and a rewrite
    remove."""
    real = root.resolve()
    folders = {folder for p in paths for folder in Path(p).parents if folder.parts}
    for folder in sorted(folders, key=lambda f: (len(f.parts), f.as_posix())):
        target = (root / folder).resolve()
        if not target.is_relative_to(real):
            raise ValueError(
                f"{root / folder} is a link to {target}, outside {root}: the synthetic dataset is not "
                "written through it (its files there would be overwritten or removed); remove the link or "
                "choose another directory"
            )


def fiq_image_count(products: int, fiq_images: int | None = None) -> int:
    """The FashionIQ image count ``make_synthetic`` asks for: ``fiq_images``, raised to MIN_FIQ_IMAGES;
    when None, ``products`` raised to MIN_FIQ_IMAGES and lowered to MAX_FIQ_IMAGES."""
    if fiq_images is None:
        return min(MAX_FIQ_IMAGES, max(MIN_FIQ_IMAGES, products))
    return max(MIN_FIQ_IMAGES, fiq_images)


def make_synthetic(
    out_dir: str | os.PathLike,
    products: int = 1000,
    seed: int = 0,
    image_size: int = 256,
    fiq_images: int | None = None,
    val_fraction: float = 0.15,
    workers: int | None = None,
) -> SyntheticSummary:
    """Generate the synthetic FashionGen + FashionIQ dataset under ``out_dir``; deterministic for ``seed``.

    ``products`` FashionGen-style products (``val_fraction`` of them in val, at least one in each split) and
    about ``fiq_images`` FashionIQ-style images in families of variants (default: as many as products, at
    least 24 and at most MAX_FIQ_IMAGES; ``max(val_fraction, 0.2)`` of each category's families in val),
    drawn at ``image_size`` pixels (FashionIQ widths vary from 0.75x to 1x); every product looks different,
    so ``products`` above MAX_PRODUCTS and ``fiq_images`` above MAX_FIQ_IMAGES are refused (ValueError naming
    the limit), before anything is written. ``workers`` processes draw the images
    (default: all CPU cores). An earlier dataset of the generator's in ``out_dir`` is rewritten, and one whose
    writing was interrupted is completed. Refused before anything is written: an ``out_dir`` that is a file
    (NotADirectoryError), and (ValueError) a ``synthetic.json`` or ``synthetic.writing`` there that the
    generator did not write, dataset files (JSON) in its ``FashionGen/`` or ``FashionIQ/`` when it holds
    neither, and a folder of the dataset that is a link out of ``out_dir``.
    """
    _check_arguments(products, image_size, val_fraction, fiq_images)
    start = time.perf_counter()
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    earlier = check_synthetic_record(root)
    if earlier is None:
        _check_no_other_dataset(root)
    n_fiq = fiq_image_count(products, fiq_images)
    settings = _Settings(products, seed, val_fraction, n_fiq)
    fg_rows, fg_jobs, captions, splits, attributes, fiq_jobs = _draw(settings, root, image_size)
    paths = _dataset_paths(root, fg_jobs + fiq_jobs)
    _check_folders(root, paths)
    root.mkdir(parents=True, exist_ok=True)
    versioned = {"generator_version": GENERATOR_VERSION, "settings": asdict(settings)}
    versioned[_DIGEST_KEY] = _paths_digest(paths)
    counts = {"fashiongen_images": len(fg_jobs), "fashioniq_images": len(fiq_jobs)}
    _replace_earlier(root, {**versioned, **counts}, keep=paths, earlier=earlier)

    _render_all(fg_jobs + fiq_jobs, workers or os.cpu_count() or 1)

    for split, rows in fg_rows.items():
        atomic_write_json(root / "FashionGen" / f"{split}_info.json", rows)
    for (category, split), rows in captions.items():
        atomic_write_json(root / "FashionIQ" / "captions" / f"cap.{category}.{split}.json", rows)
    for (category, split), names in splits.items():
        atomic_write_json(root / "FashionIQ" / "image_splits" / f"split.{category}.{split}.json", names)
    atomic_write_json(root / "FashionIQ" / "synthetic_attributes.json", attributes)
    summary = SyntheticSummary(
        root=str(root),
        seed=seed,
        image_size=image_size,
        products_train=len(fg_rows["train"]),
        products_val=len(fg_rows["val"]),
        fashiongen_images=len(fg_jobs),
        fashioniq_images=len(fiq_jobs),
        triplets_train=sum(len(r) for (c, s), r in captions.items() if s == "train"),
        triplets_val=sum(sum(not x["fake_data"] for x in r) for (c, s), r in captions.items() if s == "val"),
        seconds=0.0,
    )
    record = {k: v for k, v in asdict(summary).items() if k not in ("root", "seconds", "left")}
    atomic_write_json(
        root / RECORD_FILE,
        {
            **versioned,
            **record,
            "subcategories": [f"{v} {g}" for g, v in SUBCATEGORIES],
            "categories": [g.name for g in GARMENTS],
            "attributes": list(ATTRIBUTE_VOCABULARY),
        },
    )
    (root / WRITING_MARKER).unlink(missing_ok=True)
    summary.left = [name for name in _files_under(root) if name not in paths]
    summary.seconds = round(time.perf_counter() - start, 3)
    return summary
