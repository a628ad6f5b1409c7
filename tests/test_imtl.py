"""IMTL-G: the closed-form weights equalise the projections, and the batched per-tensor combination matches
the one-tensor-at-a-time reference, including absent, all-zero, scalar and parallel task gradients."""

import pytest
import torch

from famevil_fast.train import imtl
from famevil_fast.train.imtl import (
    combine_all_per_tensor,
    combine_each_tensor,
    combine_global,
    imtl_g_weights,
)


@pytest.mark.parametrize("tasks", [2, 3, 4])
def test_weights_equalise_the_projections(tasks):
    g = torch.randn(tasks, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(tasks))
    alpha = imtl_g_weights(g)
    combined = alpha @ g
    projections = (g / g.norm(dim=1, keepdim=True)) @ combined
    assert alpha.sum().item() == pytest.approx(1.0)
    assert torch.allclose(projections, projections[0].expand(tasks), rtol=1e-9)


def _buffers():
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen)

    same = r(4, 3)
    buffers = {
        "itc": {"a": r(4, 3), "b": r(4, 3), "c": r(7), "s": r(1), "w": r(2, 3, 5), "p": same},
        "tgir": {"a": r(4, 3), "b": torch.zeros(4, 3), "c": r(7), "s": r(1), "p": same.clone()},
        "scr": {"a": r(4, 3), "b": r(4, 3), "s": r(1), "w": r(2, 3, 5), "z": torch.zeros(6)},
        "cap": {"a": r(4, 3), "c": r(7), "only": r(3, 3), "w": r(2, 3, 5)},
    }
    buffers["itc"]["z"] = torch.zeros(6)
    return buffers


NAMES = ["a", "b", "c", "s", "w", "p", "z", "only", "untouched"]


def test_batched_combination_matches_the_reference():
    buffers = _buffers()
    expected, got = combine_each_tensor(buffers, NAMES), combine_all_per_tensor(buffers, NAMES)
    assert set(got) == set(expected) == {"a", "b", "c", "s", "w", "p", "only"}  # "z" is all-zero
    for n in expected:
        assert got[n].dtype == expected[n].dtype and got[n].shape == expected[n].shape
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-6, msg=n)
    torch.testing.assert_close(got["p"], buffers["itc"]["p"])  # parallel gradients: the first task's


def test_chunks_give_the_same_result(monkeypatch):
    buffers = _buffers()
    whole = combine_all_per_tensor(buffers, NAMES)
    monkeypatch.setattr(imtl, "_CHUNK_ELEMENTS", 8)
    chunked = combine_all_per_tensor(buffers, NAMES)
    assert set(chunked) == set(whole)
    for n in whole:
        torch.testing.assert_close(chunked[n], whole[n], rtol=0, atol=0)


def test_global_combination_equalises_the_shared_projections():
    buffers = _buffers()
    got = combine_global(buffers, NAMES)
    assert "z" not in got and "untouched" not in got
    torch.testing.assert_close(got["only"], buffers["cap"]["only"])  # one task: its own gradient
    shared = ["a", "b", "c", "s", "w", "p"]  # touched (non-zero) by several tasks
    combined = torch.cat([got[n].flatten() for n in shared]).double()
    for_task = {
        t: torch.cat([b.get(n, torch.zeros_like(got[n])).flatten() for n in shared]).double()
        for t, b in buffers.items()
    }
    projections = [float(combined @ g / g.norm()) for g in for_task.values()]
    assert projections == pytest.approx([projections[0]] * len(projections), rel=1e-4)


def test_no_gradients_combine_to_nothing():
    empty = {"itc": {}, "cap": {}}
    assert combine_all_per_tensor(empty, NAMES) == {} and combine_global(empty, NAMES) == {}


def test_closed_form_on_a_hand_checked_pair():
    """g1 = (1, 0), g2 = (0, 2): D = (1, -2), U = u1 - u2 = (1, -1), g1 U^T = 1, D U^T = 3, so
    alpha = (2/3, 1/3) and the combination (2/3, 2/3) projects 2/3 on both unit gradients."""
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    assert imtl_g_weights(g).tolist() == pytest.approx([2 / 3, 1 / 3])
    buffers = {"itc": {"p": g[0].float()}, "cap": {"p": g[1].float()}}
    for combine in (combine_each_tensor, combine_all_per_tensor, combine_global):
        torch.testing.assert_close(combine(buffers, ["p"])["p"], torch.tensor([2 / 3, 2 / 3]))


