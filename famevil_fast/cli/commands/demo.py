"""``famevil-fast demo``: the main job on the built-in synthetic dataset: generate it, train all four
tasks in one multi-task run, evaluate, print the tables with chance levels."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from famevil_fast.eval.report import TaskResult

from famevil_fast.cli.options import non_negative_int, positive_int

NAME = "demo"
HELP = "Generate the synthetic dataset, train all four tasks in one run, evaluate and print the scores."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run directory (data, checkpoints, metrics)")
    parser.add_argument(
        "--products",
        type=positive_int,
        default=None,
        help="synthetic products (default: 2000 on CPU, 6000 on GPU)",
    )
    parser.add_argument(
        "--updates", type=positive_int, default=None, help="optimizer updates (default: the recipe's)"
    )
    parser.add_argument(
        "--config", default=None, help="recipe (default: tiny_cpu on a CPU, demo_gpu with a GPU)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config field; repeatable",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data and the run")


def ensure_dataset(directory: Path, products: int, seed: int, image_size: int, exact: bool = False) -> None:
    """Generate the synthetic dataset in ``directory`` unless one is there already. An existing one is
    reused with a note; with ``exact`` (the product count or the seed was asked for) it must have been made
    with the same product count and seed, else ValueError. A ``synthetic.json`` the generator did not write
    (``read_synthetic_record`` does not take it) is a ValueError naming it. One whose writing was interrupted
    is written again; a FashionGen or FashionIQ dataset that make-synthetic did not write is refused (as
    ``make_synthetic`` refuses it), not overwritten."""

    from famevil_fast.data.synthetic.generate import RECORD_FILE, make_synthetic, read_synthetic_record

    path = directory / RECORD_FILE
    if path.exists():
        record = read_synthetic_record(path)
        if record is None:
            raise ValueError(f"{path} was not written by make-synthetic: remove it, or choose another --out")
        found = record["products_train"] + record["products_val"]
        if exact and (found, record["seed"]) != (products, seed):
            raise ValueError(
                f"{directory} already holds a synthetic dataset of {found} products (seed {record['seed']}), "
                f"not {products} (seed {seed}): remove it or choose another --out"
            )
        print(f"using the synthetic dataset in {directory} ({found} products, seed {record['seed']})")
        made_at = record.get("image_size", image_size)
        if (found, record["seed"], made_at) != (products, seed, image_size):
            print(
                f"note: the demo's own dataset is {products} products of {image_size} px (seed {seed}), this "
                f"one {found} products of {made_at} px (seed {record['seed']}), so its scores differ from "
                f"the documented ones; remove {directory} to have the demo's dataset made"
            )
        return
    print(f"generating {products} synthetic products in {directory} ...")
    make_synthetic(directory, products=products, seed=seed, image_size=image_size)


def caption_ceiling_text(fic: TaskResult, data_root: str | Path, save_to: Path | None = None) -> str:
    """The model's FIC scores beside captions the generator writes knowing part of each product (see
    ``famevil_fast.eval.caption_ceiling``); the scores are also saved as JSON when ``save_to`` is given."""
    import json

    from famevil_fast.eval.caption_ceiling import caption_ceiling, ceiling_table

    metrics = list(fic.metrics)
    try:
        scores = caption_ceiling(data_root, metrics=metrics, tokenizer=fic.details.get("tokenizer", "auto"))
    except ValueError as err:
        return f"\nFIC ceiling: not computed ({err})"
    if save_to is not None:
        save_to.write_text(json.dumps(scores, indent=2))
    table = ceiling_table({**scores, "this model": fic.metrics})
    return (
        "\nFIC on this synthetic data beside captions that the generator writes knowing part of each "
        f"product\n(one sample per view, the same references):\n{table}"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from famevil_fast.cli.commands.train import build_evaluator
    from famevil_fast.configs import resolve
    from famevil_fast.eval.report import EvalReport
    from famevil_fast.train.checkpoint import set_aside_run_dir
    from famevil_fast.train.config import load_config
    from famevil_fast.train.trainer import Trainer, check_new_run

    gpu = torch.cuda.is_available()
    out = Path(args.out)
    config = args.config or ("demo_gpu" if gpu else "tiny_cpu")
    overrides = [f"data.root={out / 'data'}", f"checkpoint.dir={out / 'run'}", f"train.seed={args.seed}"]
    if args.updates is not None:
        overrides.append(f"train.updates={args.updates}")
    cfg = load_config(resolve(config), overrides + list(args.overrides))
    products = args.products if args.products is not None else (6000 if gpu else 2000)
    exact = args.products is not None or args.seed != 0
    size = max(96, cfg.data.image_size * 5 // 4)
    own_run = Path(cfg.checkpoint.dir) == out / "run"
    if not own_run:  # a --set checkpoint.dir elsewhere: refused before the dataset is generated
        check_new_run(cfg.checkpoint.dir, resume=cfg.checkpoint.resume)
    ensure_dataset(out / "data", products, args.seed, image_size=size, exact=exact)
    if own_run and not cfg.checkpoint.resume:  # after every refusal: a refused demo changes no run
        set_aside_run_dir(out / "run", "demo run")
    print(f"training {cfg.model.clip} on {cfg.model.tasks} for {cfg.train.updates} updates ({config}) ...")
    trainer = Trainer(cfg)
    trainer.evaluator = build_evaluator(cfg, trainer.device)
    result = trainer.fit()
    report = EvalReport()
    for metrics in result["eval"].values():
        report.add(metrics["_result"])
    print(report.to_text())
    report.save(out / "eval_report.json")
    fic = [r for r in report.results if r.task == "fic"]
    if fic:
        print(caption_ceiling_text(fic[0], cfg.data.root, out / "fic_ceiling.json"))
    print(f"\nreport: {out / 'eval_report.json'}; metrics log: {out / 'run' / 'metrics.jsonl'}")
    if result["status"] == "finished":  # the trainer saves the final model only then
        print(final_model_line(Path(cfg.checkpoint.dir) / "final", Path(cfg.data.root), config))
    return 0 if result["status"] == "finished" else 130


def final_model_line(final: Path, data_root: Path, config: str) -> str:
    """Where the trained model is, and how the checkpoint commands take it (``--config`` scores it with the
    recipe's evaluation settings, as the demo did)."""
    return (
        f"model: {final} (famevil-fast eval, embed and caption take it, e.g. "
        f"famevil-fast eval {final} --data {data_root} --config {config})"
    )
