"""``famevil-fast train``: multi-task training from a YAML recipe (single process or under torchrun)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from famevil_fast.eval.runner import Evaluator
    from famevil_fast.train.config import TrainConfig

NAME = "train"
HELP = (
    "Train FAME-ViL from a YAML recipe; `--set section.key=value` overrides any field (see docs/training.md)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="YAML recipe: a path or a packaged name (e.g. tiny_cpu, mtl_full)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config field; repeatable",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint of the run directory (checkpoint.dir); without it, a run "
        "directory that already holds checkpoints is refused",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip evaluation (periodic and final)")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print every config field of the recipe (with the overrides) and its documentation, and exit",
    )


def build_evaluator(cfg: TrainConfig, device: torch.device | str | None) -> Evaluator | None:
    """The evaluator of ``eval.tasks`` (None: every trained task that has an evaluation protocol); None
    when no task is left (a pre-training run of mvc, pac and itm only)."""
    from famevil_fast.eval.runner import EvalOptions, Evaluator
    from famevil_fast.model.config import PRETRAIN_TASKS

    tasks = cfg.eval.tasks
    if tasks is None:
        tasks = [t for t in cfg.model.tasks if t not in PRETRAIN_TASKS]
    if not tasks:
        return None
    return Evaluator.build(
        cfg.data.root,
        tasks,
        cfg.data.image_size,
        cfg.data.eval_batch_size,
        device=device,
        backend=cfg.data.backend,
        cache_dir=cfg.data.cache,
        options=EvalOptions.from_section(cfg.eval, progress=cfg.logging.progress),
    )


def run(args: argparse.Namespace) -> int:
    from famevil_fast.configs import resolve
    from famevil_fast.train.config import describe_fields, load_config
    from famevil_fast.train.distributed import shutdown
    from famevil_fast.train.trainer import NonFiniteLoss, Trainer, check_new_run

    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    cfg = load_config(resolve(args.config), overrides)
    if args.print_config:
        print(describe_fields(cfg))
        return 0
    check_new_run(cfg.checkpoint.dir, resume=cfg.checkpoint.resume)  # before the model and data are built
    trainer = Trainer(cfg)
    if not args.no_eval:
        trainer.evaluator = build_evaluator(cfg, trainer.device)
    try:
        result = trainer.fit()
    except NonFiniteLoss as exc:  # train.nonfinite: stop; the run's log and newest checkpoint stay
        print(f"famevil-fast train: stopped: {exc}", file=sys.stderr)
        shutdown()
        return 1
    if trainer.dist.is_main and result["eval"]:
        report = _report(result["eval"])
        print(report.to_text())
        report.save(f"{cfg.checkpoint.dir}/eval_report.json")
    shutdown()
    return exit_status(result["status"], trainer.stopped_by)


def exit_status(status: str, signum: int | None) -> int:
    """The command's exit status for a run that ended with ``status`` (``Trainer.fit``'s): 0 when it
    finished, else the shell's convention for a process stopped by signal ``signum``, 128 + its number (130
    for SIGINT, 143 for SIGTERM; 130 when the signal is not known)."""
    if status == "finished":
        return 0
    return 128 + int(signum or signal.SIGINT)


def _report(results: dict):
    from famevil_fast.eval.report import EvalReport

    report = EvalReport()
    for metrics in results.values():
        report.add(metrics["_result"])
    return report
