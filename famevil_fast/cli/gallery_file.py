"""The embeddings file of ``famevil-fast embed`` (read back by ``famevil-fast search``): a safetensors file
with the tensors ``image`` (N, D) and/or ``text`` (M, D), and in its header the ``task`` whose adapters made
them and the N image paths, one per line (field ``images``). A list longer than IMAGE_LIST_IN_HEADER_MAX
bytes goes to a text file beside it instead (field ``images_file``, its name; ``images_sha256``, its
checksum), since safetensors caps a header at 100 MB.

Writing is ordered so that no reader is ever handed the wrong paths: the list file is written first, the
embeddings file replaces the old one atomically after it, and a list file the new header does not use is
removed last. A crash in between leaves an old header next to a new list, which the checksum exposes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IMAGE_LIST_IN_HEADER_MAX = 32 * 2**20


def image_list_file(out: Path) -> Path:
    """Where the image paths of the embeddings file ``out`` go when they are too many for its header."""
    return out.with_name(out.name + ".images.txt")


def write_gallery(out: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path | None:
    """Write the embeddings file ``out`` (atomically, parent folders made) with the image paths of
    ``meta["images"]`` in its header or, when too long, in ``image_list_file(out)``; returns the list file
    when one is used."""
    from famevil_fast.files import atomic_save_safetensors, atomic_write

    out = Path(out)
    listing, sidecar = meta.get("images"), image_list_file(out)
    use_file = listing is not None and len(listing.encode()) > IMAGE_LIST_IN_HEADER_MAX
    if use_file:
        data = (listing + "\n").encode()
        atomic_write(sidecar, lambda tmp: tmp.write_bytes(data))
        meta = {k: v for k, v in meta.items() if k != "images"}
        meta.update(images_file=sidecar.name, images_sha256=hashlib.sha256(data).hexdigest())
    atomic_save_safetensors(out, tensors, metadata=meta)
    if not use_file:
        sidecar.unlink(missing_ok=True)  # an earlier run's list, named by no header now
    return sidecar if use_file else None


def read_gallery(path: str | Path) -> tuple[torch.Tensor, list[str], str | None]:
    """``(embeddings, paths, task)`` of an embeddings file: the ``image`` tensor (N, D), its N image paths
    and the ``task`` whose adapters made it (None when not recorded). FileNotFoundError for a missing file
    or list file; ValueError for an unreadable file, no ``image`` tensor, a list file that is not the one
    the header names (a later embed to the same name that did not finish), or a path count other than N."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gallery file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if "image" not in f.keys():
                held = ", ".join(sorted(f.keys())) or "none"
                raise ValueError(
                    f"gallery {path} has no 'image' tensor (it holds: {held}); embed images with "
                    "`famevil-fast embed CKPT --images ...`"
                )
            embeddings = f.get_tensor("image")
    except SafetensorError as exc:
        raise ValueError(f"cannot read gallery {path} as safetensors: {exc}") from None
    if embeddings.dim() != 2:
        raise ValueError(f"gallery {path}: 'image' must be 2-D (N, D), got shape {tuple(embeddings.shape)}")
    paths = _image_paths(path, meta)
    if len(paths) != embeddings.shape[0]:
        raise ValueError(
            f"gallery {path} names {len(paths)} image paths for {embeddings.shape[0]} embeddings"
        )
    return embeddings, paths, meta.get("task")


def _image_paths(path: Path, meta: dict[str, str]) -> list[str]:
    """The image paths in the header, or in the list file it names (beside the gallery), checked against
    the header's checksum."""
    if "images" in meta:
        return meta["images"].split("\n") if meta["images"] else []
    if "images_file" not in meta:
        return []
    listing = path.parent / meta["images_file"]
    if not listing.is_file():
        raise FileNotFoundError(f"image list of gallery {path} not found: {listing}")
    data = listing.read_bytes()
    expected = meta.get("images_sha256")
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise ValueError(
            f"image list {listing} is not the one gallery {path} was written with (a later embed to the same "
            "name did not finish?): embed the images again"
        )
    return data.decode("utf-8").splitlines()
