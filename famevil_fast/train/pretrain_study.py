"""Does pre-training help? Fine-tune with and without a pre-training run first and compare retrieval.

Three arms, all evaluated on the validation split with the full XMR protocol:

- ``pretrained``: ``pretrain_updates`` updates of the pre-training recipe (itc + mvc + pac + itm, one batch of
  each per update), then ``finetune_updates`` updates of retrieval fine-tuning started from its weights
  (backbone, cross-attention adapters, and the itc adapters and head, which pre-training trains too);
- ``scratch``: the same fine-tuning from scratch (same fine-tuning step count);
- ``scratch_long``: fine-tuning from scratch for as many updates as the pre-trained arm ran task batches in
  total (``pretrain_updates`` x 4 + ``finetune_updates``: the same number of forward/backward passes).

Run: ``python -m famevil_fast.train.pretrain_study DATA_ROOT OUT_DIR [--pretrain-updates N] ...``; the
table is printed and written to ``OUT_DIR/study.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from famevil_fast.configs import resolve
from famevil_fast.train.config import TrainConfig, load_config

if TYPE_CHECKING:
    from famevil_fast.eval.runner import Evaluator

PRETRAIN_RECIPE = "pretrain_tiny_cpu"


def _common(root: str, run_dir: Path, clip: str, image_size: int, batch_size: int, seed: int) -> list[str]:
    return [
        f"data.root={root}",
        f"model.clip={clip}",
        f"data.image_size={image_size}",
        f"data.batch_size={batch_size}",
        f"train.seed={seed}",
        "train.device=cpu",
        "data.backend=pil",
        f"checkpoint.dir={run_dir}",
        "checkpoint.every=0",
        "eval.every=0",
        "logging.progress=false",
        "logging.tensorboard=false",
        "logging.every=0",
    ]


def pretrain_config(
    root: str,
    run_dir: Path,
    updates: int,
    clip: str = "tiny",
    image_size: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    extra: Sequence[str] = (),
) -> TrainConfig:
    """The pre-training recipe, shortened to ``updates`` (warm-up 10 %, one decay at 80 %)."""
    schedule = [
        f"train.updates={updates}",
        f"schedule.warmup_updates={max(1, updates // 10)}",
        f"schedule.decay_at=[{max(1, int(0.8 * updates))}]",
    ]
    return load_config(
        resolve(PRETRAIN_RECIPE),
        _common(root, run_dir, clip, image_size, batch_size, seed) + schedule + list(extra),
    )


def finetune_config(
    root: str,
    run_dir: Path,
    updates: int,
    init_from: str | None = None,
    clip: str = "tiny",
    image_size: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    extra: Sequence[str] = (),
) -> TrainConfig:
    """Retrieval (itc) fine-tuning with the pre-training recipe's optimiser, one batch per update."""
    overrides = [
        "model.tasks=[itc]",
        "train.update_frequency=1",
        f"train.updates={updates}",
        f"schedule.warmup_updates={max(1, updates // 10)}",
        f"schedule.decay_at=[{max(1, int(0.8 * updates))}]",
        f"model.init_from={'null' if init_from is None else init_from}",
    ]
    return load_config(
        resolve(PRETRAIN_RECIPE),
        _common(root, run_dir, clip, image_size, batch_size, seed) + overrides + list(extra),
    )


def _train(config: TrainConfig, evaluator=None) -> dict[str, Any]:
    from famevil_fast.train.trainer import Trainer

    trainer = Trainer(config)
    trainer.evaluator = evaluator
    start = time.perf_counter()
    result = trainer.fit()
    for stream in trainer.streams.values():
        stream.close()
    scores = {
        name: {k: v for k, v in m.items() if not k.startswith("_")} for name, m in result["eval"].items()
    }
    chance = {name: dict(m["_result"].chance) for name, m in result["eval"].items()}
    last = [loss for _, loss in trainer.history[-1]["losses"]] if trainer.history else []
    return {
        "updates": result["update"],
        "seconds": round(time.perf_counter() - start, 1),
        "eval": scores,
        "chance": chance,
        "final_losses": last,
    }


