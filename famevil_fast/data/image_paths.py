"""Image paths of split files: what a path written in a split file names, relative to the data root.

A split file's paths are relative to its dataset's image folder, as the official loader (mmf's
``ImageDatabase``) joins them: ``FashionGen/train`` or ``FashionGen/val`` (by split), ``Fashion200k/images``,
``PolyvoreOutfits/images``, ``BigFACAD/images``, ``FashionIQ/images`` (:func:`image_paths`). Backslashes are
Windows separators and read as "/", "." components are dropped (:func:`clean_image_path`), ".."
components are resolved (``train/../val/1_0.png`` is ``val/1_0.png``: one record, one cache key) and a path
that climbs out of the data root through them is refused; an absolute path (:func:`is_absolute_image_path`)
is used when it lies under the data root (:func:`path_inside`; it becomes root-relative) and refused naming
the file, the entry and the path otherwise.
"""

from __future__ import annotations

import os
import posixpath
import re

_DRIVE = re.compile(r"[A-Za-z]:(/|$)")  # a Windows drive ("C:/data/...", once backslashes are "/")
_ODD_START = ("", "/", ".")  # first characters of paths :func:`image_paths` looks at closely


def clean_image_path(p: str) -> str:
    """``p`` with backslashes (Windows separators) read as "/" and empty and "." components dropped:
    ``train\\1_0.png`` and ``./train//1_0.png`` give ``train/1_0.png``; an absolute path keeps its
    leading "/" (or drive); ".." components are kept."""
    if not (
        "\\" in p or "//" in p or "/./" in p or p.startswith("./") or p.endswith(("/", "/.")) or p == "."
    ):
        return p
    p = p.replace("\\", "/")
    lead = "/" if p.startswith("/") else ""
    return lead + "/".join(c for c in p.split("/") if c not in ("", "."))


def is_absolute_image_path(p: str) -> bool:
    """Whether cleaned path ``p`` is absolute: a POSIX "/..." (a Windows UNC "\\\\server\\..." included)
    or one on a Windows drive ("C:/...")."""
    return p.startswith("/") or (p[1:2] == ":" and _DRIVE.match(p) is not None)


def path_inside(p: str, directory: str | os.PathLike) -> str | None:
    """Absolute path ``p`` relative to ``directory`` ("/"-separated) when it lies inside it, compared as
    written or with symbolic links resolved on both sides; None otherwise (a path on a Windows drive never
    lies inside a POSIX directory)."""
    if not os.path.isabs(p):
        return None
    pairs = (
        (os.path.abspath(directory), os.path.normpath(p)),
        (os.path.realpath(directory), os.path.realpath(p)),
    )
    for base, q in pairs:
        rel = os.path.relpath(q, base)
        if rel not in (".", os.pardir) and not rel.startswith(os.pardir + os.sep):
            return rel.replace(os.sep, "/")
    return None


def image_paths(
    paths: list[str],
    prefix: str,
    folder: str,
    root: str | os.PathLike | None = None,
    where: object = "",
) -> tuple[str, ...]:
    """The image paths of one row relative to the data root: ``prefix`` (the dataset directory relative to
    the data root) + ``folder`` (the image folder of the split: "train" / "val" for FashionGen, "images" for
    Fashion200k, PolyvoreOutfits and BigFACAD) + the path, as the official loader resolves the authors'
    files.

    A path that already starts with ``folder`` ("train/123_0.png" in a FashionGen train file, the layout
    ``famevil-fast make-synthetic`` writes) is taken relative to the dataset directory instead, so both
    layouts give the same record (the image folder holding a folder of its own name is not supported).
    Backslashes are separators (a file written on Windows: ``train\\123_0.png``) and "." components are
    dropped (:func:`clean_image_path`); ".." components are resolved, and a path they take out of the data
    root is refused (ValueError naming ``where`` and the path). An absolute path that lies under the data
    root ``root`` is made relative to it (records stay root-relative, the keys of a cache); any other
    absolute path is refused: ValueError naming ``where`` (the file and entry), the path and the data root."""
    head = folder + "/"
    out = []
    for raw in paths:
        if (
            type(raw) is str
            and raw[:1] not in _ODD_START
            and raw[1:2] != ":"
            and "\\" not in raw
            and "//" not in raw
            and "/." not in raw
            and raw[-1] != "/"
        ):  # relative and already clean: what the loop below gives it, without its checks
            out.append(prefix + raw if raw.startswith(head) else prefix + head + raw)
            continue
        p = clean_image_path(raw)
        if not p:
            raise ValueError(f"{where or 'a row'}: image path {raw!r} names no file")
        if not is_absolute_image_path(p):
            out.append(resolve_parents(prefix + (p if p.startswith(head) else head + p), raw, where))
            continue
        rel = None if root is None else path_inside(p, root)
        if rel is None:
            base = "the data root" if root is None else f"the data root {os.path.abspath(root)}"
            raise ValueError(
                f"{where or 'a row'}: image path {raw!r} is absolute and not under {base}; write it relative "
                f"to the image folder {prefix}{folder}/ (as FashionViL's files do) or as a path under the "
                "data root"
            )
        out.append(rel)
    return tuple(out)


def resolve_parents(rel: str, raw: str, where: object = "") -> str:
    """Root-relative path ``rel`` with its ".." components resolved (``rel`` itself when it has none);
    ValueError naming ``where`` and the path ``raw`` as written when they climb out of the data root."""
    if ".." not in rel.split("/"):
        return rel
    resolved = posixpath.normpath(rel)
    if resolved == "." or resolved == ".." or resolved.startswith("../"):
        raise ValueError(
            f"{where or 'a row'}: image path {raw!r} climbs out of the data root through '..'; write it "
            "relative to the image folder or as a path under the data root"
        )
    return resolved
