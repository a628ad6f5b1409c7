"""Training checkpoints: model weights, optimizer tensors and the torch random-number states in safetensors,
everything else (update count, scheduler, sampler, data positions, Python's and NumPy's random states,
config) in JSON.

The CUDA random-number state is each process's own GPU's: under DDP every process's is gathered to the main
process, which writes them all (``cuda_rank{r}``); on resume each process restores its rank's state into its
own GPU, and a checkpoint of another number of processes is refused. Older checkpoints hold the states of
every GPU the main process saw (``cuda_{i}``): a process restores the one of its own GPU's index, if any.

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
from collections.abc import Callable, Sequence
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
CUDA_RANK = re.compile(r"^cuda_rank(\d+)$")  # the CUDA random state of process r's own GPU
CUDA_LEGACY = re.compile(r"^cuda_(\d+)$")  # older checkpoints: GPU i as the main process saw it
# the entries a training state needs, by section (None: the top level), checked before anything is restored
REQUIRED: dict[str | None, tuple[str, ...]] = {
    None: ("update", "optimizer", "rng"),
    "optimizer": ("param_groups", "scalars"),
    "rng": ("python", "numpy"),
}


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
def cuda_rng_state(device: torch.device | None) -> torch.Tensor | None:
    """The CUDA random-number state of ``device`` (this process's GPU); None for a CPU device, or when CUDA is
    not in use."""
    if device is None or device.type != "cuda":
        return None
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    return torch.cuda.get_rng_state(device)


def _current_cuda_device() -> torch.device | None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.device("cuda", torch.cuda.current_device())
    return None


def rng_state(
    cuda: Sequence[torch.Tensor | None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The random-number states to checkpoint: tensors (torch's CPU state, ``cuda_rank{r}`` per process)
    and JSON (Python's and NumPy's states, the number of processes). ``cuda``: every process's CUDA state of
    its own GPU, by rank (None where a process has none); None: this single process's, of the current CUDA
    device."""
    if cuda is None:
        cuda = [cuda_rng_state(_current_cuda_device())]
    tensors = {"torch_cpu": torch.get_rng_state()}
    for rank, state in enumerate(cuda):
        if state is not None:
            tensors[f"cuda_rank{rank}"] = state.detach().cpu()
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "world_size": len(cuda),
    }
    return tensors, meta


def rng_untouched(device: torch.device) -> contextlib.AbstractContextManager:
    """A block after which the torch random-number states (CPU, and ``device`` when it is a GPU) are what
    they were before it: work inside it (graph capture warm-ups, evaluation) draws nothing from the
    training's random stream, so a run draws the same dropout masks whether or not it did that work."""
    devices = [device] if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices, device_type=device.type)


def cuda_state_to_restore(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    source: str = "the checkpoint",
) -> tuple[torch.device, torch.Tensor] | None:
    """The GPU of process ``rank`` of ``world_size`` and the CUDA state to restore into it: its rank's state,
    or in an older checkpoint the state of its GPU's index; None when there is none to restore (a CPU device,
    a checkpoint of a CPU run, an older checkpoint without that GPU). ``device`` None: the current CUDA
    device. ValueError, naming ``source``, when the checkpoint holds the states of another number of
    processes (an exact resume needs the same world size, as the data loaders' positions do)."""
    if device is None:
        device = _current_cuda_device()
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    per_rank = _numbered(tensors, CUDA_RANK)
    if per_rank:
        saved = int(meta.get("world_size", max(per_rank) + 1))
        if saved != world_size:
            raise ValueError(
                f"cannot restore the random-number states of {source}: it holds the CUDA states of "
                f"{saved} process(es), this run has {world_size}; an exact resume needs the same world size"
            )
        state = per_rank.get(rank)
    else:
        state = _numbered(tensors, CUDA_LEGACY).get(device.index)  # by number, not name: cuda_2 is GPU 2
    return None if state is None else (device, state)


