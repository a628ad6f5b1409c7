"""Task sampling: round robin (plain and weighted), size-proportional and uniform draws, task weights,
resumable state, and the errors for bad strategies, sizes and weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from famevil_fast.configs import resolve

from famevil_fast.train.config import load_config
from famevil_fast.train.sampling import TaskSampler, weighted_cycle

TASKS = ["itc", "tgir", "scr", "cap"]


def draws(sampler: TaskSampler, updates: int) -> list[str]:
    return [task for _ in range(updates) for task in sampler.next_update()]


def test_round_robin_gives_one_batch_of_each_task_per_update():
    sampler = TaskSampler(TASKS, "round_robin", update_frequency=4)
    assert [sampler.next_update() for _ in range(3)] == [TASKS] * 3


def test_weighted_round_robin_repeats_tasks_by_weight_and_spreads_them():
    sampler = TaskSampler(TASKS, "round_robin", update_frequency=4, weights={"cap": 5, "itc": 2, "tgir": 2})
    seq = draws(sampler, 50)  # 200 micro-batches = 20 cycles of 10
    assert Counter(seq) == {"cap": 100, "itc": 40, "tgir": 40, "scr": 20}
    cycle = weighted_cycle(TASKS, np.array([2.0, 2.0, 1.0, 5.0]))
    assert max(len(run) for run in "".join("c" if t == "cap" else "." for t in cycle * 2).split(".")) <= 2
    assert weighted_cycle(["a", "b"], np.array([2.0, 1.0])) == ["a", "b", "a"]


@pytest.mark.parametrize("strategy", ["uniform", "size_proportional"])
def test_weights_scale_the_draw_probabilities(strategy):
    sizes = {"itc": 300, "tgir": 100, "scr": 300, "cap": 300}
    sampler = TaskSampler(TASKS, strategy, sizes, weights={"cap": 3.0})
    base = np.array([3.0, 1.0, 3.0, 9.0]) if strategy == "size_proportional" else np.array([1, 1, 1, 3.0])
    np.testing.assert_allclose(sampler.probabilities, base / base.sum())
    counts = Counter(draws(sampler, 4000))
    assert abs(counts["cap"] / 4000 - sampler.probabilities[3]) < 0.03


def test_state_dict_resumes_the_same_sequence():
    for strategy in ("round_robin", "uniform"):
        first = TaskSampler(TASKS, strategy, update_frequency=3, seed=7, weights={"cap": 2})
        draws(first, 5)
        state = first.state_dict()
        rest = draws(first, 10)
        second = TaskSampler(TASKS, strategy, update_frequency=3, seed=99, weights={"cap": 2})
        second.load_state_dict(state)
        assert draws(second, 10) == rest


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strategy="sometimes"), "unknown sampling strategy"),
        (dict(weights={"vqa": 2}), "not trained"),
        (dict(weights={"cap": 0}), "positive"),
        (dict(weights={"cap": 1.5}), "whole numbers"),
        (dict(strategy="size_proportional"), "training-set size"),
    ],
)
def test_bad_sampling_arguments(kwargs, message):
    kwargs = {"strategy": "round_robin", **kwargs}
    with pytest.raises(ValueError, match=message):
        TaskSampler(TASKS, kwargs.pop("strategy"), **kwargs)


def test_config_checks_task_weights():
    cfg = load_config(resolve("tiny_cpu"), ["train.task_weights={cap: 3}"])
    assert cfg.train.task_weights == {"cap": 3}
    with pytest.raises(ValueError, match="not trained"):
        load_config(resolve("tiny_cpu"), ["train.task_weights={vqa: 3}"])
    assert load_config(resolve("tiny_cpu"), ["train.sampling=uniform", "train.task_weights={cap: 0.5}"])
