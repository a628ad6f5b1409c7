"""Pre-training objectives and Cross-Modal Adapter against the official code: PAC's cosine classifier,
and clear errors from the public entry points on bad input."""

import json

import pytest
import torch
import torch.nn.functional as F

from famevil_fast.data.attributes import read_attribute_file
from famevil_fast.model import pretrain_losses as pl
from famevil_fast.model.pretrain import CosineClassifier
from famevil_fast.model.xmodal import CrossModalAdapter, SharedUp, xmodal_parameter_count


# ------------------------------------------------------------------------------------------ PAC head
def test_cosine_classifier_logits_are_cosines_of_embedding_and_class_weights():
    torch.manual_seed(0)
    head = CosineClassifier(6, 4)
    x = torch.randn(5, 6) * 30.0
    want = F.cosine_similarity(x[:, None, :], head.weight[None, :, :], dim=-1)
    got = head(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(head(x * 0.01), got, rtol=1e-5, atol=1e-6)


def test_cosine_classifier_weights_start_standard_normal():
    torch.manual_seed(0)
    weight = CosineClassifier(64, 512).weight.detach()
    assert abs(float(weight.mean())) < 0.02 and abs(float(weight.std()) - 1.0) < 0.02


def test_cosine_classifier_refuses_other_widths():
    with pytest.raises(ValueError, match="dimension 6 got inputs of dimension 5"):
        CosineClassifier(6, 4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="classes >= 1"):
        CosineClassifier(6, 0)


# ------------------------------------------------------------------------------------------ loss inputs
LOGITS = torch.randn(4, 5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: pl.pac_loss(LOGITS, LOGITS, torch.tensor([[7], [0], [1], [2]])), r"\[0, 5\)"),
        (lambda: pl.pac_loss(LOGITS, LOGITS, torch.tensor([[-3], [0], [1], [2]])), r"\[0, 5\)"),
        (lambda: pl.pac_loss(LOGITS, LOGITS, torch.tensor([[1.0], [0], [1], [2]])), "integer"),
        (lambda: pl.pac_loss(LOGITS, LOGITS, torch.tensor([1, 0, 1, 2])), r"\(4, K\)"),
        (lambda: pl.pac_loss(LOGITS, LOGITS, torch.tensor([[1], [0], [1]])), r"\(4, K\)"),
        (lambda: pl.pac_loss(LOGITS, torch.randn(4, 6), torch.tensor([[1]] * 4)), "same shape"),
        (lambda: pl.soft_multi_hot(torch.tensor([1, 2]), 5), r"\(2, K\)"),
        (lambda: pl.itm_pairs(torch.randn(4, 4), torch.zeros(3, 5, dtype=torch.long)), r"\(4, L\)"),
        (lambda: pl.itm_pairs(torch.randn(4, 3), torch.zeros(4, 5, dtype=torch.long)), "square"),
        (lambda: pl.itm_loss(torch.randn(4, 2), torch.tensor([0, 1, 2, 1])), "0 .no match. or 1"),
        (lambda: pl.itm_loss(torch.randn(4, 3), torch.tensor([0, 1, 1, 1])), r"\(B, 2\)"),
        (lambda: pl.itm_loss(torch.randn(4, 2), torch.tensor([0.0, 1, 1, 1])), "integers"),
    ],
)
def test_losses_refuse_bad_inputs_with_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_matching_helpers_accept_an_empty_batch_and_int32_labels():
    empty = pl.hardest_negatives(torch.zeros(0, 0), torch.zeros(0, 5, dtype=torch.long))
    assert empty.shape == (0,) and empty.dtype == torch.long
    index, labels = pl.itm_pairs(torch.zeros(0, 0), torch.zeros(0, 5, dtype=torch.long))
    assert index.shape == labels.shape == (0,)
    logits, labels = torch.randn(4, 2), torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    torch.testing.assert_close(pl.itm_loss(logits, labels), F.cross_entropy(logits, labels.long()))


# ------------------------------------------------------------------------------------- Cross-Modal Adapter
def test_cross_modal_adapter_refuses_bad_sizes_and_inputs():
    with pytest.raises(ValueError, match="r >= 1"):
        CrossModalAdapter(16, 0, 4)
    adapter = CrossModalAdapter(16, 4, 4)
    adapter.bind(SharedUp(4, 4))
    with pytest.raises(ValueError, match="width 16 got inputs of width 8"):
        adapter(torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"d_s=600 must lie in \[0, 512\]"):
        xmodal_parameter_count(768, 512, 12, 8, 600)
    with pytest.raises(ValueError, match="at least 1"):
        xmodal_parameter_count(768, 512, 12, 0, 16)


# ------------------------------------------------------------------------------------------ attribute file
BASE = {"format": "famevil_fast.attributes", "attributes": ["a", "b"], "counts": [3, 2]}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"products": []}, "'products' must map"),
        ({"products": {"train": [1]}}, "split 'train' must map"),
        ({"products": {"train": {"x": [0]}}}, "product id 'x' .train. is not an integer"),
        ({"products": {"train": {"1": 0}}}, "product 1 .train. must list integer"),
        ({"products": {"train": {"1": [0.5]}}}, "product 1 .train. must list integer"),
        ({"attributes": "ab", "counts": [1, 1], "products": {}}, "list of strings"),
        ({"counts": ["3", 2], "products": {}}, "list of integers"),
        ({"counts": [3], "products": {}}, "2 attributes but 1 counts"),
    ],
)
def test_malformed_attribute_files_are_refused_naming_the_file(tmp_path, changes, message):
    path = tmp_path / "attributes.json"
    path.write_text(json.dumps({**BASE, **changes}))
    with pytest.raises(ValueError, match=message) as info:
        read_attribute_file(path)
    assert str(path) in str(info.value)
