"""Evaluating a model: encode each task's evaluation set with the model, then score it with the protocol
functions of this package. ``Evaluator`` is what the trainer calls periodically and what
``famevil-fast eval`` runs.

Captioning references are, by default, the reference texts after a round trip through the CLIP tokenizer
(lower-cased, BPE-normalised, at most 75 tokens), the text the model is trained to produce, as in the
official code; ``caption_references="raw"`` scores against the product texts as written instead. Captions are
at most ``caption_max_len`` tokens; ``caption_len_from_references`` reproduces the official cap instead: per
batch, as many tokens as the longest reference of the batch has (it leaks the reference lengths).

``views``: "all" (default, the official protocol: every view of a product is a sample of SCR and FIC and an
item of the XMR image side) or "first" (one view per product). ``eval_resize``: "keep_aspect" (default) or
"squash" (the official code's square resize). Both are properties of
the evaluation sets (``Evaluator.build`` builds them so); each result's ``details`` records them, and a set
built otherwise than the options say is an error.

In a distributed run every process encodes its share of each set's batches, the outputs are gathered to
process 0 alone and it scores them (``famevil_fast.eval.sharding``); the batches, and so the scores, are
those of one process. The few things every process needs from the gathered outputs (whether a set has any
samples, which XMR texts to encode) are agreed on with small exchanges. Process 0 scores through
``EvalShard.on_main``, so that an error while it scores is raised in every process at the same point of the
evaluation, rather than leaving the others waiting in their next collective.
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, TypeVar

import torch

from famevil_fast.data.images import SkippedImagesWarning, caller_stacklevel
from famevil_fast.eval.captioning import fic_result
from famevil_fast.eval.classification import scr_result
from famevil_fast.eval.report import EvalReport, TaskResult
from famevil_fast.eval.sharding import EvalShard
from famevil_fast.eval.tgir import TgirCategory, tgir_fashioniq, unique_gallery
from famevil_fast.eval.xmr import XMR_PROTOCOLS, check_sampled_seed, xmr_full, xmr_sampled
from famevil_fast.text.special_tokens import CAPTION_TOKENS

if TYPE_CHECKING:
    from famevil_fast.data.eval_sets import CapEval, SCREval, TGIREval, XMREval
    from famevil_fast.model.famevil import FameViL
    from famevil_fast.train.config import EvalSection


CAPTION_REFERENCES = ("clip", "raw")
XMR_SAMPLED_QUERIES = 1000
XMR_SAMPLED_NEGATIVES = 100
ONE_PROCESS = EvalShard()
T = TypeVar("T")


@dataclass
class EvalOptions:
    """How ``Evaluator`` scores a model.

    - ``sampled_seed``: seed of the sampled-100 XMR protocol; None = the original's unseeded draws from the
      global torch RNG.
    - ``caption_max_len``: longest generated caption in tokens (the fixed default: 75, the longest
      reference after the CLIP round trip, which is the official cap in a batch of any size).
    - ``caption_len_from_references``: faithful to the official code: each batch's captions get as many
      tokens as the longest reference of that batch has (``caption_max_len`` is then unused).
    - ``caption_references``: "clip" (default, as the official code: the reference text after a round trip
      through the CLIP tokenizer, lower-cased and cut to 75 tokens) or "raw" (the product text as written).
    - ``views``: "all" (default, the official protocol: every view of a product counts in SCR, FIC and the
      XMR image side) or "first" (the first view of each product only).
    - ``eval_resize``: "keep_aspect" (default, fixed: shorter side to round(S * 256 / 224), centre crop S)
      or "squash" (faithful: every image resized to a square, aspect lost).
    - ``progress``: a tqdm bar per set while it is encoded (on rank 0, over its share of the batches).
    """

    xmr_protocols: Sequence[str] = XMR_PROTOCOLS
    sampled_seed: int | None = 0
    caption_max_len: int = CAPTION_TOKENS
    caption_beams: int = 1
    caption_no_repeat_ngram: int = 0
    caption_metrics: Sequence[str] | None = ("bleu4", "rouge_l", "cider")
    max_samples: int | None = None
    text_batch: int = 256
    caption_cuda_graph: bool = False
    caption_compile: bool = False
    caption_len_from_references: bool = False
    caption_references: str = "clip"
    views: str = "all"
    eval_resize: str = "keep_aspect"
    progress: bool = False

    def __post_init__(self) -> None:
        """Counts, lengths, the sampled seed and the protocols checked here, so a bad one fails at
        construction rather than in the middle of an evaluation (``max_samples=0`` would leave nothing to
        score, an unknown protocol name would skip cross-modal retrieval)."""
        check_sampled_seed(self.sampled_seed, "EvalOptions.sampled_seed")
        protocols = self.xmr_protocols
        if isinstance(protocols, str) or not protocols or any(p not in XMR_PROTOCOLS for p in protocols):
            raise ValueError(
                f"EvalOptions.xmr_protocols must be a non-empty list of {' and '.join(XMR_PROTOCOLS)}, got "
                f"{protocols!r}"
            )
        for name, low, optional in (
            ("max_samples", 1, True),
            ("text_batch", 1, False),
            ("caption_max_len", 1, False),
            ("caption_beams", 1, False),
            ("caption_no_repeat_ngram", 0, False),
        ):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                none = " or None (no cap)" if optional else ""
                raise ValueError(f"EvalOptions.{name} must be an int{none}, got {value!r}")
            if value < low:
                none = ", or None for no cap" if optional else ""
                raise ValueError(f"EvalOptions.{name} must be at least {low}{none}, got {value}")

    @classmethod
    def from_section(cls, section: EvalSection, progress: bool = False) -> EvalOptions:
        return cls(
            section.xmr_protocols,
            section.sampled_seed,
            section.caption_max_len,
            section.caption_beams,
            section.caption_no_repeat_ngram,
            section.caption_metrics,
            section.max_samples,
            caption_cuda_graph=section.caption_cuda_graph,
            caption_compile=section.caption_compile,
            caption_len_from_references=section.caption_len_from_references,
            caption_references=section.caption_references,
            views=section.views,
            eval_resize=section.resize,
            progress=progress,
        )


def _set_options(data: object, opts: EvalOptions, task: str, image_sets: bool = True) -> dict[str, str]:
    """The views and eval resize ``data`` was built with, as result details; ValueError when they are not
    the ones ``opts`` asks for (the sets are built with them: ``Evaluator.build``, ``build_eval_sets``)."""
    built = {"eval_resize": getattr(data, "eval_resize", "keep_aspect")}
    if image_sets:
        built = {"views": getattr(data, "views", "all"), **built}
    for key, value in built.items():
        wanted = getattr(opts, key)
        if value != wanted:
            raise ValueError(
                f"the {task} evaluation set was built with {key}={value!r} but the options ask for "
                f"{wanted!r}: build it with build_eval_sets(..., {key}={wanted!r})"
            )
    return built


def _limited(batches: Iterable[dict], limit: int, key: str) -> Iterator[dict]:
    """The batches of the first ``limit`` samples (rows under ``key``), the last one cut to fit."""
    seen = 0
    for batch in batches:
        if seen >= limit:
            return
        if seen + batch[key].shape[0] > limit:
            batch = {k: v[: limit - seen] for k, v in batch.items()}
        seen += batch[key].shape[0]
        yield batch


def _model_input(model, x: torch.Tensor) -> torch.Tensor:
    return x.to(model.device, non_blocking=True)


def _each_batch(
    shard: EvalShard,
    batches: Iterable,
    key: str,
    fn: Callable[[dict], T],
    limit: int | None = None,
    bar: str | None = None,
) -> list[T] | None:
    """``fn`` of every batch that has rows under ``key`` (of the first ``limit`` samples, one process), in
    order, each batch computed by one process: all of them in process 0, [] in the others (a batch whose
    images were all missing or undecodable has none and is skipped). None, in every process, when no
    process had a batch with rows. With ``bar``, a progress bar of that name on rank 0, over its share."""
    from tqdm import tqdm

    if limit is not None:
        batches = _limited(batches, limit, key)
    total = len(range(shard.rank, len(batches), shard.world)) if hasattr(batches, "__len__") else None
    progress = tqdm(
        total=total,
        desc=bar,
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        disable=bar is None or not shard.is_main,
    )
    with_rows = 0

    def each(batch: dict) -> T | None:
        nonlocal with_rows
        out = None
        if batch[key].shape[0]:
            out, with_rows = fn(batch), with_rows + 1
        progress.update(1)
        return out

    try:
        outputs = shard.map_batches(batches, each)
    finally:
        progress.close()
    if not shard.any_process(with_rows > 0):
        return None
    return [out for out in outputs if out is not None]


def _required(outputs: list[T] | None, what: str) -> list[T]:
    """``outputs`` of ``_each_batch``; ValueError naming the ``what`` set when it has no samples at all."""
    if outputs is None:
        raise ValueError(f"the {what} evaluation set has no samples: its images are missing or undecodable")
    return outputs


def _cat_columns(encoded: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Per-batch tuples of tensors (process 0's gathered outputs) concatenated column by column."""
    return tuple(torch.cat(column) for column in zip(*encoded))


