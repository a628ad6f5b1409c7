"""Run logging: JSON-lines metrics (strict JSON: non-finite numbers are written as null), optional
TensorBoard event files, and a tqdm progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


class RunLogger:
    def __init__(
        self,
        directory: str | Path,
        total: int,
        start: int = 0,
        tensorboard: bool = True,
        progress: bool = True,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.directory = Path(directory)
        self.writer = None
        self.bar = None
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metrics = open(self.directory / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115
        if tensorboard:
            self.writer = _tensorboard_writer(self.directory / "tensorboard")
        if progress:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="upd", dynamic_ncols=True)

    def log(self, update: int, values: dict[str, Any], kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "update": update, "time": round(time.time(), 3), **values}
        self.metrics.write(strict_json(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, update)
        if self.bar is not None and kind == "train":
            shown = {k: f"{v:.3f}" for k, v in values.items() if k.startswith("loss/")}
            self.bar.set_postfix(shown, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else print)(text)
        self.metrics.write(
            strict_json({"kind": "message", "time": round(time.time(), 3), "text": text}) + "\n"
        )

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.metrics.close()


def strict_json(value: Any) -> str:
    """``json.dumps`` that writes standard JSON: NaN and infinities (which ``json.dumps`` would write as the
    bare tokens NaN / Infinity) become null."""
    return json.dumps(_finite_or_null(value), allow_nan=False)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError):
        return None
    return SummaryWriter(str(path))
