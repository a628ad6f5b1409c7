"""The records every reader produces: products (FashionGen, Fashion200k, PolyvoreOutfits, BigFACAD) and
triplets (FashionIQ), and the reading of split files into them: JSON lists, row checks whose errors name the
file, entry and field, one parse per unchanged file within a :func:`shared_reads` scope, the catalogue
datasets' common format.

Image paths in records are relative to the data root the reader was given, so the same record resolves to
a file on disk or to an entry of a pre-decoded cache built from that root; a split file's own paths (relative
to its dataset's image folder, Windows separators, absolute paths) become such paths as
:mod:`famevil_fast.data.image_paths` says. A product that lists one image twice among its views keeps it
once (:class:`ViewPaths`, one :class:`DuplicateViewsWarning` per file).
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from famevil_fast.data.image_paths import image_paths


@dataclass(frozen=True)
class Product:
    """One catalogue product: its views and the text the tasks use (FashionGen: title + "." + description).

    ``dataset`` names the reader that produced it ("fashiongen", "fashion200k", "polyvoreoutfits",
    "bigfacad"); in the ``fashionall`` union ``id`` is the union id (``famevil_fast.data.fashionall``)."""

    id: int
    images: tuple[str, ...]
    text: str
    category_id: int = -1
    subcategory_id: int = -1
    attributes_id: tuple[int, ...] = ()
    dataset: str = ""


@dataclass(frozen=True)
class Triplet:
    """One FashionIQ row: reference image, target image, two modification captions.

    ``target_id`` is the gallery id of the target (val: from the file; train: position of the target name
    in the sorted image names of the split). ``fake_data`` rows only add their target to the gallery.
    """

    candidate: str
    target: str
    captions: tuple[str, str]
    category: int
    target_id: int
    fake_data: bool = False

    @property
    def text(self) -> str:
        return ", ".join(self.captions)


def load_json_list(path: Path, what: str, hint: str = "") -> list:
    """The JSON list in ``path``; FileNotFoundError (followed by ``hint``, where such files come from, when
    given) / ValueError naming the file otherwise."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: file not found: {path}" + (f" ({hint})" if hint else ""))
    try:
        with open(path, encoding="utf-8-sig") as f:  # (a byte-order mark, as Windows tools write, is skipped)
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {path} is not UTF-8 text ({e}); save it as UTF-8 JSON") from e
    if not isinstance(data, list):
        raise ValueError(f"{what}: {path} must hold a JSON list, got {type(data).__name__}")
    return data


_READS: OrderedDict[tuple, tuple[Product, ...]] = OrderedDict()
_READS_LOCK = threading.Lock()
_READS_KEPT = 8  # split files remembered (the four union datasets' train splits and FashionGen's val fit)
_SETTLED_NS = 2_000_000_000  # a file changed this recently may change again within one timestamp tick
_SCOPES = 0  # open shared_reads() scopes


def _reset_after_fork() -> None:
    """A process forked inside a scope (DataLoader workers, say) starts with no scope and nothing kept."""
    global _SCOPES, _READS_LOCK
    _SCOPES, _READS_LOCK = 0, threading.Lock()
    _READS.clear()


os.register_at_fork(after_in_child=_reset_after_fork)


@contextmanager
def shared_reads() -> Iterator[None]:
    """A scope within which each unchanged split file is parsed once (:func:`read_once`): the builders of
    several tables from the same files (itc and the pre-training objectives, PAC's attributes, a cache's
    image list and texts) enter it. Scopes nest; when the outermost one ends, the products kept are
    dropped. Outside any scope every read parses its file and nothing is kept."""
    global _SCOPES
    with _READS_LOCK:
        _SCOPES += 1
    try:
        yield
    finally:
        with _READS_LOCK:
            _SCOPES -= 1
            if not _SCOPES:
                _READS.clear()


