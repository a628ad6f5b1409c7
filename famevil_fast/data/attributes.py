"""Pseudo-attributes for the PAC objective: mining them from product texts, and the attribute file.

FashionViL's pseudo-attributes are noun phrases mined from the training texts. POS taggers and phrase
chunkers need model downloads, so this miner is rule- and lexicon-based and mines single words (a hyphenated
word such as "v-neck" is one), not phrases: "short sleeve" gives "short" and "sleeve", a coarser set of
classes than FashionViL's. Product copy is mostly noun phrases, and what remains after removing
closed-class words is overwhelmingly nouns and adjectives:

1. lower-case; words are runs of letters with inner hyphens or apostrophes ("v-neck", "t-shirt");
2. drop closed-class words (``FUNCTION_WORDS``: determiners, pronouns, prepositions, conjunctions,
   auxiliaries and modals, quantifiers and numerals, common adverbs), verb forms common in product copy
   (``VERBS``), adverbs in -ly (except ``LY_NOUNS_ADJECTIVES`` such as "jelly", "frilly", "italy") and
   words shorter than ``min_length``;
3. merge plurals into their singular when the singular occurs in the corpus ("sleeves" -> "sleeve",
   "dresses" -> "dress", "accessories" -> "accessory"), except ``PLURAL_NOUNS``, whose singular names
   something else ("shorts" is not "short", "glasses" not "glass");
4. keep the words found in at least ``min_count`` products (document frequency), most frequent first
   (ties alphabetical), at most ``max_attributes`` of them.

A product's attributes are the vocabulary ids of its words, sorted. ``famevil-fast mine-attributes``
writes the vocabulary and every product's ids to one JSON file (:func:`write_attribute_file`).

A dataset that carries its own attribute ids (FashionGen's ``attributes_id``, FashionViL's 2,232 mined
noun phrases) can be used instead: :func:`dataset_attributes`, ``data.attributes: dataset`` in a recipe.

Every dataset name of ``famevil_fast.data.tasks.ITC_DATASETS`` can be mined or read, the union
``fashionall`` included: its vocabulary is mined from the texts of all its training products (or, for
``attributes_id``, is the vocabulary the four files share), and its products are keyed by their union ids.
An attribute file records the dataset it was made from, and a table of another dataset refuses it
(:func:`check_attribute_dataset`): product ids of one dataset name other products in another.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from famevil_fast.data.registry import UNION
from famevil_fast.files import atomic_write_json

FORMAT = "famevil_fast.attributes"
VERSION = 1
_WORD = re.compile(r"[a-z]+(?:['\-][a-z]+)*")

FUNCTION_WORDS = frozenset(
    """
    a an the this that these those some any each every either neither no all both half several such own
    other another same much many more most less least few fewer enough
    i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
    one ones oneself itself themselves yourself myself ourselves himself herself who whom whose which what
    whatever whichever whoever where when why how there here
    about above across after against along amid among around as at before behind below beneath beside
    besides between beyond by despite down during except for from in inside into like near of off on onto
    opposite out outside over past per plus round since than through throughout till to toward towards
    under underneath unlike until up upon via with within without
    and or but nor so yet if then else because although though while whereas unless whether
    am is are was were be been being do does did done doing have has had having
    can could may might must shall should will would ought
    not only just also very too quite rather really almost even still already again ever never always
    often sometimes once twice together apart away back forth instead perhaps
    two three four five six seven eight nine ten first second third
    s t d ll m o re ve y
    """.split()
)
VERBS = frozenset(
    """
    featuring features feature's made make makes designed crafted finished offers offering includes including
    comes come fits sits falls runs measures measured shown worn wearing pairs goes keep keeps allows
    """.split()
)
LY_NOUNS_ADJECTIVES = frozenset(
    """
    jelly belly frilly curly woolly wooly holly lily ply fly silly italy butterfly poly assembly family
    ugly sparkly crinkly bubbly wrinkly
    """.split()
)
PLURAL_NOUNS = frozenset(
    """
    shorts pants trousers jeans leggings tights glasses sunglasses clothes briefs trunks boxers overalls
    sweatpants joggers chinos slacks knickers pajamas pyjamas suspenders braces goggles flats pumps
    """.split()
)


def words(text: str, min_length: int = 2) -> list[str]:
    """The candidate words of one text, in order (steps 1-2 of the module docstring)."""
    out = []
    for w in _WORD.findall(text.lower()):
        if len(w) < min_length or w in FUNCTION_WORDS or w in VERBS:
            continue
        if w.endswith("ly") and w not in LY_NOUNS_ADJECTIVES:
            continue
        out.append(w)
    return out


def singular_forms(word: str) -> list[str]:
    """Possible singulars of ``word``, most specific rule first (empty for words not ending in s and for
    ``PLURAL_NOUNS``)."""
    if not word.endswith("s") or word.endswith("ss") or word in PLURAL_NOUNS:
        return []
    forms = []
    if word.endswith("ies") and len(word) > 4:
        forms.append(word[:-3] + "y")
    if word.endswith("es") and len(word) > 3:
        forms.append(word[:-2])
    forms.append(word[:-1])
    return forms


def _canonical(word: str, known: Mapping[str, object] | frozenset[str] | set[str]) -> str:
    return next((s for s in singular_forms(word) if s in known), word)


@dataclass(frozen=True)
class AttributeVocabulary:
    """Mined attributes (most frequent first) and their document frequencies in the mined corpus."""

    attributes: tuple[str, ...]
    counts: tuple[int, ...]
    min_count: int = 1
    min_length: int = 2
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {a: i for i, a in enumerate(self.attributes)})
        if len(self.index) != len(self.attributes):
            raise ValueError("attribute vocabulary has repeated entries")
        if len(self.counts) != len(self.attributes):
            raise ValueError(f"{len(self.attributes)} attributes but {len(self.counts)} counts")

    def __len__(self) -> int:
        return len(self.attributes)

    def encode(self, text: str) -> tuple[int, ...]:
        """Sorted ids of the attributes ``text`` mentions (plurals map to their singular entry)."""
        ids = {
            self.index.get(w, self.index.get(_canonical(w, self.index), -1))
            for w in words(text, self.min_length)
        }
        return tuple(sorted(i for i in ids if i >= 0))


def mine_attributes(
    texts: Iterable[str], min_count: int = 5, max_attributes: int | None = None, min_length: int = 2
) -> AttributeVocabulary:
    """Frequent nouns and adjectives of ``texts`` (see the module docstring)."""
    if min_count < 1:
        raise ValueError(f"min_count must be at least 1, got {min_count}")
    if max_attributes is not None and max_attributes < 1:
        raise ValueError(f"max_attributes must be at least 1 (or None), got {max_attributes}")
    documents = [set(words(t, min_length)) for t in texts]
    seen = set().union(*documents) if documents else set()
    frequency: Counter[str] = Counter()
    for doc in documents:
        frequency.update({_canonical(w, seen) for w in doc})
    ranked = sorted((w for w, c in frequency.items() if c >= min_count), key=lambda w: (-frequency[w], w))
    if max_attributes is not None:
        ranked = ranked[:max_attributes]
    return AttributeVocabulary(tuple(ranked), tuple(frequency[w] for w in ranked), min_count, min_length)


# ------------------------------------------------------------------------------------------ attribute file


@dataclass(frozen=True)
class AttributeFile:
    """A vocabulary and, per split, each product's attribute ids (product id -> sorted ids)."""

    vocabulary: AttributeVocabulary
    products: dict[str, dict[int, tuple[int, ...]]]
    source: str = ""
    dataset: str = ""  # the dataset whose product ids key ``products`` ("" = not recorded)

    def split(self, name: str) -> dict[int, tuple[int, ...]]:
        if name not in self.products:
            raise ValueError(
                f"attribute file {self.source or ''} has no split {name!r}; it has {sorted(self.products)}"
            )
        return self.products[name]