def _bar(opts: EvalOptions, name: str) -> str | None:
    return name if opts.progress else None


def _on(model, x: torch.Tensor) -> torch.Tensor:
    """Gathered outputs (on the CPU after a distributed exchange) back on the model's device."""
    return x.to(model.device)


def _scored(
    shard: EvalShard, score: Callable[[], list[TaskResult]], details: dict[str, object]
) -> list[TaskResult]:
    """``score()`` computed by process 0 alone, ``details`` added to each result's; [] in the other
    processes. An error in it is raised in every process (``EvalShard.on_main``)."""

    def run() -> list[TaskResult]:
        results = score()
        for result in results:
            result.details.update(details)
        return results

    return shard.on_main(run) or []


def sampled_negatives(
    image_product_ids: torch.Tensor, text_product_ids: torch.Tensor, max_samples: int | None = None
) -> int:
    """Negatives per query of the sampled XMR protocol: 100, or what a small set has (the texts of the other
    products, the views of the other products), with a warning: the result is then ``sampled-N``, with chance
    K / (N + 1), and does not compare with sampled-100 numbers. 0 when the set has no negatives at all (one
    product, or every view of one product): the protocol is then skipped, and the warning says so and how to
    get it (more samples)."""
    views, texts = image_product_ids.numel(), text_product_ids.numel()
    most_views = int(torch.unique(image_product_ids, return_counts=True)[1].max())
    negatives = min(XMR_SAMPLED_NEGATIVES, texts - 1, views - most_views)
    if negatives < XMR_SAMPLED_NEGATIVES:
        capped = max_samples is not None and views >= max_samples
        cause = (
            f"max_samples={max_samples} (--max-samples / eval.max_samples) keeps"
            if capped
            else "the evaluation set has"
        )
        why = (
            f"{cause} only {texts} products ({views} image views), and a query's negatives are the other "
            "products' texts or views"
        )
        if negatives == 0:
            more = (
                "raise --max-samples / eval.max_samples so that the kept views span"
                if capped
                else "evaluate a set with"
            )
            message = (
                f"XMR sampled protocol skipped (no result): no negatives per query, since {why}; for it, "
                f"{more} at least 2 products ({XMR_SAMPLED_NEGATIVES + 1} for "
                f"sampled-{XMR_SAMPLED_NEGATIVES})"
            )
        else:
            message = (
                f"XMR sampled protocol: {negatives} negatives per query instead of {XMR_SAMPLED_NEGATIVES}, "
                f"reported as 'sampled-{negatives}' with chance K/{negatives + 1}: {why}"
            )
        warnings.warn(message, stacklevel=caller_stacklevel())
    return negatives


