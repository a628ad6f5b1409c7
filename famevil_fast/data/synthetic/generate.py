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

``DIR/synthetic.writing`` is written before anything else and removed once ``synthetic.json`` (written last)
is in place: a directory holding it is an interrupted run's, which a new run completes. A run that rewrites
an earlier dataset removes that one's ``synthetic.json`` first, so that a half-rewritten directory is never
taken for a complete dataset, and then every file of the earlier one that it does not write again (images of
other products, views or names), so that the directory ends up holding what a fresh one would. Only files
whose names the generator writes are removed, and only in a directory holding ``synthetic.json`` or
``synthetic.writing``; any other file is left in place (``files_not_written_by_make_synthetic`` names them).

All randomness is drawn in one process from ``numpy.random.default_rng(seed)`` before any image is drawn,
so the output is identical for a seed whatever the number of worker processes.

FashionIQ-style images come in families: a base product and variants that change one or two attributes.
Triplets pair members of a family, so the target shares every unnamed attribute with the reference; the
validation gallery holds every family member, so neither the caption alone (many gallery items match it)
nor the reference alone (its siblings and itself are in the gallery) finds the target.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
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
GENERATOR_VERSION = 1
RECORD_FILE = "synthetic.json"
WRITING_MARKER = "synthetic.writing"
# where the dataset's JSON files lie (relative to DIR), as ``make_synthetic`` lays them out
DATASET_JSON_FOLDERS = ("FashionGen", "FashionIQ", "FashionIQ/captions", "FashionIQ/image_splits")
DATASET_FOLDERS = ("FashionGen", "FashionIQ")
MIN_PRODUCTS = 2
MIN_IMAGE_SIZE = 32
_CATEGORY = "|".join(FIQ_CATEGORIES)
# the paths (relative to DIR) of every file ``make_synthetic`` writes, the temporary files of its atomic JSON
# writes included
_WRITTEN = re.compile(
    r"FashionGen/(train|val)/\d+_\d+\.png|FashionGen/(train|val)_info\.json"
    r"|FashionIQ/images/B\d{9}\.jpg|FashionIQ/synthetic_attributes\.json"
    rf"|FashionIQ/captions/cap\.({_CATEGORY})\.(train|val)\.json"
    rf"|FashionIQ/image_splits/split\.({_CATEGORY})\.(train|val)\.json"
    rf"|{re.escape(RECORD_FILE)}|{re.escape(WRITING_MARKER)}"
    r"|((FashionGen|FashionIQ(/captions|/image_splits)?)/)?\.[^/]+\.json\.[^/]+\.tmp"
)


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


def _unique_product(rng: np.random.Generator, seen: set, garment: str | None = None) -> ProductSpec:
    spec = sample_product(rng, garment)
    for _ in range(30):
        if spec.visual_key() not in seen:
            break
        spec = sample_product(rng, garment)
    seen.add(spec.visual_key())
    return spec


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


def _fashiongen(rng: np.random.Generator, n: int, val_fraction: float, root: Path, size: int):
    seen: set = set()
    n_val = min(n - 1, max(1, round(n * val_fraction)))  # at least one product in each split (n >= 2)
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


def _family(rng: np.random.Generator, category: str, size: int, seen: set) -> list[ProductSpec]:
    """A base product and variants that apply subsets of the same few moves (a small attribute lattice).

    Every change a caption can name is then shared by another member that differs elsewhere (the caption
    alone is ambiguous) and every member has siblings that keep its other attributes (the reference alone
    is ambiguous).
    """
    garments = FIQ_GARMENTS[category]
    base = _unique_product(rng, seen, garments[int(rng.integers(len(garments)))])
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
    seen: set = set()
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


