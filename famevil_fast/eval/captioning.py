"""Fashion image captioning (FIC) metrics: BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D (coco-caption).

The scorers are those of ``pycocoevalcap`` 1.2 (the maintained pip release of coco-caption): BLEU with the
"closest" reference length for the brevity penalty, corpus-level; METEOR 1.5 (the jar in the wheel, run
with ``-l en -norm``; needs Java); ROUGE-L (LCS F-measure, beta 1.2, averaged over images); CIDEr-D
(n = 1..4, sigma 6, document frequencies from the evaluated references, so it needs a corpus: one image
alone scores 0). Captions are tokenised first (``caption_tokenize``): PTB by default.

All scores are percentages (BLEU x 100, ..., CIDEr x 100 as in captioning papers). Each prediction has one
reference or a list of references; every view of a product is one image.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from famevil_fast.eval.caption_tokenize import find_java, require_java, tokenize_captions
from famevil_fast.eval.report import TaskResult

CAPTION_METRICS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")
DEFAULT_METRICS = ("bleu4", "meteor", "rouge_l", "cider")

References = Sequence[str] | Sequence[Sequence[str]]


def _check_inputs(op: str, predictions: Sequence[str], references: References) -> list[list[str]]:
    """The references as lists of strings, after checking them and the predictions against them."""
    if isinstance(references, str):
        raise ValueError(f"{op}: predictions and references must be sequences, not one string")
    _check_predictions(op, predictions, len(references))
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, group in enumerate(refs):
        if not group or not all(isinstance(r, str) for r in group):
            raise ValueError(f"{op}: references[{i}] must be a string or a non-empty list of strings")
    return refs


def _check_predictions(op: str, predictions: Sequence[str], n_references: int) -> None:
    if isinstance(predictions, str):
        raise ValueError(f"{op}: predictions and references must be sequences, not one string")
    if len(predictions) != n_references:
        raise ValueError(f"{op}: {len(predictions)} predictions but {n_references} references")
    if not predictions:
        raise ValueError(f"{op}: no predictions")
    for i, p in enumerate(predictions):
        if not isinstance(p, str):
            raise ValueError(f"{op}: predictions[{i}] must be a string, got {type(p).__name__}")


def _check_metrics(op: str, metrics: Sequence[str]) -> tuple[str, ...]:
    if isinstance(metrics, str):
        raise ValueError(
            f"{op}: metrics must be a sequence of metric names, not one string (write ({metrics!r},))"
        )
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in CAPTION_METRICS]
    if unknown or not metrics:
        raise ValueError(f"{op}: unknown or no metrics {unknown or metrics}; choose from {CAPTION_METRICS}")
    return metrics


class _Scorers:
    """The coco-caption scorers for the requested metrics; METEOR keeps one Java process for all calls."""

    def __init__(self, metrics: tuple[str, ...]):
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge

        self.metrics = metrics
        self.bleu = Bleu(4) if any(m.startswith("bleu") for m in metrics) else None
        self.rouge = Rouge() if "rouge_l" in metrics else None
        self.cider = Cider() if "cider" in metrics else None
        self.meteor = None
        if "meteor" in metrics:
            require_java("METEOR 1.5")
            from pycocoevalcap.meteor.meteor import Meteor

            self.meteor = Meteor()

    def close(self) -> None:
        if self.meteor is not None:
            process = self.meteor.meteor_p
            self.meteor = None
            process.kill()
            process.wait()

    def score(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.bleu is not None:
            bleu, _ = self.bleu.compute_score(gts, res, verbose=0)
            out.update({f"bleu{n + 1}": 100.0 * float(b) for n, b in enumerate(bleu)})
        if self.meteor is not None:
            out["meteor"] = 100.0 * self._meteor(gts, res)
        if self.rouge is not None:
            out["rouge_l"] = 100.0 * float(self.rouge.compute_score(gts, res)[0])
        if self.cider is not None:
            out["cider"] = 100.0 * float(self.cider.compute_score(gts, res)[0])
        return {m: out[m] for m in self.metrics}

    def _meteor(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
        clean = lambda texts: [t.replace("|||", " ") for t in texts]
        try:
            return float(
                self.meteor.compute_score(
                    {k: clean(v) for k, v in gts.items()}, {k: clean(v) for k, v in res.items()}
                )[0]
            )
        except (ValueError, OSError) as err:
            process = self.meteor.meteor_p
            process.kill()
            message = process.stderr.read().decode(errors="replace")[-2000:]
            self.meteor = None
            raise RuntimeError(f"METEOR 1.5 (java) failed: {message or err}") from err


def _tokenized(predictions: Sequence[str], refs: list[list[str]], tokenizer: str):
    flat = [r for group in refs for r in group]
    tokens, used = tokenize_captions(list(predictions) + flat, tokenizer)
    pred_tokens, ref_tokens = tokens[: len(predictions)], tokens[len(predictions) :]
    gts, start = {}, 0
    for i, group in enumerate(refs):
        gts[i] = ref_tokens[start : start + len(group)]
        start += len(group)
    if not any(r.strip() for r in ref_tokens):
        raise ValueError("caption metrics: every reference is empty after tokenisation")
    return {i: [p] for i, p in enumerate(pred_tokens)}, gts, used


def caption_scores(
    predictions: Sequence[str],
    references: References,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenizer: str = "ptb",
) -> dict[str, float]:
    """coco-caption scores (percent) of ``predictions`` against ``references`` (one string or a list each).

    ``metrics`` from bleu1..bleu4, meteor, rouge_l, cider. ``tokenizer``: "ptb" (Java; the standard),
    "simple" (pure Python) or "auto" (ptb when Java is found). METEOR always needs Java.
    """
    return caption_scores_of_sets([predictions], references, metrics=metrics, tokenizer=tokenizer)[0]


def caption_scores_of_sets(
    prediction_sets: Sequence[Sequence[str]],
    references: References,
    *,
    metrics: Sequence[str] = DEFAULT_METRICS,
    tokenizer: str = "ptb",
) -> list[dict[str, float]]:
    """``caption_scores`` of several sets of predictions against the same references, tokenising everything
    in one pass and loading the scorers once."""
    op = "caption_scores"
    if not prediction_sets:
        raise ValueError(f"{op}: no prediction sets")
    refs = _check_inputs(op, prediction_sets[0], references)
    for predictions in prediction_sets[1:]:
        _check_predictions(op, predictions, len(refs))
    metrics = _check_metrics(op, metrics)
    res, gts, _ = _tokenized([p for predictions in prediction_sets for p in predictions], refs, tokenizer)
    n = len(refs)
    scorers = _Scorers(metrics)
    try:
        return [
            scorers.score(gts, {i: res[k * n + i] for i in range(n)}) for k in range(len(prediction_sets))
        ]
    finally:
        scorers.close()


def constant_caption(gts: dict[int, list[str]]) -> str:
    """The most frequent first reference (first seen wins ties).

    Scoring it for every image is the 'same caption for every image' baseline."""
    counts = Counter(group[0] for group in gts.values())
    return max(counts, key=counts.get)


def constant_caption_baseline(gts: dict[int, list[str]], score: Callable[[dict, dict], dict]) -> dict:
    """The scores (``score(gts, res)``) of :func:`constant_caption` given to every image whose references
    do not include it (all images when it is a reference of every one): on the images it was taken from it
    would be an exact copy of their reference, not a guess."""
    constant = constant_caption(gts)
    others = {k: refs for k, refs in gts.items() if constant not in refs} or gts
    return score(others, {k: [constant] for k in others})


def fic_result(
    predictions: Sequence[str],
    references: References,
    *,
    metrics: Sequence[str] | None = None,
    tokenizer: str = "auto",
    baseline: bool = True,
) -> TaskResult:
    """FIC scores as a TaskResult. The chance column is the constant-caption baseline (the most frequent
    reference given to every image it is not a reference of, :func:`constant_caption_baseline`) when
    ``baseline``; else None. With ``metrics=None`` all four headline metrics
    are computed, METEOR only when Java is found (details record the tokeniser and any metric skipped).
    """
    op = "fic_result"
    refs = _check_inputs(op, predictions, references)
    res, gts, used = _tokenized(predictions, refs, tokenizer)
    skipped = []
    if metrics is None:
        metrics = DEFAULT_METRICS
        if find_java() is None:
            metrics = tuple(m for m in metrics if m != "meteor")
            skipped.append("meteor")
    metrics = _check_metrics(op, metrics)
    scorers = _Scorers(metrics)
    try:
        scores = scorers.score(gts, res)
        chance: dict[str, float | None] = dict.fromkeys(metrics)
        if baseline:
            chance = constant_caption_baseline(gts, scorers.score)
    finally:
        scorers.close()
    details = {
        "num_images": len(res),
        "tokenizer": used,
        "scorer": "pycocoevalcap",
        "chance": "constant caption, on the images it is no reference of" if baseline else "none",
    }
    if skipped:
        details["skipped"] = ",".join(skipped) + " (no Java)"
    return TaskResult("fic", "coco-caption", scores, chance, details)
