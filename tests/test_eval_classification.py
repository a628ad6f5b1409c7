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
    assert result.chance["macro_f1"] >= majority_f1
    assert result.details == {"num_samples": 6, "num_classes": 4, "majority_class": 0}


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
    """FAMEVIL.md 2.3: sklearn macro-F1, i.e. over the classes occurring in the targets or the predictions,
    not over the 121 logit columns (which would divide by 121), nor over the target classes only."""
    preds = torch.tensor([5, 7, 7, 9, 9, 120])
    targets = torch.tensor([5, 5, 7, 9, 9, 7])
    logits = torch.nn.functional.one_hot(preds, 121).float()
    # F1 = 2 TP / (2 TP + FP + FN): class 5 TP 1 FN 1 -> 2/3; class 7 TP 1 FP 1 FN 1 -> 1/2;
    # class 9 -> 1; class 120 (predicted once, never a target) FP 1 -> 0
    result = scr_result(logits, targets)
    assert result.metrics["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 1 + 0) / 4)
    assert result.metrics["accuracy"] == pytest.approx(100 * 4 / 6)
