"""Evaluation results and the final report: one table per task with the chance level beside each score.

Owns ``TaskResult`` (what every protocol returns: scores, chance levels, details such as sizes, seed
and ties rule) and ``EvalReport`` (an ordered collection of results, printable as text tables and
serialisable to / from JSON). All scores and chance levels are percentages (CIDEr is reported x100,
as captioning papers do).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_TITLES = {
    "xmr": "XMR: cross-modal retrieval (FashionGen)",
    "tgir": "TGIR: text-guided image retrieval (FashionIQ)",
    "scr": "SCR: sub-category recognition (FashionGen)",
    "fic": "FIC: fashion image captioning (FashionGen)",
}


@dataclass
class TaskResult:
    """Scores of one task under one protocol.

    ``metrics`` and ``chance`` map metric names to percentages; ``chance`` holds None where no chance
    level is defined. ``details`` holds JSON-serialisable facts about the run (sizes, seed, ties rule).
    """

    task: str
    protocol: str
    metrics: dict[str, float]
    chance: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "protocol": self.protocol,
            "metrics": dict(self.metrics),
            "chance": dict(self.chance),
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskResult:
        missing = {"task", "protocol", "metrics"} - set(data)
        if missing:
            raise ValueError(f"TaskResult.from_dict: missing keys {sorted(missing)}")
        return cls(
            data["task"],
            data["protocol"],
            dict(data["metrics"]),
            dict(data.get("chance", {})),
            dict(data.get("details", {})),
        )

    def to_text(self) -> str:
        """A fixed-width table: metric, score, chance, score / chance."""
        title = TASK_TITLES.get(self.task, self.task)
        sizes = ", ".join(f"{k}={v}" for k, v in self.details.items() if isinstance(v, (int, str)))
        lines = [f"{title} -- protocol: {self.protocol}"]
        if sizes:
            lines.append(f"  {sizes}")
        width = max([len("metric")] + [len(name) for name in self.metrics])
        lines.append(f"  {'metric':<{width}}  {'score':>8}  {'chance':>8}  {'x chance':>8}")
        for name, value in self.metrics.items():
            chance = self.chance.get(name)
            lines.append(
                f"  {name:<{width}}  {_fmt(value):>8}  {_fmt(chance):>8}  {_ratio(value, chance):>8}"
            )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}"


def _ratio(value: float, chance: float | None) -> str:
    if chance is None or chance <= 0:
        return "-"
    return f"{value / chance:.1f}"


@dataclass
class EvalReport:
    """The final evaluation report: task results in the order they were added."""

    results: list[TaskResult] = field(default_factory=list)

    def add(self, result: TaskResult) -> EvalReport:
        if not isinstance(result, TaskResult):
            raise ValueError(f"EvalReport.add: expected a TaskResult, got {type(result).__name__}")
        self.results.append(result)
        return self

    def to_text(self) -> str:
        return "\n\n".join(r.to_text() for r in self.results)

    def to_dict(self) -> dict[str, Any]:
        return {"results": [r.to_dict() for r in self.results]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> EvalReport:
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("results"), list):
            raise ValueError("EvalReport.from_json: expected an object with a 'results' list")
        return cls([TaskResult.from_dict(r) for r in data["results"]])

    def save(self, path: str | Path) -> None:
        """Write the JSON report atomically (a temporary file renamed into place: a crash leaves the old
        file whole), creating missing parent directories."""
        from famevil_fast.files import atomic_write

        text = self.to_json() + "\n"
        atomic_write(Path(path), lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"EvalReport.load: no such file {path}")
        if not path.is_file():
            raise ValueError(f"EvalReport.load: {path} is not a file")
        return cls.from_json(path.read_text())
