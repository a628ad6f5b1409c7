"""``famevil-fast demo``: the main job on the built-in synthetic dataset: generate it (in the run's data
root: ``OUT/data``, or the directory ``--set data.root=DIR`` names), train all four tasks in one multi-task
run, evaluate, print the tables with chance levels. A product count too small to fill one training batch of
every task is refused before anything is written."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from famevil_fast.eval.report import TaskResult
    from famevil_fast.train.config import TrainConfig

from famevil_fast.cli.options import non_negative_int, positive_int

NAME = "demo"
HELP = "Generate the synthetic dataset, train all four tasks in one run, evaluate and print the scores."

# the demo's dataset is make_synthetic's default one for its product count: this share of products in val,
# and as many FashionIQ-style images as products (at least 24)
DEMO_VAL_FRACTION = 0.15
# FashionIQ training triplets of the demo's dataset of n FashionIQ images (as many as products, at least
# 24): at least max(8, 0.9 n - 24) for every seed tried (0-149 for n = 24 to 96 in steps of 4, 0-29 for n =
# 130 to 1000; the fewest found per n lay 1 to 58 above it); the demo asks for enough products for that to
# fill a batch
_FIQ_TRIPLETS_FLOOR = 8
_FIQ_TRIPLETS_PER_IMAGE = 0.9
_FIQ_TRIPLETS_LESS = 24


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        default="runs/demo",
        help="run directory (checkpoints, metrics, report; and the dataset, in OUT/data, unless --set "
        "data.root=DIR puts it elsewhere)",
    )
    parser.add_argument(
        "--products",
        type=positive_int,
        default=None,
        help="synthetic products (default: 2000 on CPU, 6000 on GPU); at least enough for one training batch "
        "of every task: 63 for tiny_cpu's batch of 32, 98 for demo_gpu's 64",
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
        help="override a config field; repeatable (data.root=DIR: the synthetic dataset is made, or the one "
        "there reused, in DIR)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data and the run")


def fewest_products(batch: int, tgir: bool = True) -> int:
    """The fewest products of the demo's dataset that give every training task one batch of ``batch``
    samples: FashionGen's train split (the tasks other than TGIR) and, with ``tgir``, FashionIQ's training
    triplets, of which the dataset of n FashionIQ images (n: the product count, at least 24) held at least
    max(8, 0.9 n - 24) for every seed tried. ValueError when no product count gives that."""
    from famevil_fast.data.synthetic.generate import (
        MAX_FIQ_IMAGES,
        MAX_PRODUCTS,
        MIN_PRODUCTS,
        fashiongen_split,
    )

    most_train = fashiongen_split(MAX_PRODUCTS, DEMO_VAL_FRACTION)[0]
    most_triplets = int(_FIQ_TRIPLETS_PER_IMAGE * MAX_FIQ_IMAGES) - _FIQ_TRIPLETS_LESS
    if batch > most_train or (tgir and batch > most_triplets):
        most = f"{most_train} FashionGen training products and {most_triplets} FashionIQ training triplets"
        raise ValueError(
            f"a training batch of {batch} is more than the synthetic dataset fills (at most {most})"
        )
    fewest = max(MIN_PRODUCTS, batch + 1)
    while fashiongen_split(fewest, DEMO_VAL_FRACTION)[0] < batch:
        fewest += 1
    if tgir and batch > _FIQ_TRIPLETS_FLOOR:  # 0.9 n - 24 >= batch, in integers: 9 n >= 10 (batch + 24)
        fewest = max(fewest, -(-10 * (batch + _FIQ_TRIPLETS_LESS) // 9))
    return fewest


def training_batch(cfg: TrainConfig) -> tuple[int, str]:
    """The training batch of ``cfg`` over every process (``WORLD_SIZE`` of them, one when unset) and the
    config field that sets it."""
    from famevil_fast.train.data_feed import process_batch_size

    world = int(os.environ.get("WORLD_SIZE", "1"))
    option = "data.global_batch_size" if cfg.data.global_batch_size is not None else "data.batch_size"
    return process_batch_size(cfg, world) * world, option


def check_products(products: int, batch: int, option: str, tasks: Sequence[str], asked: bool = True) -> None:
    """ValueError naming --products and the fewest products for a training batch of ``batch`` (set by the
    config field ``option``) of every task in ``tasks`` (see ``fewest_products``); ``asked``: the product
    count was given, not the default."""
    try:
        fewest = fewest_products(batch, "tgir" in tasks)
    except ValueError as err:
        raise ValueError(f"{err}: lower {option}") from None
    if products < fewest:
        got = f"{products}" if asked else f"{products} (the default)"
        raise ValueError(
            f"--products must be at least {fewest} for a training batch of {batch} ({option}) of every task, "
            f"got {got}"
        )


def check_dataset_fills_a_batch(
    record: dict, directory: Path, batch: int, option: str, tasks: Sequence[str]
) -> None:
    """ValueError when the synthetic dataset of ``record`` (in ``directory``) holds fewer training samples
    than one batch of ``batch`` for a task of ``tasks``: FashionGen products, or FashionIQ triplets for TGIR
    (where the record counts them)."""
    short = []
    products, triplets = record.get("products_train"), record.get("triplets_train")
    if any(task != "tgir" for task in tasks) and type(products) is int and products < batch:
        short.append(f"{products} FashionGen training products")
    if "tgir" in tasks and type(triplets) is int and triplets < batch:
        short.append(f"{triplets} FashionIQ training triplets")
    if short:
        raise ValueError(
            f"the synthetic dataset in {directory} holds {' and '.join(short)}, fewer than one training "
            f"batch of {batch} ({option}): remove it to have one of more products (--products) made, or "
            f"lower {option}"
        )


def other_settings(record: dict) -> str | None:
    """The make-synthetic options other than the demo's that the dataset of ``record`` was made with (its
    val fraction, and a FashionIQ image count other than the default for its product count), as a phrase;
    None when there are none, or the record holds no settings (an older generator's)."""
    from famevil_fast.data.synthetic.generate import fiq_image_count

    made = record.get("settings")
    if not isinstance(made, dict):
        return None
    found = record["products_train"] + record["products_val"]
    parts = []
    if "val_fraction" in made and made["val_fraction"] != DEMO_VAL_FRACTION:
        parts.append(f"--val-fraction {made['val_fraction']} (the default: {DEMO_VAL_FRACTION})")
    if "fiq_images" in made and made["fiq_images"] != fiq_image_count(found):
        parts.append(
            f"--fiq-images {made['fiq_images']} (the default for {found} products: {fiq_image_count(found)})"
        )
    return " and ".join(parts) or None


def ensure_dataset(
    directory: Path, products: int, seed: int, image_size: int, exact: bool = False, where: str = "--out"
) -> dict:
    """Generate the synthetic dataset in ``directory`` unless one is there already, and return its record
    (``synthetic.json``). An existing one is reused with a note when it is not the demo's own (another product
    count, seed or image size, or made with another val fraction or FashionIQ image count); with ``exact``
    (the product count or the seed was asked for) it must have been made with the same product count and
    seed, and the demo's val fraction and FashionIQ image count, else ValueError (``where``: the option that
    chose ``directory``, named in it). A ``synthetic.json`` the generator did not write
    (``read_synthetic_record`` does not take it) is a ValueError naming it. One whose writing was interrupted
    is written again; a FashionGen or FashionIQ dataset that make-synthetic did not write is refused (as
    ``make_synthetic`` refuses it), not overwritten."""

    from famevil_fast.data.synthetic.generate import RECORD_FILE, make_synthetic, read_synthetic_record

    path = directory / RECORD_FILE
    if path.exists():
        record = read_synthetic_record(path)
        if record is None:
            raise ValueError(
                f"{path} was not written by make-synthetic: remove it, or choose another {where}"
            )
        found = record["products_train"] + record["products_val"]
        if exact and (found, record["seed"]) != (products, seed):
            raise ValueError(
                f"{directory} already holds a synthetic dataset of {found} products (seed {record['seed']}), "
                f"not {products} (seed {seed}): remove it or choose another {where}"
            )
        other = other_settings(record)
        if exact and other:
            raise ValueError(
                f"{directory} already holds a synthetic dataset of {found} products (seed {record['seed']}) "
                f"made with {other}, not the demo's: remove it or choose another {where}"
            )
        print(f"using the synthetic dataset in {directory} ({found} products, seed {record['seed']})")
        made_at = record.get("image_size", image_size)
        if (found, record["seed"], made_at) != (products, seed, image_size) or other:
            made_with = f" made with {other}" if other else ""
            print(
                f"note: the demo's own dataset is {products} products of {image_size} px (seed {seed}), this "
                f"one {found} products of {made_at} px (seed {record['seed']}){made_with}, so its scores "
                f"differ from the documented ones; remove {directory} to have the demo's dataset made"
            )
        return record
    print(f"generating {products} synthetic products in {directory} ...")
    make_synthetic(
        directory, products=products, seed=seed, image_size=image_size, val_fraction=DEMO_VAL_FRACTION
    )
    return read_synthetic_record(path) or {}


def caption_ceiling_text(fic: TaskResult, data_root: str | Path, save_to: Path | None = None) -> str:
    """The model's FIC scores beside captions the generator writes knowing part of each product (see
    ``famevil_fast.eval.caption_ceiling``); the scores are also saved as JSON when ``save_to`` is given."""
    from famevil_fast.eval.caption_ceiling import caption_ceiling, ceiling_table
    from famevil_fast.files import atomic_write_json

    metrics = list(fic.metrics)
    try:
        scores = caption_ceiling(data_root, metrics=metrics, tokenizer=fic.details.get("tokenizer", "auto"))
    except ValueError as err:
        return f"\nFIC ceiling: not computed ({err})"
    if save_to is not None:
        atomic_write_json(save_to, scores, indent=2)
    table = ceiling_table({**scores, "this model": fic.metrics})
    return (
        "\nFIC on this synthetic data beside captions that the generator writes knowing part of each "
        f"product\n(one sample per view, the same references):\n{table}"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from famevil_fast.cli.commands.train import build_evaluator, exit_status
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
    batch, batch_option = training_batch(cfg)
    check_products(products, batch, batch_option, cfg.model.tasks, asked=args.products is not None)
    exact = args.products is not None or args.seed != 0
    size = max(96, cfg.data.image_size * 5 // 4)
    data = Path(cfg.data.root)  # OUT/data, or the directory a --set data.root names
    own_run = Path(cfg.checkpoint.dir) == out / "run"
    if not own_run:  # a --set checkpoint.dir elsewhere: refused before the dataset is generated
        check_new_run(cfg.checkpoint.dir, resume=cfg.checkpoint.resume)
    where = "--out" if data == out / "data" else "data.root"
    record = ensure_dataset(data, products, args.seed, image_size=size, exact=exact, where=where)
    check_dataset_fills_a_batch(record, data, batch, batch_option, cfg.model.tasks)
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
    for line in near_chance_warnings(report.results):
        print(line)
    report.save(out / "eval_report.json")
    fic = [r for r in report.results if r.task == "fic"]
    if fic:
        print(caption_ceiling_text(fic[0], cfg.data.root, out / "fic_ceiling.json"))
    print(f"\nreport: {out / 'eval_report.json'}; metrics log: {out / 'run' / 'metrics.jsonl'}")
    if result["status"] == "finished":  # the trainer saves the final model only then
        print(final_model_line(Path(cfg.checkpoint.dir) / "final", Path(cfg.data.root), config))
    return exit_status(result["status"], trainer.stopped_by)


NEAR_CHANCE = 1.25  # a result no metric of which exceeds its chance level by more than this factor is flagged


def near_chance_warnings(results: Sequence[TaskResult]) -> list[str]:
    """A warning line for every result none of whose metrics with a chance level beats it by more than
    ``NEAR_CHANCE`` times (a model that learnt nothing for that task: too few updates, or broken data)."""
    lines = []
    for r in results:
        pairs = [(k, v, r.chance[k]) for k, v in r.metrics.items() if r.chance.get(k) is not None]
        if pairs and all(v <= NEAR_CHANCE * c for _, v, c in pairs):
            name, value, level = max(pairs, key=lambda p: p[1] / max(p[2], 1e-12))
            lines.append(
                f"warning: {r.task} ({r.protocol}) scores near chance (best: {name} {value:.2f} against "
                f"{level:.2f}); train longer (--updates) or check the data"
            )
    return lines


def final_model_line(final: Path, data_root: Path, config: str) -> str:
    """Where the trained model is, and how the checkpoint commands take it (``--config`` scores it with the
    recipe's evaluation settings, as the demo did)."""
    return (
        f"model: {final} (famevil-fast eval, embed and caption take it, e.g. "
        f"famevil-fast eval {final} --data {data_root} --config {config})"
    )