def build_evaluator(
    root: str, image_size: int, batch_size: int = 64, protocols: Sequence[str] = ("full",)
) -> Evaluator:
    """XMR evaluation on the validation split (the sampled protocol needs 101 products per sub-category)."""
    from famevil_fast.eval.runner import EvalOptions, Evaluator

    options = EvalOptions(xmr_protocols=tuple(protocols))
    return Evaluator.build(
        root, ["itc"], image_size, batch_size, device="cpu", backend="pil", options=options
    )


def run_study(
    root: str,
    out: str | Path,
    pretrain_updates: int,
    finetune_updates: int,
    clip: str = "tiny",
    image_size: int = 64,
    batch_size: int = 32,
    seed: int = 0,
    long_baseline: bool = True,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Train the arms of the module docstring under ``out`` and return their scores. Each arm trains in
    ``out/<arm>``; a study run again into the same ``out`` starts afresh: a previous arm's directory is
    renamed to ``<arm>.previous`` first (replacing an older one)."""
    from famevil_fast.train.checkpoint import set_aside_run_dir

    out = Path(out)
    size = dict(clip=clip, image_size=image_size, batch_size=batch_size, seed=seed, extra=extra)
    pre = pretrain_config(root, out / "pretrain", pretrain_updates, **size)
    init = str(out / "pretrain" / "final")
    configs = {
        "pretrain": pre,
        "pretrained": finetune_config(root, out / "pretrained", finetune_updates, init, **size),
        "scratch": finetune_config(root, out / "scratch", finetune_updates, None, **size),
    }
    if long_baseline:
        total = pretrain_updates * pre.train.update_frequency + finetune_updates
        configs["scratch_long"] = finetune_config(root, out / "scratch_long", total, None, **size)
    for name, config in configs.items():
        if not config.checkpoint.resume:
            set_aside_run_dir(config.checkpoint.dir, f"'{name}' run of the study")
    evaluator = build_evaluator(root, image_size)
    arms = {name: _train(cfg, None if name == "pretrain" else evaluator) for name, cfg in configs.items()}
    study = {
        "root": root,
        "pretrain_updates": pretrain_updates,
        "finetune_updates": finetune_updates,
        "clip": clip,
        "image_size": image_size,
        "batch_size": batch_size,
        "seed": seed,
        "arms": arms,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(study, indent=2))
    return study


def summary(study: dict[str, Any]) -> str:
    head = f"{'arm':<14} {'updates':>7} {'seconds':>8}  {'XMR full avg':>12} {'i2t R@1':>8} {'t2i R@1':>8}"
    lines, chance = [head], None
    for name, arm in study["arms"].items():
        if not arm["eval"]:
            continue
        full, chance = arm["eval"]["xmr/full"], arm["chance"]["xmr/full"]
        lines.append(
            f"{name:<14} {arm['updates']:>7} {arm['seconds']:>8}  {full['avg']:>12.2f} "
            f"{full['i2t_r@1']:>8.2f} {full['t2i_r@1']:>8.2f}"
        )
    if chance:
        lines.append(
            f"{'chance':<14} {'':>7} {'':>8}  {chance['avg']:>12.2f} {chance['i2t_r@1']:>8.2f} "
            f"{chance['t2i_r@1']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="data root (e.g. a `famevil-fast make-synthetic` directory)")
    parser.add_argument("out", help="directory for the runs and study.json")
    parser.add_argument("--pretrain-updates", type=int, default=200)
    parser.add_argument("--finetune-updates", type=int, default=200)
    parser.add_argument("--clip", default="tiny")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-long-baseline", action="store_true", help="skip the equal-compute baseline")
    parser.add_argument(
        "--set", dest="extra", action="append", default=[], help="extra override for every run"
    )
    args = parser.parse_args(argv)
    study = run_study(
        args.root,
        args.out,
        args.pretrain_updates,
        args.finetune_updates,
        args.clip,
        args.image_size,
        args.batch_size,
        args.seed,
        not args.no_long_baseline,
        args.extra,
    )
    print(summary(study))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
