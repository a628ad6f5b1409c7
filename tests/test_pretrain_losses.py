"""Pre-training objectives (MVC, PAC, ITM): losses against plain-PyTorch references (values and gradients),
hard-negative choice, the task forwards of the model, and input errors."""

import pytest
import torch
import torch.nn.functional as F
from helpers import token_batch

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model import pretrain_losses as pl

TASKS = ("itc", "mvc", "pac", "itm")


def _model(**kw) -> FameViL:
    cfg = dict(clip=clip_preset("micro"), tasks=TASKS, num_attributes=9, adapter_bottleneck=8)
    cfg.update(kw)
    return FameViL(FameViLConfig(**cfg))


def _grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


# ------------------------------------------------------------------------------------------ MVC
def _info_nce_reference(a, b, scale):
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


@pytest.mark.parametrize("batch", [1, 5, 13])
@pytest.mark.parametrize("backend", ["torch", "cpu", None])
def test_mvc_loss_matches_reference(batch, backend):
    g = torch.Generator().manual_seed(batch)
    image = F.normalize(torch.randn(batch, 7, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    fused = F.normalize(torch.randn(batch, 7, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
    got = pl.mvc_loss(image, fused, scale, backend=backend)
    want = _info_nce_reference(image, fused, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-8)
    for a, b in zip(_grads(got, (image, fused, scale)), _grads(want, (image, fused, scale))):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-8)


def test_mvc_loss_with_a_gather_scores_local_rows_against_gathered_columns():
    image = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    fused = F.normalize(torch.randn(6, 5, dtype=torch.float64), dim=-1)
    local = slice(2, 4)  # this process holds rows 2..3 of a global batch of 6
    mine_image, mine_fused = image[local], fused[local]
    got = pl.mvc_loss(mine_image, mine_fused, 4.0, gather=lambda t: (image if t is mine_image else fused, 2))
    logits = 4.0 * image @ fused.T
    target = torch.tensor([2, 3])
    want = 0.5 * (F.cross_entropy(logits[local], target) + F.cross_entropy(logits.T[local], target))
    torch.testing.assert_close(got.double(), want)


# ------------------------------------------------------------------------------------------ PAC
def _pac_reference(image_logits, text_logits, attribute_ids):
    total, rows = 0.0, 0
    for i, ids in enumerate(attribute_ids.tolist()):
        chosen = sorted({a for a in ids if a >= 0})
        if not chosen:
            continue
        target = torch.zeros(image_logits.shape[1], dtype=image_logits.dtype)
        target[chosen] = 1.0 / len(chosen)
        for logits in (image_logits[i], text_logits[i]):
            total = total - (target * torch.log_softmax(logits, dim=0)).sum()
        rows += 1
    return total / max(rows, 1)


def test_soft_multi_hot_spreads_over_distinct_attributes():
    ids = torch.tensor([[2, 0, -1], [-1, -1, -1], [1, 1, 3], [4, -1, -1]])
    target = pl.soft_multi_hot(ids, 5)
    want = torch.tensor([[0.5, 0, 0.5, 0, 0], [0, 0, 0, 0, 0], [0, 0.5, 0, 0.5, 0], [0, 0, 0, 0, 1.0]])
    torch.testing.assert_close(target, want)


@pytest.mark.parametrize("batch, classes, k", [(1, 3, 1), (6, 11, 4), (9, 37, 7)])
def test_pac_loss_matches_reference(batch, classes, k):
    g = torch.Generator().manual_seed(classes)
    image = torch.randn(batch, classes, generator=g, dtype=torch.float64, requires_grad=True)
    text = torch.randn(batch, classes, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(-1, classes, (batch, k), generator=g)
    ids[0, 0] = 0  # at least one row with an attribute
    got = pl.pac_loss(image, text, ids)
    want = _pac_reference(image, text, ids)
    torch.testing.assert_close(got, want)
    for a, b in zip(_grads(got, (image, text)), _grads(want, (image, text))):
        torch.testing.assert_close(a, b)


def test_pac_loss_without_attributes_is_zero_with_a_graph():
    image = torch.randn(3, 4, requires_grad=True)
    loss = pl.pac_loss(image, image * 2, torch.full((3, 2), -1))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(image.grad, torch.zeros(3, 4))


# ------------------------------------------------------------------------------------------ ITM
def _hardest_reference(sim, ids):
    out = []
    for i in range(sim.shape[0]):
        best, index = -float("inf"), -1
        for j in range(sim.shape[1]):
            if torch.equal(ids[i], ids[j]):
                continue
            if sim[i, j] > best:
                best, index = float(sim[i, j]), j
        out.append(index)
    return torch.tensor(out)


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_hardest_negatives_match_brute_force(batch):
    g = torch.Generator().manual_seed(batch)
    sim = torch.randn(batch, batch, generator=g)
    ids = token_batch(batch, seed=batch)
    if batch > 2:
        ids[2] = ids[0]  # identical texts are never each other's negative
    torch.testing.assert_close(pl.hardest_negatives(sim, ids), _hardest_reference(sim, ids))


def test_itm_pairs_swap_every_second_text():
    sim = torch.tensor(
        [[1.0, 0.9, 0.1, 0.2], [0.3, 1.0, 0.8, 0.1], [0.5, 0.2, 1.0, 0.4], [0.7, 0.1, 0.2, 1.0]]
    )
    index, labels = pl.itm_pairs(sim, token_batch(4, seed=3))
    assert index.tolist() == [0, 2, 2, 0]
    assert labels.tolist() == [1, 0, 1, 0]


def test_itm_loss_matches_cross_entropy():
    logits = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 0, 1, 0, 1, 1])
    got = pl.itm_loss(logits, labels)
    want = -torch.log_softmax(logits, dim=1)[torch.arange(6), labels].mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(_grads(got, logits)[0].double(), _grads(want, logits)[0], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ model forwards
def _batch(b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pixels": torch.randn(b, 3, 32, 32, generator=g),
        "fused_pixels": torch.randn(b, 3, 32, 32, generator=g),
        "input_ids": token_batch(b, seed=seed),
        "attribute_ids": torch.tensor([[0, 3, -1], [8, -1, -1], [-1, -1, -1], [2, 2, 6], [5, 4, 3]])[:b],
    }


class OneOfTwoProcesses:
    """The gather of one of two processes holding ``counts`` rows (or counted rows), without collectives:
    ``mean_count`` and ``row_weight`` give what the distributed gather's all-reduce would."""

    def __init__(self, counts: tuple[float, float], rank: int) -> None:
        self.counts, self.rank = counts, rank

    def mean_count(self, n: torch.Tensor) -> torch.Tensor:
        assert float(n) == self.counts[self.rank]
        return torch.tensor(sum(self.counts) / 2)

    def row_weight(self, rows: int, device: torch.device, total: int | None = None) -> float:
        return rows * 2 / sum(self.counts)


def test_pac_and_itm_losses_of_unequal_processes_average_to_the_global_batch():
    """DDP averages the processes' losses equally: with 3 and 4 rows (and rows without attributes) the
    weighted per-process losses average to the loss of all 7 rows in one process."""
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(7, 6, generator=g), torch.randn(7, 6, generator=g)
    attributes = torch.tensor([[0, 2], [-1, -1], [1, -1], [5, 3], [-1, -1], [4, -1], [2, 1]])
    whole = pl.pac_loss(image, text, attributes)
    halves = (slice(0, 3), slice(3, 7))
    counted = tuple(float((attributes[h] >= 0).any(dim=1).sum()) for h in halves)
    parts = [
        pl.pac_loss(image[h], text[h], attributes[h], OneOfTwoProcesses(counted, r))
        for r, h in enumerate(halves)
    ]
    assert torch.allclose((parts[0] + parts[1]) / 2, whole)
    unweighted = [pl.pac_loss(image[h], text[h], attributes[h]) for h in halves]
    assert not torch.allclose((unweighted[0] + unweighted[1]) / 2, whole)  # what equal averaging gave
    # fewer rows with attributes than processes: the mean count is 0.5, and must not be rounded up to 1
    sparse = torch.full_like(attributes, -1)
    sparse[1, 0] = 3
    counted = (1.0, 0.0)
    parts = [
        pl.pac_loss(image[h], text[h], sparse[h], OneOfTwoProcesses(counted, r)) for r, h in enumerate(halves)
    ]
    assert torch.allclose((parts[0] + parts[1]) / 2, pl.pac_loss(image, text, sparse))
    logits, labels = torch.randn(7, 2, generator=g), torch.tensor([1, 0, 1, 1, 0, 1, 0])
    rows = (3.0, 4.0)
    parts = [pl.itm_loss(logits[h], labels[h], OneOfTwoProcesses(rows, r)) for r, h in enumerate(halves)]
    assert torch.allclose((parts[0] + parts[1]) / 2, pl.itm_loss(logits, labels))


def test_mvc_forward_scores_view_a_against_fused_view_b():
    model, batch = _model(), _batch()
    out = model(batch, "mvc")
    image = F.normalize(model.image_features(batch["pixels"], "mvc"), dim=-1)
    v, t = model.fused_features(batch["fused_pixels"], batch["input_ids"], "mvc")
    want = _info_nce_reference(image, F.normalize(v + t, dim=-1), model.heads["mvc"].norm_s.square())
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)


def test_pac_forward_uses_one_cosine_classifier_for_both_modalities():
    model, batch = _model(), _batch()
    out = model(batch, "pac")
    weight = model.heads["pac"].weight
    unit = weight / weight.norm(dim=1, keepdim=True)
    image = model.image_features(batch["pixels"], "pac")
    text = model.text_features(batch["input_ids"], "pac")
    image_logits = (image / image.norm(dim=1, keepdim=True)) @ unit.T
    text_logits = (text / text.norm(dim=1, keepdim=True)) @ unit.T
    torch.testing.assert_close(out.outputs["image_logits"], image_logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        out.loss, _pac_reference(image_logits, text_logits, batch["attribute_ids"]), rtol=1e-5, atol=1e-6
    )
    out.loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tasks", [TASKS, ("mvc", "itm")])
def test_itm_forward_pairs_hard_negatives_from_two_tower_similarity(tasks):
    model, batch = _model(tasks=tasks), _batch(6)
    out = model(batch, "itm")
    source = "itc" if "itc" in tasks else "itm"
    with torch.no_grad():
        image = F.normalize(model.image_features(batch["pixels"], source), dim=-1)
        text = F.normalize(model.text_features(batch["input_ids"], source), dim=-1)
    index, labels = pl.itm_pairs(image @ text.T, batch["input_ids"])
    assert torch.equal(out.outputs["text_index"], index) and torch.equal(out.outputs["labels"], labels)
    v, t = model.fused_features(batch["pixels"], batch["input_ids"][index], "itm")
    want = F.cross_entropy(model.heads["itm"](v + t), labels)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    assert model.heads["itm"].weight.grad.abs().sum() > 0


def test_pretraining_tasks_have_their_own_adapters_and_heads():
    model = _model()
    counts = model.parameter_counts()
    assert counts["tsa.mvc"] == counts["tsa.pac"] == counts["tsa.itm"] == counts["tsa.itc"] > 0
    assert sorted(model.heads) == ["itc", "itm", "mvc", "pac"]
    assert model.heads["pac"].weight.shape == (9, model.config.clip.embed_dim)


def test_mixed_pass_equals_separate_forwards():
    model, batch = _model(), _batch()
    batches = {
        "itc": {k: batch[k] for k in ("pixels", "input_ids")},
        "mvc": batch,
        "pac": batch,
        "itm": batch,
    }
    mixed = model.forward_mixed(batches)
    assert list(mixed) == list(batches)
    for task, b in batches.items():
        torch.testing.assert_close(mixed[task].loss, model(b, task).loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "ids, message",
    [
        (torch.tensor([[0, 9]] * 5), r"\[0, 9\)"),
        (torch.tensor([[0, -2]] * 5), r"\[0, 9\)"),
        (torch.zeros(5, 2), "integer"),
        (torch.zeros(4, 2, dtype=torch.long), r"\(5, K\)"),
    ],
)
def test_bad_attribute_ids(ids, message):
    model, batch = _model(), _batch()
    with pytest.raises(ValueError, match=message):
        model({**batch, "attribute_ids": ids}, "pac")


def test_bad_batches_and_configs():
    model, batch = _model(), _batch()
    with pytest.raises(ValueError, match="fused_pixels"):
        model({k: v for k, v in batch.items() if k != "fused_pixels"}, "mvc")
    with pytest.raises(ValueError, match="batch sizes differ"):
        model({**batch, "fused_pixels": batch["fused_pixels"][:3]}, "mvc")
    with pytest.raises(ValueError, match="num_attributes"):
        FameViLConfig(clip=clip_preset("micro"), tasks=("pac",))
    with pytest.raises(ValueError, match="xaa='both'"):
        FameViLConfig(clip=clip_preset("micro"), tasks=("mvc",), xaa="text")
    with pytest.raises(ValueError, match="unknown task"):
        FameViLConfig(clip=clip_preset("micro"), tasks=("mlm",))


def test_itm_forward_checks_no_labels_on_the_host(monkeypatch):
    """The labels of the ITM forward come from itm_pairs (0 / 1 by construction): no read-back checks them."""
    model, batch = _model(tasks=("itm",)), _batch(6)

    def no_host_reads():
        raise AssertionError("itm_loss read the labels back")

    monkeypatch.setattr(pl, "host_reads_allowed", no_host_reads)
    model(batch, "itm").loss.backward()
    with pytest.raises(AssertionError, match="read the labels back"):
        pl.itm_loss(torch.zeros(2, 2), torch.tensor([0, 1]))
