"""Two CPU processes (gloo, DDP) on half batches give the losses of one process on the global batch."""

import json
import os
import socket

import pytest
import torch.multiprocessing as mp
from trainer_fixtures import TASKS, RandomStream, micro_config

from famevil_fast.train.trainer import Trainer

UPDATES = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
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
    import torch.distributed as dist

    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
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