def read_once(path: Path, key: tuple, read: Callable[[], list[Product]]) -> list[Product]:
    """``read()`` (the products of split file ``path``); within :func:`shared_reads`, a copy of what it
    returned for the same ``key`` while ``path`` is unchanged (same size, modification and change times,
    inode), so a run that builds several tables parses each split file once. A file modified in the last
    two seconds is not remembered, since a change within one timestamp tick would not show."""
    if not _SCOPES:
        return read()
    try:
        st = path.stat()
    except OSError:
        return read()
    full = (os.fspath(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, key)
    with _READS_LOCK:
        if full in _READS:
            _READS.move_to_end(full)
            return list(_READS[full])
    products = read()
    if time.time_ns() - st.st_mtime_ns > _SETTLED_NS:
        with _READS_LOCK:
            if _SCOPES:
                _READS[full] = tuple(products)
                while len(_READS) > _READS_KEPT:
                    _READS.popitem(last=False)
    return products


def entry_name(path: Path, index: int, row: object = None) -> str:
    """``"<path>: entry <index>"``, with the row's id when it has a printable one (for error messages)."""
    name = f"{path}: entry {index}"
    if isinstance(row, dict) and isinstance(row.get("id"), (int, str)):
        name += f" (id {row['id']!r})"
    return name


def require_keys(row: object, keys: tuple[str, ...], path: Path, index: int, hint: str = "") -> dict:
    """``row`` as a dict holding ``keys``; ValueError naming the file, entry and missing keys otherwise
    (followed by ``hint``, what the row should hold, when given)."""
    after = f" ({hint})" if hint else ""
    if not isinstance(row, dict):
        raise ValueError(f"{path}: entry {index} is {json_repr(row)}, expected an object{after}")
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{entry_name(path, index, row)} lacks {missing}{after}")
    return row


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# field kinds of ``check_types``: what a JSON value must be
INT, STR, BOOL = "an integer", "a string", "true or false"
STRS, IDS, STR_OR_STRS = "a list of strings", "a list of integers from 0", "a string or a list of strings"
_CHECKS = {
    INT: _is_int,
    STR: lambda v: isinstance(v, str),
    BOOL: lambda v: isinstance(v, bool),
    STRS: _is_str_list,
    IDS: lambda v: isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v),
    STR_OR_STRS: lambda v: isinstance(v, str) or _is_str_list(v),
}


def check_types(row: dict, kinds: dict[str, str], path: Path, index: int) -> dict:
    """``row`` after checking that every field of ``kinds`` it holds is of its kind (``INT``, ``STR``,
    ``BOOL``, ``STRS``, ``IDS``, ``STR_OR_STRS``; a bool is not an integer, a number not a string; integers
    fit in 64 bits; ids, which index a vocabulary and share -1 with the padding, are not negative);
    ValueError naming the file, the entry and the field otherwise."""
    for key, kind in kinds.items():
        if key not in row:
            continue
        v = row[key]
        if kind is INT:
            if type(v) is int and _LOW <= v < _HIGH:
                continue
        elif kind is STR:
            if type(v) is str:
                continue
        elif type(v) is list and (kind is STRS or kind is STR_OR_STRS):
            if set(map(type, v)) <= _STR_TYPE:
                continue
        elif type(v) is list and kind is IDS:
            if set(map(type, v)) <= _INT_TYPE and (not v or (0 <= min(v) and max(v) < _HIGH)):
                continue
        elif type(v) is str and kind is STR_OR_STRS:
            continue
        return _check_types(row, kinds, path, index)  # a value not plainly of its kind: the full check
    return row


_LOW, _HIGH = -(1 << 63), 1 << 63
_STR_TYPE, _INT_TYPE = {str}, {int}


def _check_types(row: dict, kinds: dict[str, str], path: Path, index: int) -> dict:
    for key, kind in kinds.items():
        if key in row and not _CHECKS[kind](row[key]):
            raise ValueError(
                f"{entry_name(path, index, row)}: field {key!r} must be {kind}, got {json_repr(row[key])}"
            )
        values = row.get(key, []) if kind == IDS else [row[key]] if kind == INT and key in row else []
        wide = [v for v in values if not _LOW <= v < _HIGH]
        if wide:
            raise ValueError(
                f"{entry_name(path, index, row)}: field {key!r} holds {wide[0]}, outside the 64-bit integer "
                "range the tensors keep"
            )
    return row


