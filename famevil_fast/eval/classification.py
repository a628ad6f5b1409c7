"""Sub-category recognition (SCR, FashionGen): top-1 accuracy and macro-F1, in percent, on any device.

Predictions are the argmax of the logits (the first maximal class on ties, as ``torch.argmax``).
``macro_f1`` follows scikit-learn's ``f1_score(average="macro")`` exactly: the classes averaged over are
those occurring in the targets or the predictions (sorted union), each class's F1 is 2 TP / (2 TP + FP +
FN), and classes absent from both never enter the average. Every view of every product is one sample
(by default; ``eval.views: first`` keeps one per product).

Category level (BrandonHanx/mmf#14: the 48 FashionGen categories instead of the 121 subcategories): given the
subcategory -> category mapping of the dataset rows, :func:`scr_result` also reports ``category_accuracy``
and ``category_macro_f1`` of the predicted subcategories mapped to their categories. A predicted
subcategory the mapping does not know (none of the evaluated rows has it) has no category: it counts as
wrong, and as no class of the macro average (scikit-learn's ``f1_score`` with ``labels`` = the categories
occurring in the targets or the mapped predictions).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from famevil_fast.eval.report import TaskResult


def as_predictions(
    op: str, outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted class ids, targets) as int64 on one device; ``outputs`` is (N, C) logits or (N,) ids."""
    if (
        not isinstance(targets, torch.Tensor)
        or targets.dim() != 1
        or targets.dtype.is_floating_point
        or targets.dtype in (torch.bool, torch.complex64, torch.complex128)
    ):
        what = f"{targets.dtype} {tuple(targets.shape)}" if isinstance(targets, torch.Tensor) else targets
        raise ValueError(f"{op}: targets must be a 1-D integer tensor of class ids, got {what}")
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"{op}: outputs must be a tensor of logits (N, C) or class ids (N,)")
    if outputs.dim() == 2 and outputs.is_floating_point():
        if outputs.shape[1] == 0:
            raise ValueError(f"{op}: logits have no classes, shape {tuple(outputs.shape)}")
        if not bool(torch.isfinite(outputs).all()):
            raise ValueError(f"{op}: logits contain NaN or Inf")
        preds = outputs.argmax(dim=1)
    elif outputs.dim() == 1 and not outputs.is_floating_point() and outputs.dtype != torch.bool:
        preds = outputs
    else:
        raise ValueError(
            f"{op}: outputs must be float logits (N, C) or integer ids (N,), got {outputs.dtype} "
            f"{tuple(outputs.shape)}"
        )
    if preds.shape[0] != targets.shape[0]:
        raise ValueError(f"{op}: {preds.shape[0]} predictions but {targets.shape[0]} targets")
    if preds.shape[0] == 0:
        raise ValueError(f"{op}: no samples")
    targets = targets.to(preds.device, torch.int64)
    preds = preds.to(torch.int64)
    low = min(int(targets.min()), int(preds.min()))
    if low < 0:
        raise ValueError(f"{op}: class ids must be >= 0, got {low}")
    if outputs.dim() == 2 and int(targets.max()) >= outputs.shape[1]:
        raise ValueError(
            f"{op}: target class {int(targets.max())} is out of range for {outputs.shape[1]} logits"
        )
    return preds, targets


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy in percent; ``outputs`` are (N, C) logits or (N,) predicted class ids."""
    preds, targets = as_predictions("accuracy", outputs, targets)
    return 100.0 * float((preds == targets).double().mean())


def macro_f1(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Macro-averaged F1 in percent with scikit-learn's ``average="macro"`` semantics (module docstring)."""
    preds, targets = as_predictions("macro_f1", outputs, targets)
    return _macro_f1(preds, targets)


def _macro_f1(preds: torch.Tensor, targets: torch.Tensor) -> float:
    """Macro-F1 in percent of non-negative ``targets``; a negative prediction is wrong and no class."""
    size = int(torch.maximum(preds.max(), targets.max())) + 1
    true_count = torch.bincount(targets, minlength=size)
    pred_count = torch.bincount(preds[preds >= 0], minlength=size)
    tp = torch.bincount(targets[preds == targets], minlength=size)
    present = (true_count + pred_count) > 0
    f1 = 2.0 * tp[present].double() / (true_count[present] + pred_count[present]).double()
    return 100.0 * float(f1.mean())


