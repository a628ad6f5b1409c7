"""Each process's CUDA random-number state through a checkpoint (saved from its own GPU, gathered to rank 0,
restored into its own GPU; older checkpoints), the training state's required entries, each process's GPU
under torchrun, and the train command's exit status after a signal.

There is no GPU here: ``FakeCuda`` stands in for torch.cuda's random-state functions, one per process.
"""

import json
import os
import re
import signal

import pytest
import torch
import torch.multiprocessing as mp
from helpers import free_port, join_as_torchrun, leave_process_group
from safetensors.torch import load_file, save_file
from trainer_fixtures import RandomStream, micro_config, streams

from famevil_fast.train.checkpoint import RNG_FILE, STATE_FILE, CheckpointManager
from famevil_fast.train.distributed import DistInfo, init_from_env, process_device
from famevil_fast.train.trainer import Trainer


def state_of(n: int) -> torch.Tensor:
    """A CUDA random-number state (16 bytes, as Philox's) told apart by ``n``."""
    return torch.full((16,), n, dtype=torch.uint8)


DEFAULT = state_of(200)  # the state of a GPU nothing drew from


class FakeCuda:
    """torch.cuda as one process sees ``count`` GPUs: each GPU's random state, kept here."""

    def __init__(self, count: int, current: int = 0) -> None:
        self.count, self.current = count, current
        self.states = {i: DEFAULT.clone() for i in range(count)}

    def _index(self, device: int | str | torch.device = "cuda") -> int:
        if isinstance(device, int):
            return device
        index = torch.device(device).index
        return self.current if index is None else index

    def get_rng_state(self, device: int | str | torch.device = "cuda") -> torch.Tensor:
        index = self._index(device)
        if index >= self.count:
            raise IndexError("tuple index out of range")  # torch.cuda.default_generators[index]
        return self.states[index].clone()

    def set_rng_state(self, state: torch.Tensor, device: int | str | torch.device = "cuda") -> None:
        index = self._index(device)
        if index >= self.count:
            raise IndexError("tuple index out of range")
        self.states[index] = state.clone()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [self.get_rng_state(i) for i in range(self.count)]

    def set_rng_state_all(self, states) -> None:
        for i, state in enumerate(states):  # as torch.cuda.set_rng_state_all does
            self.set_rng_state(state, i)

    def set_device(self, device: int | str | torch.device) -> None:
        index = self._index(device)
        if index >= self.count:
            raise RuntimeError("CUDA error: invalid device ordinal")
        self.current = index

    def install(self, monkeypatch: pytest.MonkeyPatch) -> "FakeCuda":
        for name in (
            "get_rng_state",
            "set_rng_state",
            "get_rng_state_all",
            "set_rng_state_all",
            "set_device",
        ):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        return self


def trainer_on(run_dir, device: str | None = None, updates: int = 0) -> Trainer:
    """A micro trainer built and trained ``updates`` updates on the CPU (torch.cuda is faked only around
    its checkpoints), then given ``device`` as its own: its checkpoints save and restore that GPU's random
    state."""
    trainer = Trainer(micro_config(run_dir, "train.updates=2"), streams())
    for _ in range(updates):
        trainer.train_update()
    if device is not None:
        trainer.device = torch.device(device)
    return trainer


