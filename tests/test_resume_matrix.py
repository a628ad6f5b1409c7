"""Exact resume, feature by feature: for every recipe feature, (run N updates) equals (run k updates, stop,
build a new Trainer with checkpoint.resume=true, run to N): the same logged losses, bit for bit the same
parameters, optimizer and scheduler state, sampler, data positions and random-number state, and a
metrics.jsonl with each update's record exactly once."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch
from test_data_fixtures import synthetic
from trainer_fixtures import TASKS, RandomStream, micro_config

from famevil_fast.files import default_mode
from famevil_fast.model import FameViL
from famevil_fast.train.trainer import NonFiniteLoss, Trainer, build_model

N = 5  # updates of every run


def make_streams(lengths=None, poison=None, stream_cls=RandomStream, **kwargs):
    """The four tasks' streams; ``lengths`` (task -> size, for size-proportional sampling), ``poison``
    (task -> the batch index made NaN)."""
    lengths, poison = lengths or {}, poison or {}
    return {
        t: stream_cls(t, i, length=lengths.get(t, 64), poison_at=poison.get(t), **kwargs)
        for i, t in enumerate(TASKS)
    }


def _value(v):
    """Floats compared exactly, NaN equal to NaN (a skipped update's losses)."""
    return repr(v) if isinstance(v, float) else v


def _records(history):
    return [
        (r["update"], r["applied"], _value(r["grad_norm"]), [(t, _value(v)) for t, v in r["losses"]])
        for r in history
    ]


def _same(a, b, where: str) -> None:
    """Deep equality of state dicts: tensors bit for bit, the same container types, NaN equal to NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert _value(a) == _value(b), f"{where}: {a!r} != {b!r}"


def _train_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open()]
    return [{k: v for k, v in r.items() if k != "time"} for r in records if r["kind"] == "train"]


def _fit(trainer: Trainer) -> torch.Tensor:
    trainer.fit()
    return torch.get_rng_state()  # what the next update's dropout would draw from


def assert_same_run(
    full: Trainer, resumed: Trainer, full_rng, resumed_rng, full_dir, resumed_dir, cut_at: int | None = None
) -> None:
    """``cut_at``: the last update of a cut run that was given fewer updates (None: the cut run was
    interrupted instead)."""
    assert resumed.update == full.update == full.cfg.train.updates
    assert _records(resumed.history) == _records(full.history)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    _same(full.optimizer.state_dict(), resumed.optimizer.state_dict(), "optimizer")
    if full.master_weights is not None:  # the float32 masters the bf16 model is rounded from
        for i, (a, b) in enumerate(zip(full.master_weights.masters, resumed.master_weights.masters)):
            assert torch.equal(a, b), f"master {i}"
    _same(full.scheduler.state_dict(), resumed.scheduler.state_dict(), "scheduler")
    _same(full.sampler.state_dict(), resumed.sampler.state_dict(), "sampler")
    _same(
        {t: s.state_dict() for t, s in full.streams.items()},
        {t: s.state_dict() for t, s in resumed.streams.items()},
        "streams",
    )
    assert torch.equal(full_rng, resumed_rng), "torch random state"
    full_log, resumed_log = _train_records(full_dir), _train_records(resumed_dir)
    updates = [r["update"] for r in resumed_log]
    assert updates == sorted(set(updates)), f"duplicated or out-of-order update records: {updates}"
    # the cut run ended at its own last update, which is logged whatever logging.every: one record more
    # where that update is off the full run's logging grid
    extra = [r for r in resumed_log if r["update"] not in {f["update"] for f in full_log}]
    allowed = ([], [cut_at]) if cut_at else ([],)
    assert [r["update"] for r in extra] in allowed, f"records of other updates: {extra}"
    assert [r for r in resumed_log if r not in extra] == full_log  # none missing, the same values


def run_pair(tmp_path, overrides=(), k=2, n=N, streams=make_streams, setup=None):
    """(full run of ``n`` updates, resumed run) after an interruption at update ``k``; ``setup(trainer)``
    runs on each new Trainer before its fit()."""
    base = ("logging.every=1", *overrides)

    def trainer(name, updates, *more):
        t = Trainer(micro_config(tmp_path / name, f"train.updates={updates}", *base, *more), streams())
        if setup is not None:
            setup(t)
        return t

    full = trainer("full", n)
    full_rng = _fit(full)
    trainer("cut", k).fit()
    resumed = trainer("cut", n, "checkpoint.resume=true")
    resumed_rng = _fit(resumed)
    assert_same_run(full, resumed, full_rng, resumed_rng, tmp_path / "full", tmp_path / "cut", k)
    return full, resumed


CASES = {
    # round robin whose cycle (4 tasks) does not line up with the updates (3 micro-batches)
    "round_robin_update_frequency_3": dict(overrides=("train.update_frequency=3",)),
    "round_robin_weighted": dict(overrides=("train.update_frequency=3", "train.task_weights={cap: 2}")),
    "size_proportional": dict(
        overrides=("train.sampling=size_proportional", "train.update_frequency=3"),
        streams=lambda: make_streams(lengths={"itc": 200, "tgir": 20, "scr": 60, "cap": 120}),
    ),
    "uniform": dict(overrides=("train.sampling=uniform", "train.update_frequency=3")),
    "imtlg": dict(overrides=("train.gradient_strategy=imtlg",)),
    "imtlg_global": dict(overrides=("train.gradient_strategy=imtlg_global",)),
    "mixed_task_batches": dict(overrides=("train.mixed_task_batches=true",)),
    "clip_grad_norm": dict(overrides=("train.clip_grad_norm=0.05",)),
    "freeze_backbone": dict(overrides=("train.freeze_backbone=true",)),
    "adapter_dropout": dict(overrides=("model.adapter_dropout=0.3",)),
    "cuda_graphs": dict(overrides=("train.cuda_graphs=true",)),  # capture simulated on the CPU
    "cuda_graphs_with_dropout": dict(overrides=("train.cuda_graphs=true", "model.adapter_dropout=0.3")),
    # update 2's tgir batch is NaN: the update is skipped, then the run is cut after update 3
    "skipped_update_before_interruption": dict(k=3, streams=lambda: make_streams(poison={"tgir": 1})),
    # the last update before the interruption is the skipped one
    "skipped_update_at_interruption": dict(k=2, streams=lambda: make_streams(poison={"scr": 1})),
    # warm-up over updates 0..3: cut after update 2, in its middle
    "interrupted_in_warmup": dict(k=2, overrides=("schedule.warmup_updates=4", "schedule.decay_at=[4]")),
    # decay at (0-based) update 3: cut right before the first decayed update, and right after it
    "interrupted_at_decay_milestone": dict(k=3, overrides=("schedule.decay_at=[3]",)),
    "interrupted_after_decay_milestone": dict(k=4, overrides=("schedule.decay_at=[3]",)),
    "new_module_decay_milestone": dict(
        k=2, overrides=("schedule.decay_at=[4]", "schedule.new_module_decay_at=[2]")
    ),
    "logging_every_2": dict(k=3, overrides=("logging.every=2",)),
    "master_weights": dict(overrides=("train.precision=bf16", "train.master_weights=true")),
    "master_weights_graphed_mixed_bf16_stream": dict(
        overrides=(
            "train.precision=bf16",
            "train.master_weights=true",
            "train.cuda_graphs=true",
            "train.mixed_task_batches=true",
            "model.residual_stream=autocast",
        )
    ),
    "master_weights_imtlg_frozen_clipped": dict(
        overrides=(
            "train.precision=bf16",
            "train.master_weights=true",
            "train.gradient_strategy=imtlg",
            "train.freeze_backbone=true",
            "train.clip_grad_norm=0.05",
        )
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_resume_matrix(tmp_path, case):
    spec = CASES[case]
    run_pair(tmp_path, spec.get("overrides", ()), spec.get("k", 2), streams=spec.get("streams", make_streams))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Saved single-task teachers for itc, tgir and cap (random weights: only their logits matter)."""
    root = tmp_path_factory.mktemp("teachers")
    config = build_model(micro_config(root / "unused")).config
    paths = {}
    for task in ("itc", "tgir", "cap"):
        xaa = {"itc": "none", "tgir": "both", "cap": "text"}[task]
        model = FameViL(config.replace(tasks=(task,), xaa=xaa))
        model.save_pretrained(root / task)
        paths[task] = str(root / task)
    return paths


@pytest.mark.parametrize("extra", [(), ("train.gradient_strategy=imtlg", "distill.balance=0.5")])
def test_resume_with_multi_teacher_distillation(tmp_path, teachers, extra):
    spec = ", ".join(f"{t}: {p}" for t, p in teachers.items())
    overrides = ("distill.enabled=true", f"distill.teachers={{{spec}}}", *extra)
    full, _ = run_pair(tmp_path, overrides, k=2)
    assert full.teachers is not None and sorted(full.teachers.models) == ["cap", "itc", "tgir"]


def test_resume_after_pruning_keeps_the_newest(tmp_path):
    full, resumed = run_pair(tmp_path, ("checkpoint.every=1", "checkpoint.keep_last=2"), k=3)
    assert [p.name for p in resumed.checkpoints.list()] == ["step_00000004", "step_00000005"]
    assert not [p for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith(".")]


class CrashAt3(RandomStream):
    """A stream whose fourth batch crashes the run (a RuntimeError, as a failing data pipeline would)."""

    def next_batch(self):
        if self.position == 3:
            raise RuntimeError("simulated crash")
        return super().next_batch()


def test_a_restart_without_a_checkpoint_logs_each_update_once(tmp_path):
    """A run that crashed before its first checkpoint, restarted with resume (nothing to resume: it starts
    at update 0), drops the crashed run's records instead of logging updates 1 and 2 twice."""

    overrides = ("logging.every=1", "checkpoint.every=0", f"train.updates={N}")
    with pytest.raises(RuntimeError, match="simulated crash"):
        Trainer(micro_config(tmp_path, *overrides), make_streams(stream_cls=CrashAt3)).fit()
    Trainer(micro_config(tmp_path, *overrides, "checkpoint.resume=true"), make_streams()).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    updates = [r["update"] for r in records if r.get("kind") == "train"]
    assert updates == list(range(1, N + 1))


def test_resume_from_an_older_checkpoint_than_the_newest_update(tmp_path):
    """Checkpoints every 2 updates and a crash in update 4: the resumed run restarts after update 2 and the
    records of update 3, logged before the crash, are not repeated in metrics.jsonl."""

    overrides = ("logging.every=1", "checkpoint.every=2")
    full = Trainer(micro_config(tmp_path / "full", f"train.updates={N}", *overrides), make_streams())
    full_rng = _fit(full)
    crashed = Trainer(
        micro_config(tmp_path / "cut", f"train.updates={N}", *overrides), make_streams(stream_cls=CrashAt3)
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    assert crashed.update == 3 and crashed.checkpoints.latest().name == "step_00000002"
    messages = [
        r["text"] for r in map(json.loads, (tmp_path / "cut" / "metrics.jsonl").open()) if "text" in r
    ]
    assert messages[-1].startswith("training failed (RuntimeError") and "at update 3" in messages[-1]
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as log:
        log.write('{"kind": "train", "upd')  # a record cut short by the crash
    resumed = Trainer(
        micro_config(tmp_path / "cut", f"train.updates={N}", "checkpoint.resume=true", *overrides),
        make_streams(),
    )
    resumed_rng = _fit(resumed)
    assert_same_run(full, resumed, full_rng, resumed_rng, tmp_path / "full", tmp_path / "cut")
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # the torn line dropped, no record glued to it
    assert any("dropped 2 record(s)" in json.loads(line).get("text", "") for line in lines)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_resume_after_a_signal(tmp_path, signum):
    """A signal during update 2 (sent from inside the data stream): the update finishes, the checkpoint is
    written, and the resumed run continues as if nothing happened."""

    class Killer(RandomStream):
        def next_batch(self):
            if self.task == "tgir" and self.position == 1:
                os.kill(os.getpid(), signum)
            return super().next_batch()

    base = ("logging.every=1", "checkpoint.every=0")
    full = Trainer(micro_config(tmp_path / "full", f"train.updates={N}", *base), make_streams())
    full_rng = _fit(full)
    first = Trainer(
        micro_config(tmp_path / "cut", f"train.updates={N}", *base), make_streams(stream_cls=Killer)
    )
    result = first.fit()
    assert result == {"status": f"interrupted by signal {int(signum)}", "update": 2, "eval": {}}
    assert [p.name for p in first.checkpoints.list()] == ["step_00000002"]
    assert not (tmp_path / "cut" / "final").exists()
    resumed = Trainer(
        micro_config(tmp_path / "cut", f"train.updates={N}", "checkpoint.resume=true", *base), make_streams()
    )
    resumed_rng = _fit(resumed)
    assert_same_run(full, resumed, full_rng, resumed_rng, tmp_path / "full", tmp_path / "cut")


def test_resume_twice(tmp_path):
    """Two interruptions (after updates 1 and 3) with IMTL-G and uniform sampling."""
    overrides = ("logging.every=1", "train.gradient_strategy=imtlg", "train.sampling=uniform")
    full = Trainer(micro_config(tmp_path / "full", f"train.updates={N}", *overrides), make_streams())
    full_rng = _fit(full)
    for k in (1, 3):
        resume = ("checkpoint.resume=true",) if k > 1 else ()
        Trainer(
            micro_config(tmp_path / "cut", f"train.updates={k}", *overrides, *resume), make_streams()
        ).fit()
    resumed = Trainer(
        micro_config(tmp_path / "cut", f"train.updates={N}", "checkpoint.resume=true", *overrides),
        make_streams(),
    )
    resumed_rng = _fit(resumed)
    assert_same_run(full, resumed, full_rng, resumed_rng, tmp_path / "full", tmp_path / "cut", k)


def test_resume_on_the_synthetic_dataset(tmp_path_factory, tmp_path):
    """The real data streams (loaders over the synthetic dataset, PIL decoding with random crops and flips),
    cut in the middle of an epoch and resumed across the next one."""
    root = synthetic(tmp_path_factory)
    data = (f"data.root={root}", "data.backend=pil", "data.num_workers=1", "data.batch_size=8")
    full, resumed = run_pair(tmp_path, data, k=2, n=6, streams=lambda: None)
    assert all(s.loader.epoch >= 1 for s in resumed.streams.values())  # every stream crossed an epoch


def test_resume_with_skip_after_a_nonfinite_stop(tmp_path):
    """``nonfinite: stop`` ends the run at update 2 (update 3's tgir batch is NaN; no checkpoint of it);
    resuming with ``skip`` (a field that may change) gives the run that skipped update 3 from the start."""
    poisoned = dict(poison={"tgir": 2})
    base = ("logging.every=1", "checkpoint.every=1")
    full = Trainer(micro_config(tmp_path / "full", f"train.updates={N}", *base), make_streams(**poisoned))
    full_rng = _fit(full)
    assert [r["applied"] for r in full.history] == [True, True, False, True, True]
    stopped = Trainer(
        micro_config(tmp_path / "cut", f"train.updates={N}", *base, "train.nonfinite=stop"),
        make_streams(**poisoned),
    )
    with pytest.raises(NonFiniteLoss):
        stopped.fit()
    resumed = Trainer(
        micro_config(tmp_path / "cut", f"train.updates={N}", *base, "checkpoint.resume=true"),
        make_streams(**poisoned),
    )
    resumed_rng = _fit(resumed)
    assert_same_run(full, resumed, full_rng, resumed_rng, tmp_path / "full", tmp_path / "cut")


class RandomEvaluator:
    """An evaluator that draws from the global random stream (as a sampled protocol seeded from it would)."""

    def __call__(self, model):
        return {"probe": {"value": float(torch.rand(()))}}


def test_periodic_evaluation_does_not_shift_the_training_random_stream(tmp_path):
    """With dropout, an evaluation at the update where the run is cut (the uninterrupted run evaluates there,
    the cut run evaluates only after its final checkpoint) must not change the later dropout masks."""

    def setup(trainer):
        trainer.evaluator = RandomEvaluator()

    run_pair(tmp_path, ("model.adapter_dropout=0.3", "eval.every=2"), k=2, setup=setup)


def test_the_last_checkpoint_is_written_once(tmp_path, monkeypatch):
    """A periodic checkpoint at the last update is not deleted and written again at the end (with keep_last
    1 that rewrite left the run without any complete checkpoint for a moment)."""
    from famevil_fast.train.checkpoint import CheckpointManager

    saved = []
    original = CheckpointManager.save
    monkeypatch.setattr(
        CheckpointManager, "save", lambda self, u, *a: saved.append(u) or original(self, u, *a)
    )
    cfg = micro_config(tmp_path, "train.updates=4", "checkpoint.every=2", "checkpoint.keep_last=1")
    Trainer(cfg, make_streams()).fit()
    assert saved == [2, 4]
    resumed = Trainer(micro_config(tmp_path, "train.updates=4", "checkpoint.resume=true"), make_streams())
    assert resumed.fit()["update"] == 4 and saved == [2, 4]  # nothing left to do: nothing rewritten


def test_rewriting_a_checkpoint_never_leaves_none(tmp_path, monkeypatch):
    """Writing a checkpoint of an update that already has one replaces it atomically: a failure in between
    leaves the old one complete and loadable."""
    from famevil_fast.train import checkpoint

    trainer = Trainer(micro_config(tmp_path, "train.updates=1", "checkpoint.keep_last=1"), make_streams())
    trainer.fit()
    manager = trainer.checkpoints
    (first,) = manager.list()
    before = (first / checkpoint.STATE_FILE).read_text()
    assert stat.S_IMODE(first.stat().st_mode) == default_mode(directory=True)  # not mkdtemp's private 0700

    rename = os.replace

    def fail(src, dst):  # the new checkpoint's rename into place fails (every other rename works)
        if Path(dst) == first and Path(src).parent == first.parent:
            raise OSError("disk full")
        rename(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        manager.save(trainer.update, trainer.model, trainer.optimizer, trainer.state())
    monkeypatch.undo()
    assert manager.list() == [first] and (first / checkpoint.STATE_FILE).read_text() == before
    assert not [p for p in manager.directory.iterdir() if p.name.startswith(".")]
    # what a killed process leaves: a half-written checkpoint, and the old one moved aside for a rewrite
    (manager.directory / ".step_00000002.x1y2z3").mkdir()
    aside = manager.directory / ".step_00000001.old.a1b2c3"
    aside.mkdir()
    os.replace(first, aside / first.name)
    assert manager.list() == [aside / first.name] and not first.exists()  # found where it lies, not moved
    resumed = Trainer(micro_config(tmp_path, "train.updates=2", "checkpoint.resume=true"), make_streams())
    assert resumed.resume() and resumed.update == 1  # the checkpoint moved aside is found
    assert resumed.fit()["update"] == 2
    assert [p.name for p in resumed.checkpoints.list()] == ["step_00000001", "step_00000002"]
    assert not [p for p in manager.directory.iterdir() if p.name.startswith(".")]  # leftovers removed
