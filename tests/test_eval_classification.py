"""SCR accuracy and macro-F1: equality with scikit-learn's f1_score(average="macro") on random cases."""

import pytest
import torch
from sklearn.metrics import f1_score

from famevil_fast.eval import accuracy, macro_f1, scr_result


@pytest.mark.parametrize("case", range(30))
def test_macro_f1_matches_sklearn(case):
    g = torch.Generator().manual_seed(case)
    n = int(torch.randint(1, 60, (1,), generator=g))
    classes = int(torch.randint(1, 12, (1,), generator=g))
    targets = torch.randint(0, classes, (n,), generator=g)
    # some classes occur only in the predictions, some only in the targets, some nowhere
    preds = torch.where(
        torch.rand(n, generator=g) < 0.5, targets, torch.randint(0, classes + 3, (n,), generator=g)
    )
    expected = 100 * f1_score(targets.numpy(), preds.numpy(), average="macro", zero_division=0)
    assert macro_f1(preds, targets) == pytest.approx(expected, abs=1e-10)


def test_logits_use_argmax_first_on_ties():
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [0.0, 0.0, 3.0]])
    targets = torch.tensor([0, 1, 2])
    assert accuracy(logits, targets) == 100.0
    assert macro_f1(logits, targets) == 100.0
    assert accuracy(torch.tensor([0, 2, 2]), targets) == pytest.approx(200 / 3)


def test_scr_result_and_chance():
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 1, 2, 0]), 4).float()
    result = scr_result(logits, targets)
    preds = logits.argmax(1)
    assert result.metrics["accuracy"] == pytest.approx(100 * 4 / 6)
    assert result.metrics["macro_f1"] == pytest.approx(100 * f1_score(targets, preds, average="macro"))
    assert result.chance["accuracy"] == pytest.approx(50.0)
    majority_f1 = 100 * f1_score(targets, torch.zeros(6, dtype=torch.long), average="macro", zero_division=0)
    assert result.chance["macro_f1"] == pytest.approx(100 / 3)  # 3 classes present, 4 in the head
    assert result.chance["macro_f1"] > majority_f1
    assert result.details == {
        "num_samples": 6,
        "num_classes": 4,
        "majority_class": 0,
        "category_metrics": "skipped: no subcategory -> category mapping",
    }
    assert set(result.metrics) == {"accuracy", "macro_f1"}


