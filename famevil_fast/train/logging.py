"""Run logging: JSON-lines metrics (strict JSON: non-finite numbers are written as null), optional
TensorBoard event files, and a tqdm progress bar.

A run that starts at update ``start`` (a resumed run at its checkpoint's update, a new run at 0) continues
the same ``metrics.jsonl``: the train and eval records of later updates, written by an earlier run of the
directory after its last checkpoint (a crash between checkpoints, or a run that never checkpointed), are
dropped first, so that each update's record appears once, and TensorBoard purges its events after
``start``. A last line cut short by a crash is dropped too, rather than having the next record glued to it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from famevil_fast.files import atomic_write


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
        self._shown: tuple[int, dict[str, float]] | None = None  # the losses on the bar, and their update
        if not enabled:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "metrics.jsonl"
        dropped = drop_records_after(path, start)
        self.metrics = open(path, "a", buffering=1)  # noqa: SIM115
        if tensorboard:  # events of later updates: logged by an earlier run of the directory
            self.writer = _tensorboard_writer(self.directory / "tensorboard", start + 1)
        if progress:
            self.bar = tqdm(total=total, initial=start, desc="train", unit="upd", dynamic_ncols=True)
        if dropped:
            self.message(
                f"starting at update {start}: dropped {dropped} record(s) of metrics.jsonl logged after that "
                "update (or cut short) by an earlier run of this directory"
            )

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
            self._shown = (update, {k[len("loss/") :]: v for k, v in values.items() if k.startswith("loss/")})
            self._postfix(self.bar.n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        (self.bar.write if self.bar is not None else print)(text)
        self.metrics.write(
            strict_json({"kind": "message", "time": round(time.time(), 3), "text": text}) + "\n"
        )

    def advance(
        self, n: int = 1, update: int | None = None, losses: Mapping[str, float] | None = None
    ) -> None:
        """Move the bar on ``n`` updates. ``losses`` (mean loss per task, numbers already on the host) are
        those of update ``update`` (by default the bar's new position); the bar shows the latest losses it
        was given (here or by ``log``), labelled with their update whenever that is not the bar's position."""
        if self.bar is None:
            return
        position = self.bar.n + n
        if losses is not None:
            self._shown = (position if update is None else update, dict(losses))
        self._postfix(position)
        self.bar.update(n)

    def _postfix(self, position: int) -> None:
        """The shown losses as the bar's postfix (drawn at its next refresh), the bar being at ``position``:
        ``loss/itc=0.693, ...``, or ``update 3: loss/itc=0.693, ...`` when they are another update's."""
        if self.bar is None or self._shown is None:
            return
        update, losses = self._shown
        text = ", ".join(f"loss/{task}={value:.3f}" for task, value in losses.items())
        if update != position:
            text = f"update {update}: {text}"
        self.bar.set_postfix_str(text, refresh=False)

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


def drop_records_after(path: Path, update: int | None) -> int:
    """Rewrite the JSON-lines file ``path`` (atomically) without the records of updates after ``update``
    (messages, which carry no update, stay) and without lines that are not JSON (a last line cut short by
    a crash); returns how many lines were dropped. ``update`` None keeps every update."""
    if not path.exists():
        return 0
    text = path.read_text(encoding="utf-8", errors="replace")
    torn = bool(text) and not text.endswith("\n")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the file ends with a newline (or is empty)
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        number = record.get("update") if isinstance(record, dict) else None
        late = update is not None and isinstance(number, int) and number > update
        if not late or record.get("kind") == "message":
            kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped or torn:
        body = "".join(line + "\n" for line in kept)
        atomic_write(path, lambda tmp: tmp.write_text(body, encoding="utf-8"))
    return dropped


def _tensorboard_writer(path: Path, purge_step: int | None = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except (ImportError, ModuleNotFoundError):
        return None
    return SummaryWriter(str(path), purge_step=purge_step)
