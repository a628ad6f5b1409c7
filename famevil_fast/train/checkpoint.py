"""Training checkpoints: model weights and optimizer tensors in safetensors, everything else (update count,
scheduler, sampler, data positions, random-number states, config) in JSON.

Each checkpoint is a directory ``step_XXXXXXXX`` written under a temporary name and renamed into place, so a
crash never leaves a half-written checkpoint behind; only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from famevil_fast.files import atomic_save_safetensors, default_mode
from famevil_fast.model.weights import save_famevil

STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STEP_DIR = re.compile(r"^step_(\d{8})$")
TEMP_DIR = re.compile(r"^\.step_\d{8}\.")  # ``save``'s temporary directories (and checkpoints moved aside)


# ---------------------------------------------------------------- optimizer state
def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    groups = [  # JSON turned tuples (AdamW's betas) into lists
        {k: _like(v, now.get(k)) for k, v in saved.items()}
        for saved, now in zip(meta["param_groups"], optimizer.param_groups)
    ]
    groups += meta["param_groups"][len(groups) :]  # a count mismatch is load_state_dict's to report
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _like(saved: Any, current: Any) -> Any:
    """A saved value as a tuple where the optimizer holds a tuple (JSON has lists only)."""
    return tuple(saved) if isinstance(saved, list) and isinstance(current, tuple) else saved


# ---------------------------------------------------------------- random states
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def rng_untouched(device: torch.device) -> contextlib.AbstractContextManager:
    """A block after which the torch random-number states (CPU, and ``device`` when it is a GPU) are what
    they were before it: work inside it (graph capture warm-ups, evaluation) draws nothing from the
    training's random stream, so a run draws the same dropout masks whether or not it did that work."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type=device.type)


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = meta["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------- manager
class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3) -> None:
        self.directory = Path(directory) / "checkpoints"
        self.keep_last = max(1, keep_last)

    def list(self) -> list[Path]:
        """The complete checkpoints, oldest first, including one that a rewrite moved aside and a crash kept
        from being replaced (found where it lies: listing changes nothing on disk, so every process of a
        run sees the same checkpoints; ``save`` puts it back)."""
        if not self.directory.exists():
            return []
        found = {p.name: p for p in _complete_checkpoints(self.directory)}
        for aside in self.directory.glob(".step_*.old.*"):
            for moved in _complete_checkpoints(aside):
                found.setdefault(moved.name, moved)
        return sorted(found.values(), key=lambda p: p.name)

    def latest(self) -> Path | None:
        found = self.list()
        return found[-1] if found else None

    def save(
        self,
        update: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        state: dict[str, Any],
        weights: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write checkpoint ``update`` (model, optimizer, random states and the JSON-able ``state``);
        ``weights`` replaces the model's state dict (float32 masters of a bf16 model)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recover()
        final = self.directory / f"step_{update:08d}"
        tmp = Path(tempfile.mkdtemp(dir=self.directory, prefix=f".{final.name}."))
        try:
            save_famevil(model, tmp, weights)
            opt_tensors, opt_meta = optimizer_to_flat(optimizer)
            atomic_save_safetensors(tmp / OPTIMIZER_FILE, opt_tensors)  # plain permissions, as the others
            rng_tensors, rng_meta = rng_state()
            atomic_save_safetensors(tmp / RNG_FILE, rng_tensors)
            payload = {"update": update, "optimizer": opt_meta, "rng": rng_meta, **state}
            (tmp / STATE_FILE).write_text(json.dumps(payload))
            _fsync_dir_files(tmp)
            os.chmod(tmp, default_mode(directory=True))  # mkdtemp's directories are private
            _replace_dir(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        return final

    def load(
        self,
        path: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        check: Callable[[dict[str, Any]], None] | None = None,
        load_weights: Callable[[dict[str, torch.Tensor], str], None] | None = None,
    ) -> dict[str, Any]:
        """Restore model, optimizer and random states from ``path``; returns the JSON state. ``check`` sees
        that state first and may refuse it (by raising) before anything is restored. ``load_weights(state
        dict, what)`` loads the weights in place of ``load_into`` (into float32 masters and a bf16 model)."""
        from famevil_fast.model.weights import load_into, read_state_dict

        path = Path(path)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"not a complete training checkpoint (no {STATE_FILE}): {path}")
        state = _read_json(path / STATE_FILE)
        if check is not None:
            check(state)
        weights, _ = read_state_dict(path)
        if load_weights is None:
            load_into(model, weights, f"checkpoint {path}")
        else:
            load_weights(weights, f"checkpoint {path}")
        if optimizer is not None:
            optimizer_from_flat(optimizer, _read_tensors(path / OPTIMIZER_FILE), state["optimizer"])
        restore_rng(_read_tensors(path / RNG_FILE), state["rng"])
        return state

    def set_aside_after(self, update: int) -> list[Path]:
        """Move the checkpoints of updates after ``update`` into ``<run dir>/superseded/`` (a resume from an
        older checkpoint: the run continues from there, and the abandoned checkpoints must neither be
        pruned in favour of nor resumed instead of the new ones); returns where they went. The main process
        calls it, once."""
        later = [p for p in self.list() if int(p.name.split("_")[1]) > update]
        if not later:
            return []
        superseded = self.directory.parent / "superseded"
        superseded.mkdir(exist_ok=True)
        moved = []
        for path in later:
            target, n = superseded / path.name, 1
            while target.exists():
                target, n = superseded / f"{path.name}.{n}", n + 1
            os.replace(path, target)
            moved.append(target)
        return moved

    def _prune(self) -> None:
        """Delete all but the newest ``keep_last`` checkpoints, and what interrupted writes left behind
        (hidden temporary directories; only the main process writes checkpoints, and not concurrently)."""
        for old in self.list()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self.directory.iterdir():
            if leftover.is_dir() and TEMP_DIR.match(leftover.name):
                shutil.rmtree(leftover, ignore_errors=True)

    def _recover(self) -> None:
        """Rename back a complete checkpoint that ``_replace_dir`` moved aside when the process died before
        its replacement was renamed into place (the main process, before it writes)."""
        for aside in self.directory.glob(".step_*.old.*"):
            for moved in _complete_checkpoints(aside):
                final = self.directory / moved.name
                if not final.exists():
                    with contextlib.suppress(OSError):
                        os.replace(moved, final)


def set_aside_run_dir(run: str | Path, what: str = "run") -> Path | None:
    """Make a new run in ``run`` start afresh: a non-empty run directory is renamed to ``<name>.previous``
    (replacing an older one), so that its checkpoints are neither mixed with the new run's nor lost at
    once; ``what`` names the run in the line printed. Returns where the previous run went (None: nothing
    to set aside)."""
    run = Path(run)
    if not run.is_dir() or not any(run.iterdir()):
        return None
    previous = run.with_name(run.name + ".previous")
    if previous.is_dir() and not previous.is_symlink():
        shutil.rmtree(previous)
    elif previous.exists() or previous.is_symlink():
        previous.unlink()
    run.rename(previous)
    print(f"the previous {what} is kept in {previous}; this run starts afresh in {run}")
    return previous


def _complete_checkpoints(directory: Path) -> list[Path]:
    """The ``step_XXXXXXXX`` directories of ``directory`` that hold a training state."""
    return [
        p for p in directory.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).exists()
    ]


def _replace_dir(new: Path, final: Path) -> None:
    """Rename directory ``new`` to ``final``. An existing ``final`` (a checkpoint of the same update) is
    moved aside first and deleted only once ``new`` is in place (moved back if that rename fails), so it
    is never deleted before its replacement exists."""
    if not final.exists():
        os.replace(new, final)
        return
    aside = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old."))
    try:
        os.replace(final, aside / final.name)
    except BaseException:
        aside.rmdir()
        raise
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside / final.name, final)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: the file is corrupt or truncated ({exc})") from exc
    if not isinstance(state, dict) or "optimizer" not in state or "rng" not in state:
        raise ValueError(f"cannot read {path}: not a training state (no optimizer and rng entries)")
    return state


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError

    if not path.exists():
        raise FileNotFoundError(f"not a complete training checkpoint (no {path.name}): {path.parent}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: the file is corrupt or truncated ({exc})") from exc


def _fsync_dir_files(directory: Path) -> None:
    for f in directory.iterdir():
        with open(f, "rb") as handle:
            os.fsync(handle.fileno())