def _frequency_guess_f1(true_count: torch.Tensor) -> float:
    """Large-sample macro-F1 of an image-blind guess drawn from the label frequencies: a class of share p
    gets precision and recall p, so F1 p, and the mean over the K classes present is 1 / K. No image-blind
    guess does better in expectation (a uniform guess among them, or always the majority class, scores at
    most 1 / K), so this is the chance level whatever the classifier's head size."""
    return 100.0 / int(torch.count_nonzero(true_count))


def _scores(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> tuple[float, float, float, float, int]:
    """(accuracy, macro-F1, their chance levels, majority class) of class ids in [0, num_classes);
    a negative prediction is wrong and no class."""
    true_count = torch.bincount(targets, minlength=num_classes)
    majority = int(true_count.argmax())
    constant = torch.full_like(targets, majority)
    return (
        100.0 * float((preds == targets).double().mean()),
        _macro_f1(preds, targets),
        100.0 * max(float(true_count[majority]) / len(targets), 1.0 / num_classes),
        max(_macro_f1(constant, targets), _frequency_guess_f1(true_count)),
        majority,
    )


def category_lookup(
    op: str, categories: Mapping[int, int], num_classes: int
) -> tuple[torch.Tensor, list[int]]:
    """(lookup (max(C, largest subcategory + 1),) int64: subcategory -> index into the sorted category ids,
    -1 where unknown; the sorted category ids) of a subcategory -> category mapping."""
    if not categories:
        raise ValueError(f"{op}: the subcategory -> category mapping is empty")
    for sub, cat in categories.items():
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (sub, cat)):
            raise ValueError(
                f"{op}: the category mapping must map integers to integers, got {sub!r}: {cat!r}"
            )
        if sub < 0:
            raise ValueError(f"{op}: subcategory ids must be >= 0, got {sub} in the category mapping")
    ids = sorted(set(categories.values()))
    index = {c: i for i, c in enumerate(ids)}
    lookup = torch.full((max(num_classes, max(categories) + 1),), -1, dtype=torch.int64)
    for sub, cat in categories.items():
        lookup[sub] = index[cat]
    return lookup, ids


@torch.no_grad()
def scr_result(
    logits: torch.Tensor, targets: torch.Tensor, categories: Mapping[int, int] | None = None
) -> TaskResult:
    """SCR accuracy and macro-F1 of (N, C) logits against (N,) targets, with chance levels.

    Chance for accuracy is the majority-class share (never below 1 / C); chance for macro-F1 is the
    better of always predicting the majority class and guessing uniformly among the C classes.

    With ``categories`` (subcategory id -> category id, e.g. ``SCREval.categories``), the argmax
    subcategories and the targets are also mapped to categories and scored as ``category_accuracy`` and
    ``category_macro_f1``, with chance levels computed the same way over the K categories of the mapping
    (a prediction of a subcategory missing from the mapping is wrong; every target's subcategory must be in
    it). Without it, ``details["category_metrics"]`` says they were skipped.
    """
    op = "scr_result"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{op}: logits must be (N, C), got {getattr(logits, 'shape', logits)}")
    preds, targets = as_predictions(op, logits, targets)
    num_classes = logits.shape[1]
    acc, f1, acc_chance, f1_chance, majority = _scores(preds, targets, num_classes)
    metrics = {"accuracy": acc, "macro_f1": f1}
    chance = {"accuracy": acc_chance, "macro_f1": f1_chance}
    details = {"num_samples": len(targets), "num_classes": num_classes, "majority_class": majority}
    if categories is None:
        details["category_metrics"] = "skipped: no subcategory -> category mapping"
        return TaskResult("scr", "val", metrics, chance, details)
    lookup, ids = category_lookup(op, categories, num_classes)
    lookup = lookup.to(targets.device)
    true_cat, pred_cat = lookup[targets], lookup[preds]
    unknown = targets[true_cat < 0]
    if unknown.numel():
        raise ValueError(
            f"{op}: target subcategory {int(unknown[0])} has no category in the mapping "
            f"({unknown.unique().numel()} such subcategories)"
        )
    acc, f1, acc_chance, f1_chance, majority = _scores(pred_cat, true_cat, len(ids))
    metrics.update(category_accuracy=acc, category_macro_f1=f1)
    chance.update(category_accuracy=acc_chance, category_macro_f1=f1_chance)
    details.update(
        num_categories=len(ids),
        majority_category=ids[majority],
        unmapped_predictions=int((pred_cat < 0).sum()),
    )
    return TaskResult("scr", "val", metrics, chance, details)