def _numbered(tensors: dict[str, torch.Tensor], pattern: re.Pattern[str]) -> dict[int, torch.Tensor]:
    """The tensors whose name ``pattern`` matches, by the number it captures."""
    return {int(m.group(1)): t for k, t in tensors.items() if (m := pattern.match(k))}


def restore_rng(
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> None:
    """Restore the states ``rng_state`` saved: torch's CPU state, Python's and NumPy's, and the CUDA state of
    ``device`` (this process's GPU, process ``rank`` of ``world_size``; see ``cuda_state_to_restore``)."""
    cuda = cuda_state_to_restore(tensors, meta, device, rank, world_size)
    torch.set_rng_state(tensors["torch_cpu"])
    if cuda is not None:
        torch.cuda.set_rng_state(cuda[1], cuda[0])
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
        cuda_rng: Sequence[torch.Tensor | None] | None = None,
    ) -> Path:
        """Write checkpoint ``update`` (model, optimizer, random states and the JSON-able ``state``);
        ``weights`` replaces the model's state dict (float32 masters of a bf16 model); ``cuda_rng`` is every
        process's CUDA random state of its own GPU, by rank (None: this single process's, see
        ``rng_state``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._recover()
        final = self.directory / f"step_{update:08d}"
        tmp = Path(tempfile.mkdtemp(dir=self.directory, prefix=f".{final.name}."))
        try:
            save_famevil(model, tmp, weights)
            opt_tensors, opt_meta = optimizer_to_flat(optimizer)
            atomic_save_safetensors(tmp / OPTIMIZER_FILE, opt_tensors)  # plain permissions, as the others
            rng_tensors, rng_meta = rng_state(cuda_rng)
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
        *,
        device: torch.device | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> dict[str, Any]:
        """Restore model, optimizer and random states from ``path``; returns the JSON state. ``check`` sees
        that state first and may refuse it (by raising) before anything is restored; so are refused, with a
        ValueError, a training state that lacks an entry and random states of another number of processes.
        ``load_weights(state dict, what)`` loads the weights in place of ``load_into`` (into float32 masters
        and a bf16 model). ``device``, ``rank`` and ``world_size``: this process's GPU (None: the current
        CUDA device), rank and number of processes, for its CUDA random state (see ``restore_rng``)."""
        from famevil_fast.model.weights import load_into, read_state_dict

        path = Path(path)
        if not (path / STATE_FILE).exists():
            raise FileNotFoundError(f"not a complete training checkpoint (no {STATE_FILE}): {path}")
        state = _read_json(path / STATE_FILE)
        if check is not None:
            check(state)
        rng_tensors = _read_tensors(path / RNG_FILE)
        cuda_state_to_restore(rng_tensors, state["rng"], device, rank, world_size, f"checkpoint {path}")
        weights, _ = read_state_dict(path)
        if load_weights is None:
            load_into(model, weights, f"checkpoint {path}")
        else:
            load_weights(weights, f"checkpoint {path}")
        if optimizer is not None:
            optimizer_from_flat(optimizer, _read_tensors(path / OPTIMIZER_FILE), state["optimizer"])
        restore_rng(rng_tensors, state["rng"], device, rank, world_size)
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
    require_entries(path, state, REQUIRED)
    return state


def require_entries(path: Path, state: dict[str, Any], required: dict[str | None, Sequence[str]]) -> None:
    """ValueError naming ``path`` and the entry when ``state`` (the JSON of ``path``) lacks one of
    ``required``: per section (None: the top level), the keys it must hold."""
    for section, keys in required.items():
        where = state if section is None else state.get(section)
        if not isinstance(where, dict):
            raise ValueError(f"cannot read {path}: the training state has no {section!r} entry")
        for key in keys:
            if key not in where:
                name = key if section is None else f"{section}.{key}"
                raise ValueError(f"cannot read {path}: the training state has no {name!r} entry")


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