def rewrite_rng(checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the CUDA states of ``checkpoint`` by ``tensors`` (an older checkpoint's layout)."""
    kept = {k: v for k, v in load_file(str(checkpoint / RNG_FILE)).items() if not k.startswith("cuda_")}
    save_file({**kept, **tensors}, str(checkpoint / RNG_FILE))


# ---------------------------------------------------------------- each process's own GPU
def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Process ``rank`` trains one update on the CPU, then, as if on GPU ``rank`` whose random state only it
    advanced, checkpoints; a new trainer of each process resumes that checkpoint."""
    join_as_torchrun(rank, world, port)
    import torch.distributed as dist

    run = f"{out_dir}/run"
    trainer = trainer_on(run, f"cuda:{rank}", updates=1)
    fake = FakeCuda(world)
    fake.states[rank] = state_of(10 + rank)  # this process's dropout advanced its own GPU only
    with pytest.MonkeyPatch.context() as patch:
        fake.install(patch)
        trainer.save()
    dist.barrier()  # rank 0's checkpoint is complete
    resumed = trainer_on(run, f"cuda:{rank}")
    fake = FakeCuda(world)
    with pytest.MonkeyPatch.context() as patch:
        fake.install(patch)
        resumed.resume()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({i: s.tolist() for i, s in fake.states.items()}, f)
    leave_process_group()


@pytest.mark.slow
def test_every_process_resumes_the_cuda_state_of_its_own_gpu(tmp_path):
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        states = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert states[str(rank)] == state_of(10 + rank).tolist()  # its own GPU: its own state
        assert states[str(1 - rank)] == DEFAULT.tolist()  # another process's GPU: untouched
    (checkpoint,) = CheckpointManager(tmp_path / "run").list()
    saved = load_file(str(checkpoint / RNG_FILE))
    assert torch.equal(saved["cuda_rank0"], state_of(10)) and torch.equal(saved["cuda_rank1"], state_of(11))


def test_a_single_process_moved_to_another_gpu_resumes_its_state_there(tmp_path, monkeypatch):
    trainer = trainer_on(tmp_path, "cuda:0", updates=1)
    fake = FakeCuda(2)
    fake.states[0] = state_of(7)
    with monkeypatch.context() as patch:
        fake.install(patch)
        checkpoint = trainer.save()
    resumed = trainer_on(tmp_path, "cuda:1")
    fake = FakeCuda(2)
    fake.install(monkeypatch)
    assert resumed.resume()
    assert torch.equal(fake.states[1], state_of(7)) and torch.equal(fake.states[0], DEFAULT)
    assert {k for k in load_file(str(checkpoint / RNG_FILE)) if k.startswith("cuda")} == {"cuda_rank0"}


def test_a_checkpoint_of_another_number_of_processes_is_refused_before_anything_is_restored(
    tmp_path, monkeypatch
):
    checkpoint = trainer_on(tmp_path).save()
    rewrite_rng(checkpoint, {"cuda_rank0": state_of(1), "cuda_rank1": state_of(2)})  # 2 processes wrote it
    state = json.loads((checkpoint / STATE_FILE).read_text())
    (checkpoint / STATE_FILE).write_text(json.dumps({**state, "rng": {**state["rng"], "world_size": 2}}))
    resumed = trainer_on(tmp_path, "cuda:0")
    with torch.no_grad():
        resumed.model.logit_scale.fill_(-1.0)
    fake = FakeCuda(1).install(monkeypatch)
    with pytest.raises(ValueError, match=r"CUDA states of 2 process\(es\), this run has 1"):
        resumed.resume()
    assert float(resumed.model.logit_scale.detach()) == -1.0 and resumed.update == 0
    assert torch.equal(fake.states[0], DEFAULT)


# ---------------------------------------------------------------- older checkpoints
def test_an_older_checkpoint_restores_the_slot_of_the_gpus_index_by_number(tmp_path, monkeypatch):
    """Slots cuda_0 .. cuda_11: GPU 2 gets cuda_2 (in name order cuda_10 would come third)."""
    trainer = trainer_on(tmp_path)
    checkpoint = trainer.save()
    rewrite_rng(checkpoint, {f"cuda_{i}": state_of(i) for i in range(12)})
    resumed = trainer_on(tmp_path, "cuda:2")
    fake = FakeCuda(12, current=2).install(monkeypatch)
    assert resumed.resume()
    assert torch.equal(fake.states[2], state_of(2))


def test_an_older_checkpoint_with_more_slots_than_visible_gpus_loads(tmp_path, monkeypatch):
    trainer = trainer_on(tmp_path)
    checkpoint = trainer.save()
    rewrite_rng(checkpoint, {f"cuda_{i}": state_of(i) for i in range(4)})
    resumed = trainer_on(tmp_path, "cuda:0")
    fake = FakeCuda(1).install(monkeypatch)
    assert resumed.resume() and resumed.update == 0
    assert torch.equal(fake.states[0], state_of(0))


def test_an_older_checkpoint_without_the_gpus_slot_skips_it(tmp_path, monkeypatch):
    trainer = trainer_on(tmp_path)
    checkpoint = trainer.save()
    rewrite_rng(checkpoint, {"cuda_0": state_of(0)})
    resumed = trainer_on(tmp_path, "cuda:1")
    fake = FakeCuda(2, current=1).install(monkeypatch)
    assert resumed.resume()
    assert torch.equal(fake.states[1], DEFAULT) and torch.equal(fake.states[0], DEFAULT)


# ---------------------------------------------------------------- the training state's entries
@pytest.mark.parametrize(
    ("section", "key"),
    [(None, "scheduler"), (None, "streams"), (None, "update"), (None, "sampler"), ("rng", "python"),
     ("rng", "numpy")],
)  # fmt: skip
def test_a_training_state_without_an_entry_is_refused_naming_it(tmp_path, section, key):
    checkpoint = trainer_on(tmp_path, updates=1).save()
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del (state if section is None else state[section])[key]
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    resumed = trainer_on(tmp_path)
    before = [p.detach().clone() for p in resumed.model.parameters()]
    name = key if section is None else f"{section}.{key}"
    with pytest.raises(
        ValueError, match=re.escape(f"{STATE_FILE}: the training state has no '{name}' entry")
    ) as caught:
        resumed.resume()
    assert str(checkpoint) in str(caught.value)
    assert all(torch.equal(a, b) for a, b in zip(before, resumed.model.parameters()))  # nothing loaded


# ---------------------------------------------------------------- each process's GPU under torchrun
@pytest.mark.parametrize(("visible", "local_rank", "index"), [(1, 1, 0), (1, 3, 0), (4, 1, 1), (4, 3, 3)])
def test_each_process_takes_its_local_rank_gpu_among_those_it_sees(monkeypatch, visible, local_rank, index):
    import torch.distributed as dist

    fake = FakeCuda(visible).install(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # the process group exists
    monkeypatch.setattr(dist, "get_rank", lambda group=None: local_rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 4)
    info = init_from_env("cuda")
    assert info == DistInfo(local_rank, 4, local_rank) and fake.current == index
    assert process_device(torch.device("cuda"), info) == torch.device("cuda", index)


def test_gather_objects_in_a_single_process_is_the_value():
    from famevil_fast.train.distributed import gather_objects

    assert gather_objects({"a": 1}, DistInfo()) == [{"a": 1}]


# ---------------------------------------------------------------- the train command's exit status
def test_a_signal_is_recorded_as_what_stopped_the_run(tmp_path):
    class Killer(RandomStream):
        def next_batch(self):
            if self.position == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().next_batch()

    trainer = Trainer(micro_config(tmp_path, "train.updates=50"), {**streams(), "itc": Killer("itc", 0)})
    assert trainer.stopped_by is None
    result = trainer.fit()
    assert result["status"] == "interrupted by signal 15" and trainer.stopped_by == signal.SIGTERM


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_train_command_exits_with_128_plus_the_signal(tmp_path, monkeypatch, signum, status):
    import famevil_fast.train.trainer as trainer_module
    from famevil_fast.cli.main import main

    class Stopped:
        def __init__(self, cfg) -> None:
            self.dist, self.device, self.stopped_by = DistInfo(), torch.device("cpu"), int(signum)

        def fit(self) -> dict:
            return {"status": f"interrupted by signal {int(signum)}", "update": 1, "eval": {}}

    monkeypatch.setattr(trainer_module, "Trainer", Stopped)
    argv = ["train", "--config", "tiny_cpu", "--no-eval", "--set", f"checkpoint.dir={tmp_path}"]
    assert main(argv) == status


def test_processes_that_find_different_checkpoints_to_resume_are_stopped(tmp_path, monkeypatch):
    """Each process looks at the run directory itself (a node's view of a shared filesystem may lag):
    resuming is refused, naming what each rank found, unless all found the same checkpoint."""
    import famevil_fast.train.trainer as trainer_module

    checkpoint = trainer_on(tmp_path, updates=1).save()
    resumed = trainer_on(tmp_path)
    monkeypatch.setattr(trainer_module, "gather_objects", lambda value, info: [value, None])
    with pytest.raises(ValueError, match=rf"rank 0: {re.escape(str(checkpoint.resolve()))}, rank 1: none"):
        resumed.resume()
    assert resumed.update == 0
    monkeypatch.setattr(trainer_module, "gather_objects", lambda value, info: [value, value])
    assert resumed.resume() and resumed.update == 1