def json_repr(value: object, limit: int = 60) -> str:
    """``value`` as JSON text (shortened), for error messages."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def reject_duplicate_ids(ids: list[int], path: Path) -> None:
    """ValueError naming the file and the first two entries that share a product id."""
    first: dict[int, int] = {}
    for i, pid in enumerate(ids):
        if pid in first:
            raise ValueError(f"{path}: entries {first[pid]} and {i} have the same product id {pid}")
        first[pid] = i


def dataset_dir(root: str | os.PathLike, name: str, marker: str) -> Path:
    """``root/name`` if it exists, else ``root`` if it holds ``marker``; FileNotFoundError otherwise, and
    when ``root`` is another dataset's directory (named after it) holding ``marker``."""
    from famevil_fast.data.registry import DIRECTORIES

    base = Path(root)
    if (base / name).is_dir():
        return base / name
    own = base.resolve().name
    if own != name and own in (*DIRECTORIES.values(), "FashionIQ") and (base / marker).exists():
        raise FileNotFoundError(
            f"{name}: {base} is the {own} directory, not {name}'s, so its {marker} is not read as {name}'s; "
            f"give the data root that holds {name}/ (or read {base} as {own})"
        )
    if (base / marker).exists():
        return base
    hint = ""
    if base.is_dir():
        near = sorted(p.name for p in base.iterdir() if p.is_dir() and p.name.lower() == name.lower())
        if near:
            hint = f"; found {base / near[0]}: the directory must be named {name} (names are case-sensitive)"
    else:
        hint = "; that directory does not exist"
    raise FileNotFoundError(
        f"{name}: no dataset under {base} (looked for {base / name} and {base / marker}){hint}. A data root "
        "holds FashionGen/, FashionIQ/, Fashion200k/, PolyvoreOutfits/ and/or BigFACAD/ as FashionViL lays "
        "them out (docs/data.md)"
    )


class _Entry:
    """The name of a row for messages (:func:`entry_name`), built only when a message needs it."""

    __slots__ = ("path", "index", "row")

    def __init__(self, path: Path, index: int, row: object) -> None:
        self.path, self.index, self.row = path, index, row

    def __str__(self) -> str:
        return entry_name(self.path, self.index, self.row)


class DuplicateViewsWarning(UserWarning):
    """A split file lists the same image more than once among a product's views; each product kept it once."""


class ViewPaths:
    """The views of one split file's rows relative to the data root (:func:`row_images`,
    :func:`image_paths`), each image kept once per product in the order first listed: a repeated view would
    let the multi-view objectives (MVC's second view, the XMR image side) pair a view with itself. The
    repeats of a file are counted and :meth:`warn` reports them in one :class:`DuplicateViewsWarning`."""

    def __init__(self, path: Path, root: str | os.PathLike, prefix: str, folder: str) -> None:
        self.path, self.root, self.prefix, self.folder = path, root, prefix, folder
        self.products = 0  # products that listed a view twice
        self.dropped = 0  # views dropped
        self.example = ""
        self._where = _Entry(path, -1, None)  # the row being read, named only when a message needs it

    def __call__(self, row: dict, index: int) -> tuple[str, ...]:
        where = self._where
        where.index, where.row = index, row
        views = image_paths(row_images(row, self.path, index), self.prefix, self.folder, self.root, where)
        unique = views if len(views) < 2 else tuple(dict.fromkeys(views))
        if len(unique) < len(views):
            if not self.products:
                repeated = next(v for i, v in enumerate(views) if v in views[:i])
                self.example = f"{where} lists {repeated} {views.count(repeated)} times"
            self.products += 1
            self.dropped += len(views) - len(unique)
        return unique

    def warn(self) -> None:
        """One DuplicateViewsWarning when some product listed an image twice (none otherwise)."""
        if self.products:
            warnings.warn(
                f"{self.path}: {self.products} product(s) list the same image more than once among their "
                f"views (e.g. {self.example}); each image is kept once per product ({self.dropped} repeated "
                "view(s) dropped), so no view is paired with itself as another view of its product",
                DuplicateViewsWarning,
                stacklevel=2,
            )


