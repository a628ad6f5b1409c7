"""Best-positive rank statistics and the three ties rules, against brute force."""

import itertools
from fractions import Fraction

import pytest
import torch
from test_eval_topk import LargestTensor

from famevil_fast.eval import RankStats, candidate_rank_stats, gallery_rank_stats


def _brute_stats(queries, gallery, qlab, glab):
    """Per query: (#negatives above the best positive, #negatives equal to it, #positives equal to it)."""
    scores = queries.double() @ gallery.double().T
    out = []
    for i in range(len(qlab)):
        pos = glab == qlab[i]
        best = scores[i][pos].max()
        neg = scores[i][~pos]
        out.append((int((neg > best).sum()), int((neg == best).sum()), int((scores[i][pos] == best).sum())))
    return out


def _brute_hit(greater, tied_neg, tied_pos, k, ties):
    """Exact hit probability by enumerating every placement of the tied positives among the tied items."""
    if ties == "optimistic":
        return float(greater < k)
    if ties == "pessimistic":
        return float(greater + tied_neg < k)
    n = tied_neg + tied_pos
    placements = list(itertools.combinations(range(n), tied_pos))
    hits = sum(1 for slots in placements if greater + min(slots) < k)
    return float(Fraction(hits, len(placements)))


def _stats_tuple(stats: RankStats):
    return list(zip(stats.greater.tolist(), stats.tied_negatives.tolist(), stats.tied_positives.tolist()))


@pytest.mark.parametrize("block", [(1, 1), (3, 4), (7, 100), (100, 5)])
@pytest.mark.parametrize("backend", ["blocked", "torch"])
def test_counts_on_tied_integer_scores(block, backend):
    # integer embeddings give exact, frequent ties; several gallery items share a label (multi-view)
    queries = torch.randint(-1, 2, (23, 3)).double()
    gallery = torch.randint(-1, 2, (31, 3)).double()
    glab = torch.randint(0, 6, (31,))
    glab[:6] = torch.arange(6)
    qlab = torch.randint(0, 6, (23,))
    stats = gallery_rank_stats(queries, gallery, qlab, glab, block_size=block, backend=backend)
    assert _stats_tuple(stats) == _brute_stats(queries, gallery, qlab, glab)


@pytest.mark.parametrize("ties", ["expected", "optimistic", "pessimistic"])
def test_hit_rate_matches_enumeration(ties):
    cases = [(0, 0, 1), (0, 3, 1), (2, 4, 2), (4, 5, 3), (1, 0, 2), (9, 2, 1), (0, 6, 4), (3, 3, 3)]
    g, t, p = (torch.tensor(c) for c in zip(*cases))
    stats = RankStats(g, t, p)
    for k in (1, 2, 5, 10):
        expected = torch.tensor([_brute_hit(*c, k, ties) for c in cases], dtype=torch.float64)
        torch.testing.assert_close(stats.hit_rate(k, ties), expected, rtol=0, atol=1e-12)


def test_constant_scores_give_chance_under_expected_ties():
    queries, gallery = torch.ones(4, 5), torch.ones(40, 5)
    stats = gallery_rank_stats(queries, gallery, torch.arange(4), torch.arange(40), backend="blocked")
    assert stats.recall(1) == pytest.approx(100 / 40)
    assert stats.recall(10) == pytest.approx(100 * 10 / 40)
    assert stats.recall(1, "optimistic") == 100.0
    assert stats.recall(1, "pessimistic") == 0.0


def test_candidate_stats_dense():
    scores = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.3, 0.2, 0.3, 0.3]])
    positive = torch.tensor([[True, False, False, False], [False, True, False, True]])
    stats = candidate_rank_stats(scores, positive)
    assert _stats_tuple(stats) == [(1, 1, 1), (0, 2, 1)]
    with pytest.raises(ValueError, match="at least one positive"):
        candidate_rank_stats(scores, torch.zeros_like(positive))


def test_gallery_smaller_than_k_and_single_query():
    queries, gallery = torch.randn(1, 4), torch.randn(3, 4)
    stats = gallery_rank_stats(queries, gallery, torch.tensor([2]), torch.tensor([0, 1, 2]))
    assert stats.recall(10) == 100.0


def test_memory_bounded_by_one_block():
    q, g, d = 200, 300, 4
    queries, gallery = torch.randn(q, d), torch.randn(g, d)
    qlab, glab = torch.randint(0, 50, (q,)), torch.arange(g) % 50
    with LargestTensor() as probe:
        gallery_rank_stats(queries, gallery, qlab, glab, block_size=(40, 60), backend="blocked")
    assert probe.largest <= max(40 * 60, g * d, q * d)


def test_bad_labels():
    queries, gallery = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="no positive in the gallery"):
        gallery_rank_stats(queries, gallery, torch.tensor([0, 1, 9]), torch.arange(5))
    with pytest.raises(ValueError, match="shape"):
        gallery_rank_stats(queries, gallery, torch.tensor([0, 1]), torch.arange(5))
    with pytest.raises(ValueError, match="integer"):
        gallery_rank_stats(queries, gallery, torch.zeros(3), torch.arange(5))
    with pytest.raises(ValueError, match="ties rule"):
        RankStats(torch.zeros(1), torch.zeros(1), torch.ones(1)).hit_rate(1, "random")


def _overflowing():
    """Finite embeddings whose dot products overflow: query 0's positive scores NaN (1e40 - 1e40)."""
    queries = torch.tensor([[1e20, 1e20], [0.0, 1.0], [1.0, 0.0]])
    gallery = torch.tensor([[1e20, -1e20], [0.0, 1.0], [1.0, 0.0]])
    return queries, gallery


@pytest.mark.parametrize("block", [(512, 512), (1, 1), (2, 2)])
@pytest.mark.parametrize("backend", ["blocked", "torch"])
def test_non_finite_scores_raise_instead_of_counting(block, backend):
    queries, gallery = _overflowing()
    labels = torch.arange(3)
    with pytest.raises(ValueError, match="gallery_rank_stats: some similarity scores .* NaN or infinite"):
        gallery_rank_stats(queries, gallery, labels, labels, block_size=block, backend=backend)
    query, items = torch.tensor([[1e20, 1.0]]), torch.tensor([[1e20, 0.0], [0.0, 1.0]])
    with pytest.raises(ValueError, match="NaN or infinite"):  # a negative scores +inf, no NaN anywhere
        gallery_rank_stats(
            query, items, torch.tensor([1]), torch.arange(2), block_size=block, backend=backend
        )
    scores = torch.tensor([[float("nan"), 0.5, 0.1]])
    with pytest.raises(ValueError, match="candidate_rank_stats: .*NaN or infinite"):
        candidate_rank_stats(scores, torch.tensor([[True, False, False]]))


def test_finite_check_reads_back_once_per_call(monkeypatch):
    """The flag stays on the device across blocks: one bool() read-back at the end, not one per block."""
    from famevil_fast.eval import topk

    checks = []
    original = topk.FiniteScores.check
    monkeypatch.setattr(topk.FiniteScores, "check", lambda self: checks.append(1) or original(self))
    queries, gallery = torch.randn(9, 4), torch.randn(11, 4)
    gallery_rank_stats(queries, gallery, torch.arange(9), torch.arange(11), block_size=(2, 3))
    assert checks == [1]
