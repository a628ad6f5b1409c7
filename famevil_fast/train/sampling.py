"""Task sampling: which task each micro-batch of an optimizer update comes from.

- ``round_robin``: cycle through the tasks (with update frequency 4 and four tasks, every update sees one
  batch of each);
- ``size_proportional``: draw a task with probability proportional to its training-set size;
- ``uniform``: draw a task uniformly.
Draws use a seeded numpy generator whose state is saved with checkpoints, so a resumed run draws the same
sequence.
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
        self.probabilities = self._probabilities(sizes)

    def _probabilities(self, sizes: Mapping[str, int] | None) -> np.ndarray:
        if self.strategy != "size_proportional":
            return np.full(len(self.tasks), 1.0 / len(self.tasks))
        missing = [t for t in self.tasks if not sizes or t not in sizes]
        if missing:
            raise ValueError(f"size-proportional sampling needs the training-set size of {missing}")
        counts = np.array([float(sizes[t]) for t in self.tasks])
        if (counts <= 0).any():
            raise ValueError(f"training-set sizes must be positive, got {dict(zip(self.tasks, counts))}")
        return counts / counts.sum()

    def next_update(self) -> list[str]:
        """Tasks of the micro-batches of the next optimizer update, in order."""
        return [self._next() for _ in range(self.update_frequency)]

    def _next(self) -> str:
        if self.strategy == "round_robin":
            task = self.tasks[self.cursor % len(self.tasks)]
            self.cursor += 1
            return task
        return self.tasks[int(self.rng.choice(len(self.tasks), p=self.probabilities))]

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.cursor, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.cursor = int(state["cursor"])
        self.rng.bit_generator.state = state["rng"]
