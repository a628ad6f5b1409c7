"""Two CPU processes (gloo, DDP) on half batches give the losses of one process on the global batch."""

import json
import os

import pytest
import torch.multiprocessing as mp
from helpers import free_port, join_as_torchrun, leave_process_group
from trainer_fixtures import TASKS, RandomStream, micro_config

from famevil_fast.train.trainer import Trainer

UPDATES = 2


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    join_as_torchrun(rank, world, port)
    half = slice(2 * rank, 2 * rank + 2)
    streams = {t: RandomStream(t, i, batch=4, rows=half) for i, t in enumerate(TASKS)}
    trainer = Trainer(
        micro_config(f"{out_dir}/run", f"train.updates={UPDATES}", "data.batch_size=2"), streams
    )
    for _ in range(UPDATES):
        trainer.train_update()
    import torch

    rows = torch.full((rank + 1, 2), float(rank), requires_grad=True)  # unequal rows per process
    gathered, offset = trainer.gather(rows)
    (gathered * torch.arange(1.0, gathered.shape[0] + 1)[:, None]).sum().backward()
    uneven = {"gathered": gathered.tolist(), "offset": offset, "grad": rows.grad.tolist()}
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"history": trainer.history, "uneven": uneven}, f)
    leave_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    ranks = [r["history"] for r in results]
    for rank, r in enumerate(results):
        assert r["uneven"]["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        assert r["uneven"]["offset"] == rank
    # each row's gradient is its position weight summed over both processes' losses
    assert results[0]["uneven"]["grad"] == [[2.0, 2.0]]
    assert results[1]["uneven"]["grad"] == [[4.0, 4.0], [6.0, 6.0]]
    single = Trainer(
        micro_config(tmp_path / "single", f"train.updates={UPDATES}"),
        {t: RandomStream(t, i, batch=4) for i, t in enumerate(TASKS)},
    )
    for _ in range(UPDATES):
        single.train_update()
    for update in range(UPDATES):
        expected = dict(single.history[update]["losses"])
        for task in TASKS:
            mean = sum(dict(r[update]["losses"])[task] for r in ranks) / 2
            assert abs(mean - expected[task]) <= 1e-4 * max(1.0, abs(expected[task])), (update, task)


UNEVEN = {0: slice(0, 3), 1: slice(3, 8)}  # 3 and 5 rows of a global batch of 8


def _agreement_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Unequal rows per process, a NaN scr batch on rank 1 only, and SIGTERM to rank 1 only."""
    import signal

    join_as_torchrun(rank, world, port)
    out = {}
    uneven = {t: RandomStream(t, i, batch=8, rows=UNEVEN[rank]) for i, t in enumerate(TASKS)}
    trainer = Trainer(micro_config(f"{out_dir}/uneven{rank}", "train.updates=1"), uneven)
    out["uneven"] = trainer.train_update()
    out["master"] = _master_weights_update(rank, out_dir)
    trainer.evaluator = ShardedEvaluator()
    out["evaluate"] = trainer.evaluate()
    trainer.evaluator = RankZeroEvaluator()  # not made for several processes: rank 0 alone calls it
    out["evaluate_rank_zero"] = [trainer.evaluate(), trainer.evaluator.calls]
    poisoned = {
        t: RandomStream(
            t, i, batch=8, rows=slice(4 * rank, 4 * rank + 4), poison_at=0 if t == "scr" and rank else None
        )
        for i, t in enumerate(TASKS)
    }
    trainer = Trainer(micro_config(f"{out_dir}/poison{rank}", "train.updates=1"), poisoned)
    out["poison"] = trainer.train_update()
    distilled = {t: RandomStream(t, i, batch=8, rows=UNEVEN[rank]) for i, t in enumerate(TASKS)}
    trainer = Trainer(micro_config(f"{out_dir}/distill{rank}", *_distill_overrides(out_dir)), distilled)
    out["distill"] = trainer.train_update()
    halves = {t: RandomStream(t, i, batch=8, rows=slice(4 * rank, 4 * rank + 4)) for i, t in enumerate(TASKS)}
    trainer = Trainer(
        micro_config(f"{out_dir}/stop", "train.updates=4", "train.update_frequency=1", "checkpoint.every=0"),
        halves,
    )
    step = trainer.train_update

    def signalled_update():
        if rank == 1 and trainer.update == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # fit's handler records it; rank 0 gets none
        return step()

    trainer.train_update = signalled_update
    result = trainer.fit()
    out["stop"] = {"status": result["status"], "update": result["update"]}
    trainer = Trainer(
        micro_config(
            f"{out_dir}/stop_in_eval",
            "train.updates=4",
            "train.update_frequency=1",
            "checkpoint.every=0",
            "eval.every=1",
        ),
        halves,
    )
    trainer.evaluator = SignalledEvaluator(trainer, at_update=2)
    result = trainer.fit()
    out["stop_in_eval"] = {"status": result["status"], "update": result["update"]}
    with open(f"{out_dir}/agree{rank}.json", "w") as f:
        json.dump(out, f)
    leave_process_group()


MASTER_OVERRIDES = ("train.updates=1", "train.precision=bf16", "train.master_weights=true")


def _master_weights_update(rank: int, out_dir: str) -> dict:
    """Updates with bf16 parameters and float32 masters, from initial weights that differ by rank (DDP
    and the masters' broadcast give every rank rank 0's): the first update's record; then a run to update
    2 that checkpoints after each, and one resumed from that checkpoint to update 3 (checkpoints and resumes
    must leave DDP's gradient hooks in place); a checksum per master after each."""
    import torch

    from famevil_fast.train.trainer import build_model, seed_everything

    config = micro_config(f"{out_dir}/master{rank}", *MASTER_OVERRIDES)
    seed_everything(config.train.seed)  # rank 0's weights: those a Trainer builds
    model = build_model(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1e-3 * rank)
    uneven = {t: RandomStream(t, i, batch=8, rows=UNEVEN[rank]) for i, t in enumerate(TASKS)}
    trainer = Trainer(config, uneven, model=model)
    record = trainer.train_update()
    record["masters"] = _checksums(trainer)
    run = f"{out_dir}/master_checkpointed"
    streams = {t: RandomStream(t, i, batch=8, rows=UNEVEN[rank]) for i, t in enumerate(TASKS)}
    trainer = Trainer(micro_config(run, *MASTER_OVERRIDES, "train.updates=2", "checkpoint.every=1"), streams)
    trainer.fit()
    record["checkpointed"] = _checksums(trainer)
    streams = {t: RandomStream(t, i, batch=8, rows=UNEVEN[rank]) for i, t in enumerate(TASKS)}
    resumed = micro_config(run, *MASTER_OVERRIDES, "train.updates=3", "checkpoint.resume=true")
    trainer = Trainer(resumed, streams)
    trainer.fit()
    record["resumed"] = _checksums(trainer)
    return record


def _checksums(trainer: Trainer) -> list[float]:
    return [float(m.double().sum()) for m in trainer.master_weights.masters]


class RankZeroEvaluator:
    """An evaluator that knows nothing of processes."""

    calls = 0

    def __call__(self, model) -> dict:
        self.calls += 1
        return {"plain/one": {"calls": self.calls}}


class ShardedEvaluator:
    """Every process takes part in an evaluation (as ``Evaluator`` does: each encodes its share); the
    processes' shares are gathered and process 0 gets the result."""

    runs_on_every_process = True

    def __call__(self, model) -> dict:
        from famevil_fast.eval.sharding import EvalShard

        shard = EvalShard.of_process_group()
        shares = shard.gather([(shard.rank, shard.rank)])
        return {"sharded/ranks": {"shares": shares}} if shard.is_main else {}


class SignalledEvaluator(ShardedEvaluator):
    """Rank 0 receives SIGTERM while evaluating after update ``at_update``."""

    def __init__(self, trainer, at_update: int) -> None:
        self.trainer, self.at_update = trainer, at_update

    def __call__(self, model) -> dict:
        import signal

        from famevil_fast.eval.sharding import EvalShard

        if EvalShard.of_process_group().is_main and self.trainer.update == self.at_update:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__call__(model)


def _save_teachers(root) -> None:
    """A teacher per task (random weights, seeded: only their logits matter) under ``root/teachers``."""
    import torch

    from famevil_fast.model import FameViL
    from famevil_fast.train.trainer import build_model

    torch.manual_seed(0)
    config = build_model(micro_config(f"{root}/unused")).config
    for task in TASKS:
        xaa = {"itc": "none", "cap": "text"}.get(task, "both")
        FameViL(config.replace(tasks=(task,), xaa=xaa)).save_pretrained(f"{root}/teachers/{task}")


def _distill_overrides(root) -> tuple[str, ...]:
    spec = ", ".join(f"{t}: {root}/teachers/{t}" for t in TASKS)
    return ("train.updates=1", "distill.enabled=true", f"distill.teachers={{{spec}}}")


@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    out = tmp_path_factory.mktemp("agreement")
    _save_teachers(out)
    mp.spawn(_agreement_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out, [json.loads((out / f"agree{r}.json").read_text()) for r in range(2)]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(b))


def _assert_every_rank_matches_one_process(ranks, key: str, run_dir, *overrides: str) -> None:
    """Each rank's record ``key`` (an update on 3 and 5 rows) has the gradient norm and losses of one
    process on all 8 rows."""
    single = Trainer(
        micro_config(run_dir, "train.updates=1", *overrides),
        {t: RandomStream(t, i, batch=8) for i, t in enumerate(TASKS)},
    ).train_update()
    for r in ranks:
        assert _close(r[key]["grad_norm"], single["grad_norm"]), (r[key]["grad_norm"], single)
        for (task, got), (_, expected) in zip(r[key]["losses"], single["losses"]):
            assert _close(got, expected), (task, got, expected)


@pytest.mark.slow
def test_unequal_rows_give_the_global_gradient_and_every_rank_logs_the_global_losses(agreement, tmp_path):
    # DDP averages the ranks' gradients equally: without the row weights the norm is 5.02, not 4.65
    _assert_every_rank_matches_one_process(agreement[1], "uneven", tmp_path / "single")


@pytest.mark.slow
def test_master_weights_start_from_rank_0_and_stay_equal_through_checkpoints_and_resumes(agreement, tmp_path):
    """Ranks that built different weights train rank 0's (its bf16 weights through DDP, its float32 masters
    through their broadcast): the same masters after the update on every rank, and the losses of one
    process on all 8 rows, within bf16 rounding."""
    _, ranks = agreement
    for key in ("masters", "checkpointed", "resumed"):
        assert ranks[0]["master"][key] == ranks[1]["master"][key], key
    single = Trainer(
        micro_config(tmp_path / "single", *MASTER_OVERRIDES),
        {t: RandomStream(t, i, batch=8) for i, t in enumerate(TASKS)},
    ).train_update()
    for r in ranks:
        for (task, got), (_, expected) in zip(r["master"]["losses"], single["losses"]):
            assert abs(got - expected) <= 2e-2 * max(1.0, abs(expected)), (task, got, expected)


@pytest.mark.slow
def test_distillation_terms_span_the_global_batch_with_unequal_rows(agreement, tmp_path):
    """The teachers' retrieval logits cover every process's rows, as the task losses do, and each KD term
    is weighted by rows: processes holding 3 and 5 rows give the losses and gradient of one process on 8."""
    out, ranks = agreement
    _assert_every_rank_matches_one_process(ranks, "distill", tmp_path / "single", *_distill_overrides(out))


@pytest.mark.slow
def test_every_rank_evaluates_and_rank_0_gets_the_results(agreement):
    _, ranks = agreement
    assert [r["evaluate"] for r in ranks] == [{"sharded/ranks": {"shares": [0, 1]}}, {}]
    assert [r["evaluate_rank_zero"] for r in ranks] == [[{"plain/one": {"calls": 1}}, 1], [{}, 0]]


@pytest.mark.slow
def test_a_signal_during_an_evaluation_stops_every_rank_after_that_update(agreement):
    _, ranks = agreement
    assert [r["stop_in_eval"] for r in ranks] == [{"status": "interrupted by signal 15", "update": 2}] * 2


@pytest.mark.slow
def test_a_non_finite_batch_on_one_rank_is_reported_alike_by_every_rank(agreement):
    _, ranks = agreement
    for r in ranks:
        record = r["poison"]
        assert not record["applied"]
        assert [t for t, v in record["losses"] if v != v] == ["scr"]  # NaN on rank 1 is the global loss
        assert record["nonfinite_gradient_tasks"] == ["scr"]  # not the later cap micro-batch on rank 0


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_update_with_a_checkpoint(agreement):
    out, ranks = agreement
    assert [r["stop"] for r in ranks] == [{"status": "interrupted by signal 15", "update": 2}] * 2
    assert [p.name for p in (out / "stop" / "checkpoints").iterdir()] == ["step_00000002"]


def test_collective_timeout_comes_from_the_environment(monkeypatch):
    from famevil_fast.train.distributed import TIMEOUT_ENV, collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert collective_timeout().total_seconds() == 1800
    monkeypatch.setenv(TIMEOUT_ENV, "90")
    assert collective_timeout().total_seconds() == 90
    monkeypatch.setenv(TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match=TIMEOUT_ENV):
        collective_timeout()