def check_attribute_dataset(attributes: AttributeFile, dataset: str) -> None:
    """ValueError when ``attributes`` are keyed by the product ids of another dataset than ``dataset`` (a
    file that records no dataset is not checked). A ``fashionall`` file serves FashionGen too: FashionGen
    products keep their ids in the union."""
    made = attributes.dataset
    if not made or made == dataset or (made == UNION and dataset == "fashiongen"):
        return
    raise ValueError(
        f"attribute file {attributes.source} holds the attributes of {made} products, but the table reads "
        f"{dataset}: product ids of one dataset name other products in another. Mine them for {dataset} "
        f"(`famevil-fast mine-attributes ROOT --dataset {dataset}`), or use data.attributes null / dataset"
    )


def encode_products(vocabulary: AttributeVocabulary, products: Sequence) -> dict[int, tuple[int, ...]]:
    """Product id -> attribute ids, for records with ``id`` and ``text``."""
    return {int(p.id): vocabulary.encode(p.text) for p in products}


def write_attribute_file(
    path: str | os.PathLike,
    vocabulary: AttributeVocabulary,
    products: Mapping[str, Mapping[int, Sequence[int]]],
    dataset: str = "",
) -> Path:
    """Write the vocabulary and every split's product attribute ids as JSON (atomically)."""
    data = {
        "format": FORMAT,
        "version": VERSION,
        "dataset": dataset,
        "min_count": vocabulary.min_count,
        "min_length": vocabulary.min_length,
        "attributes": list(vocabulary.attributes),
        "counts": list(vocabulary.counts),
        "products": {s: {str(k): list(v) for k, v in rows.items()} for s, rows in products.items()},
    }
    path = Path(path)
    atomic_write_json(path, data)
    return path