def written_by_make_synthetic(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds a dataset that ``make_synthetic`` wrote, complete (``synthetic.json``) or
    interrupted (``synthetic.writing``)."""
    root = Path(root)
    return (root / RECORD_FILE).is_file() or (root / WRITING_MARKER).is_file()


def _files_under(root: Path) -> list[str]:
    """The files at the top of ``root`` and anywhere under its ``FashionGen/`` and ``FashionIQ/``, relative
    to ``root`` (POSIX separators)."""
    found = [p for p in root.glob("*") if p.is_file()]
    found += [p for folder in DATASET_FOLDERS for p in (root / folder).rglob("*") if p.is_file()]
    return sorted(p.relative_to(root).as_posix() for p in found)


def files_not_written_by_make_synthetic(root: str | os.PathLike) -> list[Path]:
    """The files under ``root``'s ``FashionGen/`` and ``FashionIQ/`` whose names ``make_synthetic`` does not
    write (a user's own images or notes there): a rewrite leaves them in place, and the dataset readers or
    ``famevil-fast caption DIR/FashionIQ/images`` may still find them."""
    root = Path(root)
    return [root / f for f in _files_under(root) if "/" in f and not _WRITTEN.fullmatch(f)]


def _remove_earlier_files(root: Path, keep: set[str]) -> None:
    """Remove the files of an earlier synthetic dataset in ``root`` that are not in ``keep`` (paths relative
    to ``root``): only files whose names the generator writes."""
    for name in _files_under(root):
        if name not in keep and _WRITTEN.fullmatch(name):
            (root / name).unlink(missing_ok=True)


def dataset_json_files(root: str | os.PathLike) -> list[Path]:
    """The JSON files where a FashionGen or FashionIQ dataset under ``root`` keeps its records (the top
    levels of ``FashionGen/`` and ``FashionIQ/``, and FashionIQ's ``captions/`` and ``image_splits/``);
    image folders are not walked."""
    root = Path(root)
    return sorted(p for folder in DATASET_JSON_FOLDERS for p in (root / folder).glob("*.json") if p.is_file())


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

    ``products`` FashionGen-style products (``val_fraction`` of them in val) and about ``fiq_images``
    FashionIQ-style images in families of variants (default: as many as products, at least 24), drawn at
    ``image_size`` pixels (FashionIQ widths vary from 0.75x to 1x). ``workers`` processes draw the images
    (default: all CPU cores).
    """
    if products < MIN_PRODUCTS:
        raise ValueError(f"make_synthetic: products must be >= {MIN_PRODUCTS}, got {products}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"make_synthetic: image_size must be >= {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"make_synthetic: val_fraction must be in (0, 1), got {val_fraction}")
    start = time.perf_counter()
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    rewrite = written_by_make_synthetic(root)  # decided before this run leaves its own marker
    (root / WRITING_MARKER).write_text(
        "make-synthetic is writing a synthetic dataset here; if this file remains, the run was interrupted: "
        "run make-synthetic again to complete it\n"
    )
    (root / RECORD_FILE).unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    fg_rows, fg_jobs = _fashiongen(rng, products, val_fraction, root, image_size)
    n_fiq = max(24, products if fiq_images is None else fiq_images)
    captions, splits, attributes, fiq_jobs = _fashioniq(
        rng, n_fiq, max(val_fraction, 0.2), seed, root, image_size
    )
    if rewrite:
        drawn = {Path(job.path).relative_to(root).as_posix() for job in fg_jobs + fiq_jobs}
        _remove_earlier_files(root, keep=drawn | {WRITING_MARKER})

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
    record = {k: v for k, v in asdict(summary).items() if k not in ("root", "seconds")}
    atomic_write_json(
        root / RECORD_FILE,
        {
            "generator_version": GENERATOR_VERSION,
            **record,
            "subcategories": [f"{v} {g}" for g, v in SUBCATEGORIES],
            "categories": [g.name for g in GARMENTS],
            "attributes": list(ATTRIBUTE_VOCABULARY),
        },
    )
    (root / WRITING_MARKER).unlink(missing_ok=True)
    summary.seconds = round(time.perf_counter() - start, 3)
    return summary