@torch.no_grad()
def evaluate_xmr(
    model: FameViL, data: XMREval, opts: EvalOptions, shard: EvalShard = ONE_PROCESS
) -> list[TaskResult]:
    """XMR protocols of ``opts``; with ``shard``, each process encodes its share and process 0 scores
    (the other processes return []; an error while it scores is raised in every process)."""
    built = _set_options(data, opts, "itc")

    def encode_images(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emb = model.encode_image(_model_input(model, batch["pixels"]), "itc").float()
        return emb, batch["product_ids"].cpu(), batch["subcategory"].cpu()

    encoded = _required(
        _each_batch(shard, data.images, "pixels", encode_images, opts.max_samples, _bar(opts, "XMR images")),
        "XMR",
    )
    # the texts of the products that have an image: process 0 holds the images and tells the others
    keep = shard.broadcast(shard.on_main(lambda: _with_images(data.texts["product_ids"], encoded)))
    ids = data.texts["input_ids"][keep.to(data.texts["input_ids"].device)]
    chunks = [ids[i : i + opts.text_batch] for i in range(0, ids.shape[0], opts.text_batch)]
    texts = shard.map_batches(
        chunks, lambda chunk: model.encode_text(_model_input(model, chunk), "itc").float()
    )
    return _scored(shard, lambda: _xmr_results(model, encoded, texts, data.texts, keep, opts), built)


def _with_images(text_product_ids: torch.Tensor, encoded: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """Which texts are of a product with an image among the gathered (embedding, product id, subcategory)
    image batches."""
    return torch.isin(text_product_ids.cpu(), torch.cat([pids for _, pids, _ in encoded]))


def _xmr_results(
    model: FameViL,
    encoded: list[tuple[torch.Tensor, ...]],
    texts: list[torch.Tensor],
    text_data: dict[str, torch.Tensor],
    keep: torch.Tensor,
    opts: EvalOptions,
) -> list[TaskResult]:
    """The XMR protocols of ``opts`` over the gathered image batches and text embeddings (those of the
    texts ``keep`` selects)."""
    image_emb, image_pid, image_sub = _cat_columns(encoded)
    image_emb, text_emb = _on(model, image_emb), _on(model, torch.cat(texts))
    text_pid, text_sub = text_data["product_ids"].cpu()[keep], text_data["subcategory"].cpu()[keep]
    results = []
    if "full" in opts.xmr_protocols:
        results.append(
            xmr_full(image_emb, image_pid.to(image_emb.device), text_emb, text_pid.to(text_emb.device))
        )
    sampled = "sampled" in opts.xmr_protocols
    negatives = sampled_negatives(image_pid, text_pid, opts.max_samples) if sampled else 0
    if negatives > 0:  # none at all: skipped, with a warning (every query would rank first: chance 100%)
        results.append(
            xmr_sampled(
                image_emb.cpu(),
                image_pid,
                image_sub,
                text_emb.cpu(),
                text_pid,
                text_sub,
                seed=opts.sampled_seed,
                num_queries=XMR_SAMPLED_QUERIES,  # per direction, all of them when there are fewer
                num_negatives=negatives,
            )
        )
    return results


@torch.no_grad()
def evaluate_tgir(
    model: FameViL, data: TGIREval, opts: EvalOptions, shard: EvalShard = ONE_PROCESS
) -> list[TaskResult]:
    """FashionIQ recalls; with ``shard``, as ``evaluate_xmr``."""
    built = _set_options(data, opts, "tgir", image_sets=False)

    def compose(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, ids = _model_input(model, batch["ref_pixels"]), _model_input(model, batch["input_ids"])
        return model.compose(pixels, ids).float(), batch["target_ids"].cpu()

    gathered = {}  # per category: process 0's queries and gallery (None and empty in the other processes)
    for name, cat in data.categories.items():
        queries = _each_batch(
            shard, cat.queries, "ref_pixels", compose, opts.max_samples, _bar(opts, f"TGIR {name} queries")
        )
        if queries is None:  # (in every process: no process had a query of this category)
            raise ValueError(
                f"the TGIR evaluation set's {name} queries have no images: missing or undecodable (the "
                "average over the categories would leave it out)"
            )
        composed, targets = _cat_columns(queries) if shard.is_main else (None, None)
        gallery = _tgir_gallery(
            model, cat.gallery, targets, opts.max_samples, shard, _bar(opts, f"TGIR {name} gallery")
        )
        if gallery is None:  # (in every process)
            raise ValueError(
                f"the TGIR evaluation set's {name} gallery has no images: missing or undecodable"
            )
        gathered[name] = (composed, targets, gallery)
    if not gathered:
        raise ValueError("the TGIR evaluation set has no categories")
    return _scored(shard, lambda: [tgir_fashioniq(_tgir_categories(model, gathered))], built)


def _tgir_categories(
    model: FameViL,
    gathered: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[list, list]]],
) -> dict[str, TgirCategory]:
    """Each category's gathered query compositions and target ids and its gallery (embeddings, ids)
    batches as a ``TgirCategory`` on the model's device, the gallery reduced to one image per id."""
    categories = {}
    for name, (composed, targets, (embeddings, ids)) in gathered.items():
        g_emb, g_ids = unique_gallery(_on(model, torch.cat(embeddings)), torch.cat(ids).to(model.device))
        composed, targets = _queries_with_targets(name, composed, targets, g_ids)
        categories[name] = TgirCategory(_on(model, composed), targets.to(g_emb.device), g_emb, g_ids)
    return categories


def _queries_with_targets(
    name: str, composed: torch.Tensor, targets: torch.Tensor, gallery_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The queries whose target image is in the encoded gallery: a gallery image that could not be decoded
    (skipped with a warning while encoding) takes the queries that target it out of the evaluation, as a
    missing one does, with a warning that counts them."""
    kept = torch.isin(targets, gallery_ids.to(targets.device))
    if bool(kept.all()):
        return composed, targets
    dropped = int((~kept).sum())
    if dropped == targets.shape[0]:
        raise ValueError(
            f"TGIR {name}: none of the {dropped} queries has its target image in the gallery (the images "
            "were skipped as undecodable: see the warnings above)"
        )
    warnings.warn(
        f"TGIR {name}: {dropped} of {targets.shape[0]} queries left out: their target image was skipped "
        "(undecodable; see the warning above)",
        SkippedImagesWarning,
        stacklevel=caller_stacklevel(),
    )
    return composed[kept.to(composed.device)], targets[kept]


def _tgir_gallery(
    model: FameViL,
    batches: Iterable[dict],
    needed: torch.Tensor | None,
    limit: int | None,
    shard: EvalShard = ONE_PROCESS,
    bar: str | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Gallery embeddings and ids, per batch: process 0's, gathered ([] in the other processes); None in
    every process when the gallery has no images. With ``limit`` (``max_samples``), process 0 alone encodes
    the queries' targets (``needed``; None in the other processes) plus at most ``limit`` other images."""

    def encode(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return model.encode_image(_model_input(model, batch["pixels"]), "tgir").float(), batch[
            "target_ids"
        ].cpu()

    if limit is None:
        encoded = _each_batch(shard, batches, "pixels", encode, bar=bar)
    else:
        encoded = shard.on_main(lambda: _limited_gallery(batches, needed, limit, encode)) or []
        encoded = encoded if shard.broadcast(bool(encoded)) else None
    if encoded is None:
        return None
    return [emb for emb, _ in encoded], [ids for _, ids in encoded]


def _limited_gallery(
    batches: Iterable[dict],
    needed: torch.Tensor,
    limit: int,
    encode: Callable[[dict], tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``encode`` of the gallery images that are targets of ``needed`` plus at most ``limit`` others, in
    one process; the walk stops once both are in."""
    encoded = []
    missing, others = set(needed.tolist()), 0
    for batch in batches:
        ids = batch["target_ids"].cpu()
        keep = torch.isin(ids, needed) | (torch.arange(len(ids)) < limit - others)
        others += int((~torch.isin(ids[keep], needed)).sum())
        missing -= set(ids[keep].tolist())
        if keep.any():
            encoded.append(encode({"pixels": batch["pixels"][keep], "target_ids": ids[keep]}))
        if not missing and others >= limit:
            break
    return encoded


@torch.no_grad()
def evaluate_scr(
    model: FameViL, data: SCREval, opts: EvalOptions, shard: EvalShard = ONE_PROCESS
) -> list[TaskResult]:
    """Sub-category accuracy and macro-F1; with ``shard``, as ``evaluate_xmr``."""
    built = _set_options(data, opts, "scr")

    def classify(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, ids = _model_input(model, batch["pixels"]), _model_input(model, batch["input_ids"])
        return model.classify(pixels, ids).float().cpu(), batch["labels"].cpu()

    encoded = _required(
        _each_batch(shard, data.samples, "pixels", classify, opts.max_samples, _bar(opts, "SCR")), "SCR"
    )
    return _scored(shard, lambda: [_scr_result(encoded, data)], built)


def _scr_result(encoded: list[tuple[torch.Tensor, torch.Tensor]], data: SCREval) -> TaskResult:
    """``scr_result`` of the gathered (logits, labels) batches, with the set's category mapping."""
    logits, labels = _cat_columns(encoded)
    categories = getattr(data, "categories", None)
    result = scr_result(logits, labels, categories)
    note = getattr(data, "category_note", None)
    if categories is None and note:
        result.details["category_metrics"] = f"skipped: {note}"
    return result


def longest_reference(input_ids: torch.Tensor) -> int:
    """Content tokens (between the start and the first end token) of the longest reference among token rows
    (B, L), at least 1: the official decoding cap of a batch."""
    from famevil_fast.text import EOT_ID

    is_end = input_ids == EOT_ID
    full = torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long, device=input_ids.device)
    end = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), full)
    return max(1, int(end.max()) - 1)


class RawReferences:
    """The product text of each sample of a captioning batch, as written (``caption_references="raw"``).

    Samples whose image cannot be decoded leave their batch, so a batch's texts are looked up by its
    ``product_ids`` (every view of a product has the product's text); batches without them (hand-made
    sets, where nothing is dropped) take the next texts in order."""

    def __init__(self, data: CapEval) -> None:
        self.texts = list(data.references)
        table = getattr(data.samples, "table", None)
        ids = None if table is None else table.fields.get("product_ids")
        self.by_product = None if ids is None else dict(zip(ids.tolist(), self.texts))
        self.next = 0

    def of(self, batch: dict) -> list[str]:
        """The texts of ``batch``; batches are asked for in the order of the set."""
        return self.of_rows(batch.get("product_ids"), batch["pixels"].shape[0])

    def of_rows(self, product_ids: torch.Tensor | None, n: int) -> list[str]:
        """The texts of a batch of ``n`` samples with these ``product_ids`` (None: the next ``n`` texts)."""
        if self.by_product is not None and product_ids is not None:
            return [self.by_product[int(p)] for p in product_ids.tolist()]
        self.next += n
        return self.texts[self.next - n : self.next]


@torch.no_grad()
def evaluate_cap(
    model: FameViL, data: CapEval, opts: EvalOptions, shard: EvalShard = ONE_PROCESS
) -> list[TaskResult]:
    """Caption metrics; with ``shard``, as ``evaluate_xmr``."""
    from famevil_fast.text import decode

    if opts.caption_references not in CAPTION_REFERENCES:
        raise ValueError(
            f"caption_references must be one of {CAPTION_REFERENCES}, got {opts.caption_references!r}"
        )
    limit = model.config.clip.text.context_length - 1
    if not opts.caption_len_from_references and opts.caption_max_len > limit:
        raise ValueError(
            f"caption_max_len must be at most {limit} (the model's text context, less the start token), "
            f"got {opts.caption_max_len}"
        )
    built = _set_options(data, opts, "cap")

    def caption(batch: dict) -> tuple[list[str], list[str] | tuple[torch.Tensor | None, int]]:
        input_ids = batch["input_ids"].cpu()
        max_len = longest_reference(input_ids) if opts.caption_len_from_references else opts.caption_max_len
        captions = model.caption(
            _model_input(model, batch["pixels"]),
            max_len=max_len,
            num_beams=opts.caption_beams,
            no_repeat_ngram=opts.caption_no_repeat_ngram,
            cuda_graph=opts.caption_cuda_graph,
            compiled=opts.caption_compile,
        )
        rows = (batch.get("product_ids"), batch["pixels"].shape[0])  # raw references: looked up in order
        return captions, decode(input_ids) if opts.caption_references == "clip" else rows

    encoded = _required(
        _each_batch(shard, data.samples, "pixels", caption, opts.max_samples, _bar(opts, "FIC captions")),
        "FIC",
    )
    details = {
        "references": opts.caption_references,
        "max_len": "longest reference" if opts.caption_len_from_references else opts.caption_max_len,
        "beams": opts.caption_beams,
        **built,
    }
    return _scored(shard, lambda: [_fic_result(encoded, data, opts)], details)


def _fic_result(encoded: list[tuple[list[str], object]], data: CapEval, opts: EvalOptions) -> TaskResult:
    """``fic_result`` of the gathered (captions, references) batches: the references decoded from the
    tokens, or (``caption_references="raw"``) looked up as written."""
    raw = RawReferences(data) if opts.caption_references == "raw" else None
    predictions = [text for captions, _ in encoded for text in captions]
    references = [text for _, refs in encoded for text in (refs if raw is None else raw.of_rows(*refs))]
    return fic_result(predictions, references, metrics=opts.caption_metrics)


EVALUATORS: dict[str, Callable[..., list[TaskResult]]] = {
    "itc": evaluate_xmr,
    "tgir": evaluate_tgir,
    "scr": evaluate_scr,
    "cap": evaluate_cap,
}


@dataclass
class Evaluator:
    """Evaluation sets per task and the options to score them; call it with a model (in a distributed run,
    in every process: see ``report``)."""

    sets: dict[str, object]
    options: EvalOptions = field(default_factory=EvalOptions)
    shard: EvalShard | None = None  # None: the default process group's rank and size, if initialised
    # the trainer calls it in every process of a distributed run (each encodes its share)
    runs_on_every_process: ClassVar[bool] = True

    @classmethod
    def build(
        cls,
        root: str | os.PathLike,
        tasks: Sequence[str],
        image_size: int,
        batch_size: int = 128,
        device: torch.device | str | None = None,
        backend: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        options: EvalOptions | None = None,
    ) -> Evaluator:
        from famevil_fast.data import build_eval_sets

        options = options or EvalOptions()
        sets = {
            t: build_eval_sets(
                t,
                root,
                image_size=image_size,
                batch_size=batch_size,
                backend=backend,
                device=device,
                cache_dir=cache_dir,
                views=options.views,
                eval_resize=options.eval_resize,
            )
            for t in tasks
        }
        return cls(sets, options)

    def report(self, model: FameViL) -> EvalReport:
        """Every set's results. In a distributed run (``shard``, by default the initialised default process
        group) every process must call this: each encodes its share of every set, and process 0 scores and
        gets the report while the others get an empty one. With ``max_samples`` process 0 evaluates alone
        and the others wait for it. An error raised in process 0 (while it scores, say) is raised in every
        process, at the same task, so the processes leave together."""
        shard = self.shard if self.shard is not None else EvalShard.of_process_group()
        if shard.enabled and self.options.max_samples is not None:
            report = shard.on_main(lambda: self._report(model, ONE_PROCESS))
            return report if report is not None else EvalReport()
        return self._report(model, shard)

    def _report(self, model: FameViL, shard: EvalShard) -> EvalReport:
        """Every set's results, each set shared out over ``shard``'s processes."""
        report = EvalReport()
        was_training = model.training
        model.eval()
        try:
            for task, data in self.sets.items():
                if task not in model.config.tasks:
                    raise ValueError(
                        f"cannot evaluate task {task!r}: the model has tasks {model.config.tasks}"
                    )
                for result in EVALUATORS[task](model, data, self.options, shard):
                    report.add(result)
        finally:
            model.train(was_training)
        return report

    def __call__(self, model) -> dict[str, dict]:
        """Scores keyed by ``task/protocol`` (what the trainer logs)."""
        return {f"{r.task}/{r.protocol}": {**r.metrics, "_result": r} for r in self.report(model).results}
