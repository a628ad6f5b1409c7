"""``famevil-fast search``: rank the images of a gallery that ``famevil-fast embed`` wrote against text
queries (text-to-image retrieval, ``itc``) or reference image + modification text queries (text-guided
image retrieval, ``tgir``). Owns pairing the queries, encoding them and printing the ranked paths (the
gallery file itself: ``famevil_fast.cli.gallery_file``)."""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from famevil_fast.cli.options import (
    add_checkpoint_argument,
    add_device_argument,
    add_eval_resize_argument,
    add_op_backend_argument,
    add_trust_pickle_argument,
    apply_op_backend,
    integer,
)

if TYPE_CHECKING:
    import torch

    from famevil_fast.model import FameViL

NAME = "search"
HELP = (
    "Rank the images of a gallery written by `famevil-fast embed` against texts (--text: text-to-image, "
    "gallery embedded with --task itc) or reference images with modification texts (--reference and "
    "--text: text-guided, gallery embedded with --task tgir)."
)

# Queries encoded per forward pass.
QUERY_BATCH = 64


@dataclass(frozen=True)
class Query:
    """One query: a text, with the reference image it modifies for text-guided search."""

    text: str
    reference: str | None = None

    def header(self) -> str:
        if self.reference is None:
            return f"# text: {self.text}"
        return f"# reference: {self.reference}\ttext: {self.text}"

    def as_json(self) -> dict[str, str]:
        return (
            {"text": self.text}
            if self.reference is None
            else {"reference": self.reference, "text": self.text}
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    parser.add_argument("gallery", help="image embeddings written by `famevil-fast embed --images ... --out`")
    add_trust_pickle_argument(parser)
    parser.add_argument(
        "--text",
        action="append",
        default=[],
        help="a query text (repeat for several queries); with --reference, the modification text",
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="IMAGE",
        help="reference image of a text-guided query: give one --reference per --text (paired in order), or "
        "one --reference that every --text modifies",
    )
    parser.add_argument(
        "--top-k",
        type=integer,
        default=10,
        metavar="K",
        help="results per query (all of them when the gallery is smaller)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object per query instead of tab-separated lines"
    )
    parser.add_argument(
        "--any-model",
        action="store_true",
        help="search a gallery that another model embedded (its 'model_fingerprint' differs from this "
        "checkpoint's), which is refused otherwise",
    )
    add_eval_resize_argument(
        parser,
        default=None,
        default_help="the gallery's, which embed records (keep_aspect for a gallery that records none); "
        "another than the gallery's is refused",
    )
    add_device_argument(parser)
    add_op_backend_argument(parser)


def run(args: argparse.Namespace) -> int:
    import torch

    from famevil_fast.cli.gallery_file import model_fingerprint, read_gallery_with_header
    from famevil_fast.devices import resolve_device
    from famevil_fast.eval.topk import blocked_topk
    from famevil_fast.model import FameViL

    queries = pair_queries(args.text, args.reference)
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    task = "itc" if queries[0].reference is None else "tgir"
    device = resolve_device(args.device)
    gallery, paths, header = read_gallery_with_header(args.gallery)
    check_gallery_task(args.gallery, header.get("task"), task)
    eval_resize = reference_resize(args.gallery, header.get("eval_resize"), args.eval_resize)
    model = FameViL.from_pretrained(args.checkpoint, trust_pickle=args.trust_pickle)
    check_gallery_width(args.gallery, gallery, model.config.clip.embed_dim)
    if not args.any_model:  # on the CPU, before the model moves
        recorded = header.get("model_fingerprint")
        check_gallery_model(args.gallery, recorded, lambda: model_fingerprint(model, task))
    apply_op_backend(model, args.op_backend)
    model = model.to(device).eval()
    gallery = gallery.to(device)
    with torch.no_grad():
        encoded = encode_queries(model, queries, eval_resize).to(gallery.dtype)
    scores, indices = blocked_topk(encoded, gallery, args.top_k, backend="blocked")  # never a full matrix
    _print_results(queries, scores.cpu().tolist(), indices.cpu().tolist(), paths, args.json)
    return 0


def pair_queries(texts: list[str], references: list[str]) -> list[Query]:
    """The queries the options give: each text alone; each reference with the text at its place; or one
    reference with each text. ValueError for no query, a reference without a text, a blank text, or
    counts that do not pair."""
    if not texts and not references:
        raise ValueError(
            "no query given: use --text (text-to-image) or --reference with --text (text-guided)"
        )
    if not texts:
        raise ValueError("--reference needs --text: the modification text of the reference image")
    blank = [i + 1 for i, text in enumerate(texts) if not text.strip()]
    if blank:
        raise ValueError(f"--text number {blank[0]} is empty")
    if not references:
        return [Query(text) for text in texts]
    if len(references) == 1:
        references = references * len(texts)
    if len(references) != len(texts):
        raise ValueError(
            f"{len(references)} --reference and {len(texts)} --text: give one --text per --reference, "
            "or one --reference for all texts"
        )
    return [Query(text, reference) for text, reference in zip(texts, references)]


def check_gallery_task(path: str | Path, found: str | None, needed: str) -> None:
    """ValueError unless the gallery was embedded with the adapters of ``needed``."""
    if found == needed:
        return
    kind = "text-to-image search (--text)" if needed == "itc" else "text-guided search (--reference)"
    made = f"with --task {found}" if found else "without a recorded task"
    raise ValueError(
        f"gallery {path} was embedded {made}; {kind} needs one from `famevil-fast embed CKPT --images ... "
        f"--task {needed} --out ...`"
    )


def reference_resize(path: str | Path, recorded: str | None, asked: str | None) -> str:
    """The resize the reference images are read with: the one the gallery's images were embedded with
    (``recorded``; keep_aspect for a gallery that records none), ``asked`` when given; ValueError when
    ``asked`` is not the recorded one (the reference and its targets would be resized differently)."""
    if asked is not None and recorded is not None and asked != recorded:
        raise ValueError(
            f"gallery {path} was embedded with --eval-resize {recorded}; search it with the same (or leave "
            f"--eval-resize out), not {asked}"
        )
    return asked or recorded or "keep_aspect"


def check_gallery_width(path: str | Path, gallery: torch.Tensor, width: int) -> None:
    """ValueError unless the gallery's embeddings are ``width`` wide (the model's embedding size)."""
    if gallery.shape[1] != width:
        raise ValueError(
            f"gallery {path} holds {gallery.shape[1]}-wide embeddings but the model's are {width}-wide: "
            "embed the gallery with this checkpoint"
        )


def check_gallery_model(path: str | Path, found: str | None, needed: Callable[[], str]) -> None:
    """ValueError unless the gallery's recorded model fingerprint is ``needed()`` (this model's, computed
    only when there is one to compare); a gallery that records none (written before ``embed`` recorded
    it) is accepted with a warning (one line on stderr, as every warning of the command)."""
    if found is None:
        warnings.warn(
            f"gallery {path} records no model fingerprint (embedded before embed recorded one), so whether "
            "this model embedded it cannot be checked",
            stacklevel=2,
        )
        return
    expected = needed()
    if found != expected:
        raise ValueError(
            f"gallery {path} was embedded by another model (fingerprint {found[:12]}..., this model "
            f"{expected[:12]}...); embed it again with this model, or pass --any-model to search it anyway"
        )


def encode_queries(model: FameViL, queries: list[Query], eval_resize: str) -> torch.Tensor:
    """(Q, D) L2-normalised query embeddings: ``itc`` text embeddings, or ``tgir`` compositions of each
    reference image with its text (one kind for all the queries)."""
    import torch

    from famevil_fast.text import tokenize

    ids = tokenize([q.text for q in queries])
    pixels = _reference_pixels(model, queries, eval_resize)
    out = []
    for start in range(0, len(queries), QUERY_BATCH):
        chunk = ids[start : start + QUERY_BATCH].to(model.device)
        if pixels is None:
            out.append(model.encode_text(chunk, "itc").float())
        else:
            refs = pixels[start : start + QUERY_BATCH].to(model.device)
            out.append(model.compose(refs, chunk).float())
    return torch.cat(out)


def _reference_pixels(model: FameViL, queries: list[Query], eval_resize: str) -> torch.Tensor | None:
    """(Q, 3, S, S) pixels of the queries' reference images (each file read once); None for text queries."""
    from famevil_fast.data.image_files import load_images

    if queries[0].reference is None:
        return None
    position = {ref: i for i, ref in enumerate(dict.fromkeys(q.reference for q in queries))}
    pixels = load_images(list(position), model.config.clip.vision.image_size, eval_resize)
    return pixels[[position[q.reference] for q in queries]]


def _print_results(
    queries: list[Query], scores: list[list[float]], indices: list[list[int]], paths: list[str], as_json: bool
) -> None:
    for query, row_scores, row_indices in zip(queries, scores, indices):
        ranked = [(rank, score, paths[i]) for rank, (score, i) in enumerate(zip(row_scores, row_indices), 1)]
        if as_json:
            results = [{"rank": rank, "score": score, "path": p} for rank, score, p in ranked]
            print(json.dumps({**query.as_json(), "results": results}))
        else:
            print(query.header())
            print("\n".join(f"{rank}\t{score:.4f}\t{p}" for rank, score, p in ranked))
