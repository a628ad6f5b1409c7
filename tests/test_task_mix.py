"""Mixed-task layouts: ``task_mix`` segments and ``per_segment``, which runs each task's samples apart."""

from __future__ import annotations

import pytest
import torch
from helpers import AtenLog

from famevil_fast.model.task_mix import per_segment, task_mix


def test_per_segment_runs_each_segment_and_splits_its_inputs_once() -> None:
    """Outputs in batch order, gradients as for the whole batch, and a backward that concatenates the
    segments' gradients once per input instead of one zero-filled whole-batch gradient per segment."""
    mix = task_mix([2, 0, 1], [3, 0, 4], "cpu")  # the empty segment of task 0 is dropped
    assert mix.segments == ((2, 0, 3), (1, 3, 7))
    x = torch.randn(7, 5, requires_grad=True)
    branch = torch.randn(7, 5, requires_grad=True)

    def run(position: int, parts: list[torch.Tensor]) -> torch.Tensor:
        return (position + 1) * parts[0] + parts[1].sin()

    y = per_segment(mix, [x, branch], run)
    scale = torch.tensor([3.0] * 3 + [2.0] * 4).unsqueeze(1)
    torch.testing.assert_close(y, scale * x + branch.sin())
    grad = torch.randn(7, 5)
    with AtenLog() as log:
        gx, gb = torch.autograd.grad(y, [x, branch], grad)
    torch.testing.assert_close(gx, scale * grad)
    torch.testing.assert_close(gb, branch.cos() * grad)
    assert "slice_backward" not in log.ops and log.ops.count("add") == 0, log.ops


def test_segments_that_do_not_cover_the_batch_are_refused() -> None:
    mix = task_mix([0, 1], [2, 3], "cpu")
    with pytest.raises(RuntimeError, match="split"):
        per_segment(mix, [torch.randn(6, 4)], lambda position, parts: parts[0])


def test_cross_modal_adapters_of_a_mixed_batch_match_each_task_alone() -> None:
    from famevil_fast.model.xmodal import CrossModalTaskAdapters, SharedUp

    torch.manual_seed(0)
    adapters = CrossModalTaskAdapters(16, 4, 2, ("itc", "tgir", "scr"))
    shared = [SharedUp(4, 2) for _ in adapters.tasks]
    for adapter, up in zip(adapters.adapters.values(), shared):
        adapter.bind(up)
    for p in [*adapters.parameters(), *(q for up in shared for q in up.parameters())]:
        torch.nn.init.normal_(p, std=0.3)
    y = torch.randn(5, 3, 16, requires_grad=True)
    mix = task_mix([2, 0], [2, 3], "cpu")
    out = adapters(y, mix)
    alone = torch.cat([adapters(y[:2], "scr"), adapters(y[2:], "itc")])
    torch.testing.assert_close(out, alone)
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, y, grad)
    (want,) = torch.autograd.grad(alone, y, grad)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    ("sizes", "grouped"),
    [((2, 3), True), ((4, 2), True), ((5, 4), False)],  # 5 and 3 chunks; 9 chunks of one sample: too many
)
def test_task_adapters_add_the_other_branches_over_the_whole_batch(sizes, grouped) -> None:
    """A mixed batch through the reference adapters equals each task alone, values and gradients; the
    branches summed with the adapters are never split. Segments that split into a few equal chunks run as
    batched products (no split or concatenation at all); other layouts one segment at a time, whose backward
    puts back together only x's gradient (one concatenation)."""
    from famevil_fast.model.adapters import TaskAdapters
    from famevil_fast.model.task_mix import equal_chunks

    torch.manual_seed(0)
    adapters = TaskAdapters(16, 4, ("itc", "tgir", "scr")).double()
    for adapter in adapters.adapters.values():
        adapter.backend = "torch"
    for p in adapters.parameters():
        torch.nn.init.normal_(p, std=0.3)
    batch = sum(sizes)
    x = torch.randn(batch, 3, 16, dtype=torch.float64, requires_grad=True)
    branches = [torch.randn(batch, 3, 16, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mix = task_mix([2, 0], list(sizes), "cpu")
    assert (equal_chunks(mix) is not None) == grouped
    with AtenLog() as forward:
        out = adapters(x, mix, residual=branches)
    first = sizes[0]
    alone = torch.cat(
        [
            adapters(x[:first], "scr", residual=[b[:first] for b in branches]),
            adapters(x[first:], "itc", residual=[b[first:] for b in branches]),
        ]
    )
    torch.testing.assert_close(out, alone)
    grad = torch.randn_like(out)
    leaves = [x, *branches, *adapters.parameters()]
    with AtenLog() as backward:
        got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want = torch.autograd.grad(alone, leaves, grad, allow_unused=True)
    assert [g is None for g in got] == [w is None for w in want]  # the absent task's adapter: no gradient
    for g, w in zip(got, want):
        if w is not None:
            torch.testing.assert_close(g, w)
    cats = forward.ops.count("cat") + backward.ops.count("cat")
    assert cats == (0 if grouped else 2), (forward.ops, backward.ops)  # per segment: the output and x's grad
    assert ("baddbmm" in forward.ops) == grouped and ("addmm" in forward.ops) != grouped


def test_equal_chunks_of_a_mixed_layout() -> None:
    from famevil_fast.model.task_mix import MAX_GROUPED_CHUNKS, equal_chunks

    assert equal_chunks(task_mix([0, 1, 2], [64, 128, 64], "cpu")) == [0, 1, 1, 2]
    assert equal_chunks(task_mix([3, 0], [6, 9], "cpu")) == [3, 3, 0, 0, 0]
    assert equal_chunks(task_mix([0, 1], [MAX_GROUPED_CHUNKS, 1], "cpu")) is None


def test_mixed_adapters_refuse_an_input_of_another_width() -> None:
    from famevil_fast.model.adapters import TaskAdapters

    adapters = TaskAdapters(16, 4, ("itc", "tgir"))
    with pytest.raises(ValueError, match=r"ln_weight has shape \(16,\), expected \(12,\)"):
        adapters(torch.randn(4, 3, 12), task_mix([0, 1], [2, 2], "cpu"))


def test_a_layout_whose_segments_miss_samples_is_refused() -> None:
    """A hand-built layout whose segments do not cover the batch in order is refused by name, before any
    chunked path could pair samples with another task's adapter."""
    from famevil_fast.model.adapters import TaskAdapters
    from famevil_fast.model.task_mix import TaskMix

    adapters = TaskAdapters(8, 4, ("itc", "tgir"))
    index = torch.tensor([0, 0, 1, 1])
    for segments in (((0, 0, 2), (1, 2, 3)), ((0, 0, 2), (1, 3, 4)), ((1, 2, 4), (0, 0, 2))):
        with pytest.raises(ValueError, match=r"segments .* do not cover the batch's 4 samples in order"):
            adapters(torch.randn(4, 3, 8), TaskMix(index, segments))
    good = TaskMix(index, ((0, 0, 2), (1, 2, 4)))
    assert adapters(torch.randn(4, 3, 8), good).shape == (4, 3, 8)