def row_images(row: dict, path: Path, index: int) -> list[str]:
    """The image paths of a type-checked row (``images``: one path or a list of paths); ValueError naming
    the file and entry when it holds none or an empty path (every product reader shares this check)."""
    images = [row["images"]] if isinstance(row["images"], str) else row["images"]
    if not images or not all(images):
        what = "an empty list" if not images else "an empty path"
        raise ValueError(f"{entry_name(path, index, row)} has no image path (images holds {what})")
    return images


def relative_prefix(root: str | os.PathLike, directory: Path) -> str:
    rel = os.path.relpath(directory, root)
    return "" if rel == "." else rel.replace(os.sep, "/") + "/"


@dataclass(frozen=True)
class CatalogueFormat:
    """How one catalogue dataset's ``{split}_info.json`` rows become products (Fashion200k,
    PolyvoreOutfits, BigFACAD): the directory and split files, the keys a row must hold and their kinds, the
    text built from a row, and the folder its image paths are relative to (:func:`image_paths`)."""

    name: str  # directory under the data root, e.g. "BigFACAD"
    dataset: str  # the products' ``dataset``, e.g. "bigfacad"
    splits: tuple[str, ...]
    keys: tuple[str, ...]
    kinds: dict
    text: Callable[[dict], str]
    row_format: str  # what a row holds, for the error of a row that lacks a key
    image_folder: str = "images"
    aliases: Mapping[str, str] = field(default_factory=dict)  # a split read from another's file

    def split_name(self, split: str) -> str:
        """The split file ``split`` reads (``aliases`` applied); ValueError when there is none."""
        name = self.aliases.get(split, split)
        if name not in self.splits:
            choices = (*self.splits, *self.aliases)
            raise ValueError(f"{self.name}: split must be one of {choices}, got {split!r}")
        return name

    def split_file(self, root: str | os.PathLike, split: str) -> tuple[Path, Path]:
        """(dataset directory, split file) of ``split`` under ``root`` (or ``root/<name>``)."""
        split = self.split_name(split)
        directory = dataset_dir(root, self.name, f"{split}_info.json")
        return directory, directory / f"{split}_info.json"

    def read(self, root: str | os.PathLike, split: str) -> list[Product]:
        """Products of ``split``; ValueError naming the file, entry and field for a row that lacks a key,
        holds a value of the wrong type, has no image, an absolute image path outside the data root, or
        repeats a product id. Backslashes in image paths are read as "/"; a view listed twice is kept once
        (:class:`ViewPaths`, one :class:`DuplicateViewsWarning` per file)."""
        directory, path = self.split_file(root, split)
        prefix = relative_prefix(root, directory)
        key = (self.dataset, prefix, os.path.abspath(root))
        views = ViewPaths(path, root, prefix, self.image_folder)
        return read_once(path, key, lambda: self._read(path, views))

    def _read(self, path: Path, views: ViewPaths) -> list[Product]:
        files = f"{self.name}/{{{','.join(self.splits)}}}_info.json"
        rows = load_json_list(path, self.name, f"{files} are FashionViL's pre-processed files (its README)")
        products = [self._product(row, path, i, views) for i, row in enumerate(rows)]
        reject_duplicate_ids([p.id for p in products], path)
        views.warn()
        return products

    def _product(self, row: object, path: Path, i: int, views: ViewPaths) -> Product:
        row = check_types(require_keys(row, self.keys, path, i, self.row_format), self.kinds, path, i)
        return Product(
            id=row["id"],
            images=views(row, i),
            text=self.text(row),
            attributes_id=tuple(row.get("attributes_id", ())),
            dataset=self.dataset,
        )
