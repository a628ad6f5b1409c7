"""A short multi-task run on the synthetic dataset: generate, train all four tasks together, evaluate; the
retrieval and classification scores must beat chance by a clear margin. It runs the CUDA-graph code paths
(training steps and caption decoding), which on the CPU run eagerly under simulated capture."""

import pytest
from famevil_fast.configs import resolve

from famevil_fast.cli.commands.train import build_evaluator
from famevil_fast.data import make_synthetic
from famevil_fast.train.config import load_config
from famevil_fast.train.trainer import Trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic(root, products=400, seed=3, image_size=40, workers=1)
    return root


def test_multitask_run_beats_chance(dataset, tmp_path):
    cfg = load_config(
        resolve("tiny_cpu"),
        [
            f"data.root={dataset}",
            f"checkpoint.dir={tmp_path}",
            "model.clip=micro",
            "data.image_size=32",
            "data.batch_size=24",
            "data.num_workers=1",
            "train.updates=90",
            "schedule.warmup_updates=10",
            "schedule.decay_at=[70]",
            "optim.lr=3.0e-3",
            "optim.new_module_lr_multiplier=1.0",
            "train.task_weights={}",  # one batch of each task per update
            "eval.xmr_protocols=[full]",
            "eval.caption_max_len=12",
            "eval.caption_metrics=[bleu4]",
            "train.cuda_graphs=true",  # on the CPU: the graph code path, checked for capture safety
            "eval.caption_cuda_graph=true",
            "checkpoint.every=0",
            "logging.progress=false",
            "logging.tensorboard=false",
        ],
    )
    trainer = Trainer(cfg)
    trainer.evaluator = build_evaluator(cfg, trainer.device)
    result = trainer.fit()
    assert result["status"] == "finished"
    xmr = result["eval"]["xmr/full"]["_result"]
    assert xmr.metrics["avg"] > 3 * xmr.chance["avg"], xmr.to_text()
    scr = result["eval"]["scr/val"]["_result"]
    assert scr.metrics["accuracy"] > 3 * scr.chance["accuracy"], scr.to_text()
    tgir = result["eval"]["tgir/fashioniq-val"]["_result"]
    assert tgir.metrics["avg_r@10"] > 1.5 * tgir.chance["avg_r@10"], tgir.to_text()
    losses = [dict(r["losses"]) for r in trainer.history]
    for task in ("itc", "tgir", "scr", "cap"):
        assert sum(r[task] for r in losses[-10:]) < sum(r[task] for r in losses[:10]), task
