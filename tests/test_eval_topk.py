"""Blocked top-k search against a full-matrix float64 computation, and its memory bound."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from famevil_fast.eval import blocked_topk


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _embeddings(n, d, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)


def _reference(q, g, k):
    scores = q.double() @ g.double().T
    return scores.topk(min(k, g.shape[0]), dim=1)


@pytest.mark.parametrize(
    ("q", "g", "k", "block"),
    [
        (1, 1, 1, 1),
        (1, 50, 7, (1, 3)),
        (37, 53, 10, (5, 7)),
        (64, 101, 13, 17),
        (29, 9, 20, (4, 4)),
        (3, 40, 5, (64, 64)),
    ],
)
def test_matches_full_topk(q, g, k, block):
    queries, gallery = _embeddings(q, 24), _embeddings(g, 24)
    values, indices = blocked_topk(queries, gallery, k, block, backend="blocked")
    ref_values, ref_indices = _reference(queries, gallery, k)
    assert values.shape == (q, min(k, g)) and values.dtype == torch.float64 and indices.dtype == torch.int64
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-12)
    assert torch.equal(indices, ref_indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_score_in_float32(dtype):
    queries, gallery = _embeddings(45, 32, dtype), _embeddings(77, 32, dtype)
    values, indices = blocked_topk(queries, gallery, 9, (8, 11), backend="blocked")
    assert values.dtype == torch.float32
    ref_values, ref_indices = _reference(queries, gallery, 9)
    torch.testing.assert_close(values.double(), ref_values, rtol=0, atol=1e-5)
    assert torch.equal(indices, ref_indices)


def test_smallest_and_backends_agree():
    queries, gallery = _embeddings(20, 8), _embeddings(33, 8)
    blocked = blocked_topk(queries, gallery, 4, (3, 5), largest=False, backend="blocked")
    full = blocked_topk(queries, gallery, 4, largest=False, backend="torch")
    assert torch.equal(blocked[1], full[1])
    assert torch.equal(blocked[1], (queries @ gallery.T).topk(4, dim=1, largest=False).indices)


def test_empty_queries():
    values, indices = blocked_topk(_embeddings(0, 8), _embeddings(5, 8), 3, backend="blocked")
    assert values.shape == (0, 3) and indices.shape == (0, 3)


def test_never_allocates_the_score_matrix():
    q, g, d, k = 200, 300, 4, 5
    queries, gallery = _embeddings(q, d, torch.float32), _embeddings(g, d, torch.float32)
    rows, cols = 40, 60
    with LargestTensor() as probe:
        blocked_topk(queries, gallery, k, (rows, cols), backend="blocked")
    assert probe.largest <= max(rows * cols, g * d, q * d)
    with LargestTensor() as full:
        blocked_topk(queries, gallery, k, backend="torch")
    assert full.largest == q * g


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"queries": torch.randn(3, 4), "gallery": torch.randn(5, 6)}, "embedding sizes differ"),
        ({"queries": torch.randn(3, 4), "gallery": torch.randn(5, 4).double()}, "dtype|float64"),
        ({"queries": torch.randn(3), "gallery": torch.randn(5, 4)}, "2-D"),
        ({"queries": torch.randn(3, 4), "gallery": torch.randn(0, 4)}, "empty"),
        ({"queries": torch.full((3, 4), float("nan")), "gallery": torch.randn(5, 4)}, "NaN"),
        (
            {"queries": torch.ones(3, 4, dtype=torch.long), "gallery": torch.ones(5, 4, dtype=torch.long)},
            "dtype",
        ),
        ({"k": 0}, "k must be"),
        ({"block_size": (0, 4)}, "block_size"),
        ({"backend": "cuda"}, "unknown backend"),
    ],
)
def test_bad_input(kwargs, message):
    args = {"queries": torch.randn(3, 4), "gallery": torch.randn(5, 4), "k": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        blocked_topk(**args)


@pytest.mark.parametrize(
    ("bad", "message"), [("queries", "queries contain"), ("gallery", "gallery contains")]
)
def test_non_finite_embeddings_are_named(bad, message):
    args = {"queries": torch.randn(3, 4), "gallery": torch.randn(5, 4)}
    args[bad][1, 2] = float("inf")
    with pytest.raises(ValueError, match=rf"^blocked_topk: {message} NaN or Inf$"):
        blocked_topk(**args, k=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_cpu_reference(dtype):
    queries, gallery = _embeddings(301, 64, dtype), _embeddings(517, 64, dtype)
    values, indices = blocked_topk(queries.cuda(), gallery.cuda(), 11, (64, 100), backend="blocked")
    assert values.dtype == torch.float32 and values.device.type == "cuda"
    ref_values, ref_indices = _reference(queries, gallery, 11)
    torch.testing.assert_close(values.double().cpu(), ref_values, rtol=0, atol=1e-5)
    assert (indices.cpu() == ref_indices).double().mean() > 0.999


@pytest.mark.parametrize("block", [(512, 512), (1, 1), (2, 1)])
@pytest.mark.parametrize("backend", ["blocked", "torch"])
def test_overflowing_scores_raise(block, backend):
    """Finite embeddings whose dot products overflow would put NaN first (or inf) in the top-k values."""
    queries = torch.tensor([[1e20, 1e20], [0.0, 1.0], [1.0, 0.0]])
    gallery = torch.tensor([[1e20, -1e20], [0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(ValueError, match="blocked_topk: some similarity scores .* NaN or infinite"):
        blocked_topk(queries, gallery, 2, block, backend=backend)
