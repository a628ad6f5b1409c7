"""The embeddings file of ``famevil-fast embed`` (read back by ``famevil-fast search``): a safetensors file
with the tensors ``image`` (N, D) and/or ``text`` (M, D), and in its header the ``task`` whose adapters made
them and the N image paths, one per line (field ``images``). A list longer than IMAGE_LIST_IN_HEADER_MAX
bytes goes to a text file beside it instead, named after its checksum (``OUT.images.<sha256 prefix>.txt``;
header fields ``images_file``, its name, and ``images_sha256``), since safetensors caps a header at 100 MB.

Writing never hands a reader the wrong paths and never breaks the file it replaces: a new list file is
written under its own name first, the embeddings file then replaces the old one atomically, and only then
are list files that no header names any more removed. A reader checks the list against the header's
checksum. Paths must be valid UTF-8 without line breaks (checked before anything is embedded). The paths
are kept as ``embed`` was given them: a relative path resolves only from the directory ``embed`` ran in.

The header field ``model_fingerprint`` (see ``model_fingerprint``) identifies the model that made the image
embeddings, so that ``search`` can refuse a gallery embedded by another model, and ``eval_resize`` how the
images were resized, which ``search`` reads its reference images with; galleries written before these were
recorded have neither.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from famevil_fast.model import FameViL

IMAGE_LIST_IN_HEADER_MAX = 32 * 2**20

# Bumped whenever what ``model_fingerprint`` hashes changes.
FINGERPRINT_VERSION = 1


def image_list_file(out: Path, digest: str) -> Path:
    """The list file of the embeddings file ``out`` for a list of SHA-256 ``digest``."""
    return out.with_name(f"{out.name}.images.{digest[:16]}.txt")


def check_image_paths(paths: list[str]) -> None:
    """ValueError naming the first path a gallery cannot list: one with a line break, or one that is not
    valid UTF-8 (a file name in another encoding)."""
    for path in paths:
        if "\n" in path or "\r" in path:
            raise ValueError(f"image path {path!r} holds a line break, which a gallery's list cannot hold")
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"image path {path!r} is not valid UTF-8; rename the file") from None


def write_gallery(out: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path | None:
    """Write the embeddings file ``out`` (atomically, parent folders made) with the image paths of
    ``meta["images"]`` in its header or, when too long, in a list file beside it; returns the list file
    when one is used."""
    from famevil_fast.files import atomic_save_safetensors, atomic_write

    out = Path(out)
    listing = meta.get("images")
    sidecar = None
    if listing is not None and len(listing.encode()) > IMAGE_LIST_IN_HEADER_MAX:
        data = (listing + "\n").encode()
        digest = hashlib.sha256(data).hexdigest()
        sidecar = image_list_file(out, digest)
        atomic_write(sidecar, lambda tmp: tmp.write_bytes(data))
        meta = {k: v for k, v in meta.items() if k != "images"}
        meta.update(images_file=sidecar.name, images_sha256=digest)
    atomic_save_safetensors(out, tensors, metadata=meta)
    own_list = re.compile(re.escape(out.name) + r"\.images\.[0-9a-f]{16}\.txt")
    for stale in out.parent.iterdir():
        if stale != sidecar and own_list.fullmatch(stale.name):  # this file's list, named by no header now
            stale.unlink(missing_ok=True)
    return sidecar


def read_gallery(path: str | Path) -> tuple[torch.Tensor, list[str], str | None]:
    """``(embeddings, paths, task)`` of an embeddings file: the ``image`` tensor (N, D), its N image paths
    and the ``task`` whose adapters made it (None when not recorded). FileNotFoundError for a missing file
    or list file; ValueError for an unreadable file, no ``image`` tensor, a list file that is not the one
    the header names (a later embed to the same name that did not finish), or a path count other than N."""
    embeddings, paths, meta = read_gallery_with_header(path)
    return embeddings, paths, meta.get("task")


def read_gallery_with_header(path: str | Path) -> tuple[torch.Tensor, list[str], dict[str, str]]:
    """``read_gallery``'s embeddings and paths with the file's whole header (``task``,
    ``model_fingerprint``, ...), all from one reading of the file."""
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
    if not embeddings.is_floating_point():
        raise ValueError(
            f"gallery {path}: 'image' must hold floating-point embeddings, got {embeddings.dtype}"
        )
    paths = _image_paths(path, meta)
    if len(paths) != embeddings.shape[0]:
        raise ValueError(
            f"gallery {path} names {len(paths)} image paths for {embeddings.shape[0]} embeddings"
        )
    return embeddings, paths, meta


def model_fingerprint(model: FameViL, task: str) -> str:
    """SHA-256 (hex) of what ``model.encode_image(pixels, task)`` computes with: the vision tower's tensors
    except other tasks' adapters and the cross-attention adapters (fusion mode only), the task's shares of
    the Cross-Modal Adapters' up-projections, and the config fields that shape the image embedding. Values
    are hashed as float32 on the CPU, so the same weights give the same fingerprint on any device and in
    any dtype they convert to float32 from exactly (a model cast to lower precision is another model)."""
    import torch

    clip = model.config.clip
    config = {
        "version": FINGERPRINT_VERSION,
        "task": task,
        "vision": asdict(clip.vision),
        "embed_dim": clip.embed_dim,
        "activation": clip.activation,
        "layer_norm_eps": clip.layer_norm_eps,
        "adapter_type": model.config.adapter_type,
    }
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    state = model.state_dict()
    for key in sorted(k for k in state if _shapes_image_embedding(k, task)):
        value = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"\0{key}\0{tuple(value.shape)}\0".encode())
        digest.update(value.numpy())
    return digest.hexdigest()


def _shapes_image_embedding(key: str, task: str) -> bool:
    """Whether the state-dict tensor ``key`` takes part in ``encode_image(pixels, task)``."""
    if key.startswith("xmodal_shared."):
        return key.split(".")[3] == task  # xmodal_shared.<layer>.<site>.<task>.<name>
    if not key.startswith("vision.") or ".xaa." in key:
        return False
    adapter = re.search(r"\.adapters\.([^.]+)\.", key)
    return adapter is None or adapter.group(1) == task


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
    if hashlib.sha256(data).hexdigest() != meta.get("images_sha256"):
        raise ValueError(f"image list {listing} is not the one gallery {path} was written with: embed again")
    return data.decode("utf-8").removesuffix("\n").split("\n")