@pytest.mark.parametrize(
    "second, want",
    [
        ([2.0, 4.0, 1.0], [4 / 3, 8 / 3, 2 / 3]),  # same direction: alpha = (2/3, 1/3), the limit 1 / |g_t|
        ([-1.0, -2.0, -0.5], [0.0, 0.0, 0.0]),  # opposite directions: alpha = (1/2, 1/2), they cancel
    ],
)
def test_collinear_gradients_take_the_closed_form_s_limit(second, want):
    buffers = {"itc": {"p": torch.tensor([1.0, 2.0, 0.5])}, "scr": {"p": torch.tensor(second)}}
    for combine in (combine_each_tensor, combine_all_per_tensor, combine_global):
        torch.testing.assert_close(combine(buffers, ["p"])["p"], torch.tensor(want))


def test_nearly_collinear_gradients_never_get_arbitrary_weights():
    """g2 = k g1 rounded to float32: both tasks want +g1, and the combination is 2k / (1 + k) g1 (alpha
    proportional to 1 / |g_t|) for every k and size, not rounding noise of either sign; with a third
    independent task the projections stay equal."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(10, 3000, (1,), generator=gen))
        k = float(torch.empty(1).uniform_(0.01, 10, generator=gen))
        g1 = torch.randn(n, generator=gen)
        buffers = {"itc": {"p": g1}, "tgir": {"p": g1 * k}}
        for combine in (combine_each_tensor, combine_all_per_tensor, combine_global):
            got = combine(buffers, ["p"])["p"]
            torch.testing.assert_close(got, g1 * (2 * k / (1 + k)), rtol=1e-5, atol=1e-6, msg=f"{trial} {k}")
        alpha = imtl_g_weights(torch.stack([g1, g1 * k]).double())
        assert alpha.tolist() == pytest.approx([k / (1 + k), 1 / (1 + k)], rel=1e-5)
    g1, g3 = (
        torch.randn(50, generator=gen, dtype=torch.float64),
        torch.randn(50, generator=gen, dtype=torch.float64),
    )
    g = torch.stack([g1, 1.7 * g1, g3])
    combined = imtl_g_weights(g) @ g
    projections = (g / g.norm(dim=1, keepdim=True)) @ combined
    assert projections.tolist() == pytest.approx([float(projections[2])] * 3, rel=1e-6)
    assert float(projections[2]) > 0


def test_an_all_zero_gradient_gets_no_weight():
    g = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]], dtype=torch.float64)
    assert imtl_g_weights(g).tolist() == [1.0, 0.0]
    assert imtl_g_weights(torch.zeros(2, 3)).tolist() == [0.5, 0.5]


def test_16_bit_gradients_are_combined_in_float32():
    """bf16 gradients: the alphas and the weighted sum are not rounded to bf16 (only the result is)."""
    gen = torch.Generator().manual_seed(3)
    wide = {t: torch.randn(4, 64, generator=gen) for t in ("itc", "tgir", "scr")}
    narrow = {t: {"w": g.bfloat16()} for t, g in wide.items()}
    exact = combine_each_tensor({t: {"w": b["w"].float()} for t, b in narrow.items()}, ["w"])["w"]
    for combine in (combine_each_tensor, combine_all_per_tensor, combine_global):
        got = combine(narrow, ["w"])["w"]
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, exact.bfloat16())


def test_one_task_passes_through_and_a_scalar_takes_the_mean():
    buffers = {
        "itc": {"w": torch.tensor([3.0, -1.0]), "s": torch.tensor([2.0])},
        "cap": {"s": torch.tensor([4.0])},
    }
    for combine in (combine_each_tensor, combine_all_per_tensor):
        got = combine(buffers, ["w", "s"])
        torch.testing.assert_close(got["w"], torch.tensor([3.0, -1.0]))
        torch.testing.assert_close(got["s"], torch.tensor([3.0]))


@pytest.mark.parametrize("shape", [(3, 2), (1,)])
def test_a_non_finite_task_gradient_is_not_hidden_by_zero_gradients_of_the_others(shape):
    """One task's gradient of a tensor all NaN, every other task's exactly zero: the combination keeps the
    tensor (non-finite), so that the update's gradient norm fails instead of the NaN passing as untouched."""
    from famevil_fast.train.imtl import combine_all_per_tensor

    buffers = {"itc": {"w": torch.full(shape, float("nan"))}, "cap": {"w": torch.zeros(shape)}}
    combined = combine_all_per_tensor(buffers, ["w"])
    assert "w" in combined and not combined["w"].isfinite().any()