def test_bad_input():
    with pytest.raises(ValueError, match="predictions but"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(ValueError, match="out of range"):
        scr_result(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=">= 0"):
        macro_f1(torch.tensor([0, -1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        accuracy(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="no samples"):
        accuracy(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        accuracy(torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]))


def test_macro_f1_averages_the_classes_present_not_all_121():
    """The official sklearn macro-F1, i.e. over the classes occurring in the targets or the predictions,
    not over the 121 logit columns (which would divide by 121), nor over the target classes only."""
    preds = torch.tensor([5, 7, 7, 9, 9, 120])
    targets = torch.tensor([5, 5, 7, 9, 9, 7])
    logits = torch.nn.functional.one_hot(preds, 121).float()
    # F1 = 2 TP / (2 TP + FP + FN): class 5 TP 1 FN 1 -> 2/3; class 7 TP 1 FP 1 FN 1 -> 1/2;
    # class 9 -> 1; class 120 (predicted once, never a target) FP 1 -> 0
    result = scr_result(logits, targets)
    assert result.metrics["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1 + 0) / 4)
    assert result.metrics["accuracy"] == pytest.approx(100 * 4 / 6)


# ---------------------------------------------------------------- category level (mmf#14)


@pytest.mark.parametrize("case", range(20))
def test_category_scores_are_the_subcategory_predictions_mapped_and_match_sklearn(case):
    """BrandonHanx/mmf#14: category-level accuracy and macro-F1 from the subcategory predictions
    through the subcategory -> category mapping; equal to scikit-learn on the mapped labels. A predicted
    subcategory the mapping does not know is wrong and is no class of the average."""
    g = torch.Generator().manual_seed(case)
    n, classes = int(torch.randint(1, 80, (1,), generator=g)), int(torch.randint(2, 15, (1,), generator=g))
    known = sorted(set(torch.randint(0, classes, (classes,), generator=g).tolist()))
    # category ids need not be small or contiguous
    mapping = {sub: 1000 + 7 * int(torch.randint(0, 4, (1,), generator=g)) for sub in known}
    targets = torch.tensor(known)[torch.randint(0, len(known), (n,), generator=g)]
    logits = torch.randn(n, classes, generator=g)
    result = scr_result(logits, targets, mapping)
    preds = logits.argmax(1)
    true_cat = [mapping[t] for t in targets.tolist()]
    pred_cat = [mapping.get(p, -1) for p in preds.tolist()]
    labels = sorted(set(true_cat) | {c for c in pred_cat if c >= 0})
    expected_f1 = 100 * f1_score(true_cat, pred_cat, labels=labels, average="macro", zero_division=0)
    expected_acc = 100 * sum(a == b for a, b in zip(true_cat, pred_cat)) / n
    assert result.metrics["category_accuracy"] == pytest.approx(expected_acc, abs=1e-10)
    assert result.metrics["category_macro_f1"] == pytest.approx(expected_f1, abs=1e-10)
    assert result.details["unmapped_predictions"] == sum(c < 0 for c in pred_cat)
    num_categories = len(set(mapping.values()))
    assert result.details["num_categories"] == num_categories
    # the subcategory scores are unchanged by the mapping
    plain = scr_result(logits, targets)
    assert {k: result.metrics[k] for k in plain.metrics} == plain.metrics
    # chance, computed as for subcategories: majority share (>= 1 / K) and the better of the majority
    # predictor and the uniform guess among the K categories
    counts = torch.bincount(torch.tensor([labels.index(c) if c in labels else 0 for c in true_cat]))
    share = max(counts.max().item() / n, 1 / num_categories)
    assert result.chance["category_accuracy"] == pytest.approx(100 * share)
    majority = max(set(true_cat), key=lambda c: (true_cat.count(c), -c))
    majority_f1 = 100 * f1_score(true_cat, [majority] * n, average="macro", zero_division=0)
    assert result.chance["category_macro_f1"] >= majority_f1 - 1e-9
    assert result.details["majority_category"] == majority


def test_macro_f1_chance_is_what_an_image_blind_guess_scores():
    """A guess drawn from the label frequencies scores macro-F1 1 / K over the K classes present (measured
    here on a large sample), whatever the head's size; guessing uniformly among them scores less."""
    rng = torch.Generator().manual_seed(0)
    shares = torch.tensor([0.5, 0.3, 0.15, 0.05])
    targets = torch.multinomial(shares, 200_000, replacement=True, generator=rng)
    chance = scr_result(torch.zeros(len(targets), 121), targets).chance["macro_f1"]
    assert chance == pytest.approx(25.0)
    guess = torch.multinomial(shares, len(targets), replacement=True, generator=rng)
    assert macro_f1(guess, targets) == pytest.approx(chance, abs=0.3)
    uniform = torch.randint(0, 4, (len(targets),), generator=rng)
    assert macro_f1(uniform, targets) < chance - 1


def test_category_scores_by_hand():
    # subcategories 0, 1 -> category 10; 2 -> 20; 3 -> 30; subcategory 4 is unknown to the mapping
    mapping = {0: 10, 1: 10, 2: 20, 3: 30}
    targets = torch.tensor([0, 1, 2, 2, 3, 3])
    preds = torch.tensor([1, 0, 2, 4, 3, 1])  # two wrong subcategories within the right category
    logits = torch.nn.functional.one_hot(preds, 5).float()
    result = scr_result(logits, targets, mapping)
    assert result.metrics["accuracy"] == pytest.approx(100 * 2 / 6)
    assert result.metrics["category_accuracy"] == pytest.approx(100 * 4 / 6)
    # category 10: TP 2, FP 1 -> 4/5; category 20: TP 1, FN 1 -> 2/3; category 30: TP 1, FN 1 -> 2/3
    assert result.metrics["category_macro_f1"] == pytest.approx(100 * (4 / 5 + 2 / 3 + 2 / 3) / 3)
    assert result.chance["category_accuracy"] == pytest.approx(100 / 3)  # 2 of 6 each; 1 / K = 1 / 3
    assert result.details["unmapped_predictions"] == 1 and result.details["num_categories"] == 3
    assert "category_metrics" not in result.details


def test_category_mapping_errors():
    logits, targets = torch.randn(3, 4), torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="target subcategory 3 has no category"):
        scr_result(logits, targets, {0: 1, 1: 1})
    with pytest.raises(ValueError, match="mapping is empty"):
        scr_result(logits, targets, {})
    with pytest.raises(ValueError, match="integers to integers"):
        scr_result(logits, targets, {0: 1.5, 1: 1, 3: 2})


def test_bool_targets_are_refused_as_outputs_are():
    from famevil_fast.eval.classification import accuracy, macro_f1

    for metric in (accuracy, macro_f1):
        with pytest.raises(
            ValueError, match=r"targets must be a 1-D integer tensor of class ids, got torch.bool"
        ):
            metric(torch.tensor([0, 1]), torch.tensor([False, True]))