def read_attribute_file(path: str | os.PathLike) -> AttributeFile:
    """Read a file of :func:`write_attribute_file`; errors name the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"attribute file not found: {path} (write one with `famevil-fast mine-attributes`)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"attribute file {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an attribute file (expected format {FORMAT!r})")
    missing = [k for k in ("attributes", "counts", "products") if k not in data]
    if missing:
        raise ValueError(f"attribute file {path} lacks {missing}")
    names, counts = data["attributes"], data["counts"]
    if not isinstance(names, list) or not all(isinstance(a, str) for a in names):
        raise ValueError(f"attribute file {path}: 'attributes' must be a list of strings")
    if not isinstance(counts, list) or not all(_is_int(c) for c in counts):
        raise ValueError(f"attribute file {path}: 'counts' must be a list of integers")
    try:
        vocab = AttributeVocabulary(
            tuple(names), tuple(counts), data.get("min_count", 1), data.get("min_length", 2)
        )
    except ValueError as exc:
        raise ValueError(f"attribute file {path}: {exc}") from exc
    if not isinstance(data["products"], dict):
        raise ValueError(f"attribute file {path}: 'products' must map split -> product id -> attribute ids")
    products: dict[str, dict[int, tuple[int, ...]]] = {}
    for split, rows in data["products"].items():
        products[split] = _product_rows(path, split, rows)
        bad = [k for k, v in products[split].items() if any(not 0 <= i < len(vocab) for i in v)]
        if bad:
            raise ValueError(
                f"attribute file {path}: product {bad[0]} ({split}) has ids outside [0, {len(vocab)})"
            )
    return AttributeFile(vocab, products, str(path), str(data.get("dataset") or ""))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _product_rows(path: Path, split: str, rows: object) -> dict[int, tuple[int, ...]]:
    """One split of an attribute file: product id (a decimal string) -> list of integer attribute ids."""
    if not isinstance(rows, dict):
        raise ValueError(f"attribute file {path}: split {split!r} must map product id -> attribute ids")
    out: dict[int, tuple[int, ...]] = {}
    for key, ids in rows.items():
        try:
            product = int(key)
        except ValueError:
            message = f"attribute file {path}: product id {key!r} ({split}) is not an integer"
            raise ValueError(message) from None
        if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
            raise ValueError(
                f"attribute file {path}: product {key} ({split}) must list integer attribute ids, got {ids!r}"
            )
        out[product] = tuple(ids)
    return out


def mine_dataset(
    root: str | os.PathLike,
    dataset: str = "fashiongen",
    min_count: int = 5,
    max_attributes: int | None = None,
    splits: Sequence[str] = ("train", "val"),
) -> AttributeFile:
    """Mine the training texts of ``dataset`` under ``root``; encode the products of every split. ValueError
    when no word reaches ``min_count`` products (PAC would have no class)."""
    from famevil_fast.data.tasks import read_products

    train = read_products(dataset, root, "train")
    vocab = mine_attributes((p.text for p in train), min_count, max_attributes)
    if not vocab.attributes:
        raise ValueError(
            f"no attribute mined from the {len(train)} {dataset} training texts under {root}: no word is "
            f"found in at least min_count={min_count} products; lower it (data.attribute_min_count, "
            "--min-count)"
        )
    products = {"train": encode_products(vocab, train)}
    for split in splits:
        if split == "train":
            continue
        try:
            products[split] = encode_products(vocab, read_products(dataset, root, split, allow_empty=True))
        except FileNotFoundError:
            continue
    return AttributeFile(vocab, products, f"{root} ({dataset}, mined)", dataset)


DATASET_ATTRIBUTES = "dataset"  # ``load_attributes(path=...)``: the products' own ``attributes_id``
MAX_DATASET_ATTRIBUTES = 1 << 20  # classes of a dataset's own ids (FashionViL's vocabulary has 2,232)


def dataset_attributes(
    root: str | os.PathLike, dataset: str = "fashiongen", splits: Sequence[str] = ("train", "val")
) -> AttributeFile:
    """The attribute ids the products of ``dataset`` carry (``attributes_id``) as an attribute file: the
    classes are 0 .. the largest id (named by their ids), counted over the training split. ValueError when
    no training product carries any, or when an id is ``MAX_DATASET_ATTRIBUTES`` or more (a classifier of
    that many classes is not an attribute vocabulary; the error names the product)."""
    from famevil_fast.data.tasks import read_products

    products: dict[str, dict[int, tuple[int, ...]]] = {}
    for split in splits:
        try:
            rows = read_products(dataset, root, split, allow_empty=split != "train")
        except FileNotFoundError:
            continue
        products[split] = {int(p.id): tuple(sorted(set(p.attributes_id))) for p in rows}
    counts = Counter(i for ids in products.get("train", {}).values() for i in ids)
    if not counts:
        raise ValueError(
            f"no {dataset} training product under {root} carries attributes_id: mine attributes from the "
            "texts instead (data.attributes: null, or famevil-fast mine-attributes)"
        )
    size = 1 + max(i for split in products.values() for row in split.values() for i in row)
    if size > MAX_DATASET_ATTRIBUTES:
        largest = size - 1
        split, pid = next((s, p) for s, rows in products.items() for p, ids in rows.items() if largest in ids)
        raise ValueError(
            f"{dataset} {split} product {pid} under {root} has attribute id {largest}: the classes of a "
            "dataset's own attributes_id run from 0 to its largest id, and ids from "
            f"{MAX_DATASET_ATTRIBUTES:,} on are not a vocabulary (FashionViL's has 2,232 entries); renumber "
            "the ids from 0"
        )
    names = tuple(f"attribute_{i}" for i in range(size))
    vocabulary = AttributeVocabulary(names, tuple(counts.get(i, 0) for i in range(size)))
    return AttributeFile(vocabulary, products, f"{root} ({dataset}, attributes_id)", dataset)


def load_attributes(
    root: str | os.PathLike,
    path: str | os.PathLike | None = None,
    dataset: str = "fashiongen",
    min_count: int = 5,
) -> AttributeFile:
    """The attribute file at ``path``; ``path`` None: the attributes mined from the training texts;
    ``path`` "dataset": the products' own ``attributes_id``. ValueError when the source gives no attribute."""
    if path is None:
        return mine_dataset(root, dataset, min_count)
    if os.fspath(path) == DATASET_ATTRIBUTES:
        return dataset_attributes(root, dataset)
    attributes = read_attribute_file(path)
    if not attributes.vocabulary.attributes:
        raise ValueError(f"attribute file {path} holds no attribute: PAC needs at least one (mine it again)")
    return attributes
