"""Task sampling: which task each micro-batch of an optimizer update comes from.

- ``round_robin``: cycle through the tasks (with update frequency 4 and four tasks, every update sees one
  batch of each);
- ``size_proportional``: draw a task with probability proportional to its training-set size;
- ``uniform``: draw a task uniformly.
Task weights (``train.task_weights``) change each task's share of the micro-batches: round robin then
cycles through a smooth weighted order (weights 2 and 1 give a, b, a, a, b, a, ...; integer weights), and
the random strategies multiply each task's probability by its weight. Draws use a seeded numpy generator
whose state is saved with checkpoints, so a resumed run draws the same sequence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STRATEGIES = ("round_robin", "size_proportional", "uniform")


class TaskSampler:
    def __init__(
        self,
        tasks: Sequence[str],
        strategy: str = "round_robin",
        sizes: Mapping[str, int] | None = None,
        update_frequency: int = 1,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sampling strategy {strategy!r}; choose from {STRATEGIES}")
        if not tasks:
            raise ValueError("task sampling needs at least one task")
        self.tasks = list(tasks)
        self.strategy = strategy
        self.update_frequency = update_frequency
        self.rng = np.random.default_rng(seed)
        self.cursor = 0
        self.weights = task_weights(self.tasks, weights, integer=strategy == "round_robin")
        self.cycle = weighted_cycle(self.tasks, self.weights) if strategy == "round_robin" else None
        self.probabilities = self._probabilities(sizes)

    def _probabilities(self, sizes: Mapping[str, int] | None) -> np.ndarray:
        if self.strategy != "size_proportional":
            return self.weights / self.weights.sum()
        missing = [t for t in self.tasks if not sizes or t not in sizes]
        if missing:
            raise ValueError(f"size-proportional sampling needs the training-set size of {missing}")
        counts = np.array([float(sizes[t]) for t in self.tasks])
        if (counts <= 0).any():
            raise ValueError(f"training-set sizes must be positive, got {dict(zip(self.tasks, counts))}")
        counts = counts * self.weights
        return counts / counts.sum()

    def next_update(self) -> list[str]:
        """Tasks of the micro-batches of the next optimizer update, in order."""
        return [self._next() for _ in range(self.update_frequency)]

    def _next(self) -> str:
        if self.strategy == "round_robin":
            task = self.cycle[self.cursor % len(self.cycle)]
            self.cursor += 1
            return task
        return self.tasks[int(self.rng.choice(len(self.tasks), p=self.probabilities))]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self.rng.bit_generator.state = state["rng"]


def task_weights(tasks: Sequence[str], weights: Mapping[str, float] | None, integer: bool) -> np.ndarray:
    """Each task's weight (1 unless given); ValueError for unknown tasks, weights <= 0 or infinite and, where
    ``integer``, weights that are not whole numbers."""
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ValueError(f"task weights name tasks that are not trained: {unknown} (tasks: {list(tasks)})")
    values = np.array([float(weights.get(t, 1.0)) for t in tasks])
    if not (np.isfinite(values) & (values > 0)).all():
        raise ValueError(f"task weights must be positive finite numbers, got {weights}")
    if integer and not (values == np.round(values)).all():
        raise ValueError(f"round-robin task weights must be whole numbers, got {weights}")
    return values


def weighted_cycle(tasks: Sequence[str], weights: np.ndarray) -> list[str]:
    """One period of smooth weighted round robin over whole-number weights: every task appears ``weight``
    times, spread as evenly as the weights allow; equal weights give the tasks in order."""
    counts = np.round(weights).astype(np.int64)
    current = np.zeros(len(tasks), dtype=np.int64)
    cycle = []
    for _ in range(int(counts.sum())):
        current += counts
        pick = int(np.argmax(current))
        current[pick] -= counts.sum()
        cycle.append(tasks[pick])
    return cycle
