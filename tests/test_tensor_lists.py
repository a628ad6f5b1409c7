"""Multi-tensor operations over lists of mixed dtypes: one call per group, the same values as per tensor."""

import pytest
import torch

from famevil_fast.train.tensor_lists import copy_grouped, norms_grouped, zero_grouped


def mixed_tensors() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [
        torch.randn(3),
        torch.randn(2, 5, dtype=torch.bfloat16),
        torch.randn(4, dtype=torch.bfloat16),
        torch.randn(()),
        torch.randn(7, dtype=torch.float64),
    ]


def counting(monkeypatch, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(torch, name)

    def wrapped(*lists):
        calls.append(len(lists[0]))
        return real(*lists)

    monkeypatch.setattr(torch, name, wrapped)
    return calls


def test_copy_grouped_makes_one_copy_per_pair_of_dtypes(monkeypatch) -> None:
    calls = counting(monkeypatch, "_foreach_copy_")
    dst = [torch.zeros(3), torch.zeros(2), torch.zeros(4, dtype=torch.bfloat16), torch.zeros(1)]
    src = [
        torch.ones(3, dtype=torch.bfloat16),
        torch.ones(2, dtype=torch.bfloat16),
        torch.ones(4),
        torch.ones(1),
    ]
    copy_grouped(dst, src)
    assert sorted(calls) == [1, 1, 2]
    assert all(bool((d == 1).all()) for d in dst)


def test_copy_grouped_refuses_lists_of_different_lengths() -> None:
    with pytest.raises(ValueError, match="2 destinations but 1 sources"):
        copy_grouped([torch.zeros(1), torch.zeros(1)], [torch.ones(1)])


def test_zero_grouped_zeroes_every_tensor_with_one_call_per_dtype(monkeypatch) -> None:
    calls = counting(monkeypatch, "_foreach_zero_")
    tensors = mixed_tensors()
    zero_grouped(tensors)
    assert sorted(calls) == [1, 2, 2]
    assert all(bool((t == 0).all()) for t in tensors)
    zero_grouped([])
    assert sorted(calls) == [1, 2, 2]


def test_norms_grouped_are_each_tensors_norm_with_one_call_per_dtype(monkeypatch) -> None:
    calls = counting(monkeypatch, "_foreach_norm")
    tensors = mixed_tensors()
    norms = norms_grouped(tensors)
    assert sorted(calls) == [1, 2, 2]
    assert norms.dtype == torch.float32 and norms.shape == (len(tensors),)
    expected = sorted(float(torch.linalg.vector_norm(t.double())) for t in tensors)
    torch.testing.assert_close(sorted(norms.tolist()), expected, rtol=1e-2, atol=0)


def test_norms_grouped_sees_a_non_finite_tensor_of_any_dtype() -> None:
    tensors = mixed_tensors()
    tensors[2][1] = float("inf")
    assert not bool(norms_grouped(tensors).isfinite().all())
    tensors = mixed_tensors()
    tensors[4][0] = float("nan")
    assert not bool(norms_grouped(tensors).isfinite().all())
    with pytest.raises(ValueError, match="no tensors"):
        norms_grouped([])
