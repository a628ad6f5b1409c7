"""``famevil-fast eval``: evaluate a checkpoint on a dataset with every protocol of its tasks."""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING

from famevil_fast.cli.options import (
    add_device_argument,
    add_eval_resize_argument,
    add_op_backend_argument,
    add_trust_pickle_argument,
    apply_op_backend,
    check_output_file,
    non_negative_int,
    output_file,
    positive_int,
)

if TYPE_CHECKING:
    import torch

    from famevil_fast.eval.report import EvalReport
    from famevil_fast.eval.runner import EvalOptions
    from famevil_fast.model import FameViL

NAME = "eval"
HELP = (
    "Evaluate a FAME-ViL checkpoint (famevil_fast or official layout) on a dataset; prints the tables. "
    "Under torchrun the processes share the encoding and rank 0 prints."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from famevil_fast.data.eval_sets import EVAL_VIEWS
    from famevil_fast.eval.runner import CAPTION_REFERENCES
    from famevil_fast.eval.xmr import XMR_PROTOCOLS
    from famevil_fast.text.special_tokens import CAPTION_TOKENS

    parser.add_argument("checkpoint", help="checkpoint directory or file")
    add_trust_pickle_argument(parser)
    parser.add_argument(
        "--clip",
        action="store_true",
        help="the checkpoint holds CLIP weights (OpenAI .pt, open_clip, Hugging Face): score CLIP zero-shot "
        "under the same protocols, a baseline for fine-tuned models (tasks itc and tgir: retrieval by CLIP "
        "embeddings, TGIR queries as the sum of the reference image's and the text's embeddings; the "
        "classification and captioning heads would be untrained)",
    )
    parser.add_argument("--data", required=True, help="dataset root holding FashionGen/ and FashionIQ/")
    parser.add_argument(
        "--tasks", nargs="+", default=None, help="tasks to evaluate (default: all of the model's)"
    )
    parser.add_argument("--split", default="val", help="dataset split")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="evaluation batch size")
    add_device_argument(parser)
    parser.add_argument(
        "--backend", default=None, help="image decoding backend (dali, torchvision, pil, cache)"
    )
    parser.add_argument("--cache", default=None, help="pre-decoded image cache directory")
    parser.add_argument(
        "--config",
        default=None,
        help="recipe (path or packaged name) whose eval section sets the protocols, caption decoding and "
        "caption metrics, e.g. tiny_cpu to score a demo checkpoint as the demo does; the options below "
        "override it",
    )
    parser.add_argument(
        "--xmr-protocols",
        nargs="+",
        default=None,
        choices=XMR_PROTOCOLS,
        help="cross-modal retrieval protocols (default: full sampled, or the --config recipe's)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the sampled-100 protocol, from -2**63 to 2**64 - 1 (default: 0, or the --config "
        "recipe's)",
    )
    parser.add_argument(
        "--unseeded",
        action="store_true",
        help="draw the sampled-100 protocol's candidates from the global RNG, as the official code "
        "(results vary from run to run); overrides --seed",
    )
    parser.add_argument(
        "--beams",
        type=positive_int,
        default=None,
        help="caption beam width (default: 1 = greedy, or the --config recipe's)",
    )
    parser.add_argument(
        "--max-len",
        type=positive_int,
        default=None,
        help=f"longest generated caption (default: {CAPTION_TOKENS}, or the --config recipe's)",
    )
    parser.add_argument(
        "--max-len-from-references",
        action="store_true",
        help="cap each batch's captions at its longest reference's length, as the official code (it "
        "leaks the reference lengths); replaces --max-len",
    )
    parser.add_argument(
        "--references",
        choices=list(CAPTION_REFERENCES),
        default=None,
        help="caption references: the product text after a round trip through the CLIP tokenizer, as "
        "the official code (clip, default), or as written (raw)",
    )
    parser.add_argument(
        "--no-repeat-ngram",
        type=non_negative_int,
        default=None,
        help="forbid repeating any n-gram of this length (default: 0 = off, or the --config recipe's)",
    )
    add_eval_resize_argument(parser, default=None, default_help="keep_aspect, or the --config recipe's")
    parser.add_argument(
        "--views",
        choices=list(EVAL_VIEWS),
        default=None,
        help="product views scored in SCR, captioning and on the XMR image side: every view, as the official "
        "protocol (all, default), or the first view of each product (first)",
    )
    parser.add_argument(
        "--max-samples", type=positive_int, default=None, help="cap every evaluation set (quick checks)"
    )
    parser.add_argument("--bf16", action="store_true", help="run the model under bf16 autocast")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="decode captions by CUDA graph replay (same captions)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decode captions with each step compiled by torch.compile (Inductor; eval.caption_compile)",
    )
    add_op_backend_argument(parser, decodes=True)
    parser.add_argument(
        "--out",
        type=output_file,
        default=None,
        help="also write the report as JSON here (missing folders are made); checked before the evaluation "
        "starts: a directory, or a place where no file can be created, is refused",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar while each set is encoded"
    )


def eval_options(args: argparse.Namespace) -> EvalOptions:
    """The evaluation options: the recipe's eval section (``--config``) or the built-in defaults, with every
    option given on the command line taking precedence. Without a recipe, every caption metric that can run
    is computed (METEOR when Java is found)."""
    from famevil_fast.eval.runner import EvalOptions

    if args.config:
        from famevil_fast.configs import resolve
        from famevil_fast.train.config import load_config

        options = EvalOptions.from_section(load_config(resolve(args.config)).eval)
    else:
        options = EvalOptions(caption_metrics=None)
    given = {
        "xmr_protocols": args.xmr_protocols,
        "sampled_seed": args.seed,
        "caption_beams": args.beams,
        "caption_max_len": args.max_len,
        "caption_no_repeat_ngram": args.no_repeat_ngram,
        "max_samples": args.max_samples,
        "caption_references": args.references,
        "eval_resize": args.eval_resize,
        "views": args.views,
    }
    options = dataclasses.replace(options, **{k: v for k, v in given.items() if v is not None})
    switches = {
        "caption_cuda_graph": args.cuda_graph,
        "caption_compile": args.compile,
        "caption_len_from_references": args.max_len_from_references,
    }
    options = dataclasses.replace(options, **{k: True for k, on in switches.items() if on})
    if args.unseeded:
        options = dataclasses.replace(options, sampled_seed=None)
    return dataclasses.replace(options, progress=not args.no_progress)


def evaluable_tasks(tasks: tuple[str, ...], checkpoint: str) -> list[str]:
    """The model's tasks that have an evaluation protocol (pre-training objectives have none)."""
    from famevil_fast.model.config import PRETRAIN_TASKS

    kept = [t for t in tasks if t not in PRETRAIN_TASKS]
    if not kept:
        raise ValueError(
            f"{checkpoint} holds only pre-training tasks {list(tasks)}, which have no evaluation protocol; "
            "fine-tune it on a downstream task (model.init_from) and evaluate that"
        )
    return kept


ZERO_SHOT_TASKS = ("itc", "tgir")  # the tasks a CLIP model can be scored on without trained heads


def zero_shot_tasks(requested: list[str] | None) -> list[str]:
    """The tasks ``--clip`` evaluates: ``requested`` (default: all of ZERO_SHOT_TASKS), each of which must
    be scorable by CLIP embeddings alone."""
    tasks = list(requested or ZERO_SHOT_TASKS)
    untrained = [t for t in tasks if t not in ZERO_SHOT_TASKS]
    if untrained:
        raise ValueError(
            f"--clip scores CLIP zero-shot, which has no trained head for {untrained}; zero-shot tasks are "
            f"{list(ZERO_SHOT_TASKS)}"
        )
    return tasks


def load_model(args: argparse.Namespace) -> tuple[FameViL, list[str]]:
    """(model in eval mode, tasks to evaluate) for the checkpoint and ``--clip`` / ``--tasks``."""
    from famevil_fast.model import FameViL

    if args.clip:
        tasks = zero_shot_tasks(args.tasks)
        return FameViL.from_clip(args.checkpoint, trust_pickle=args.trust_pickle), tasks
    model = FameViL.from_pretrained(args.checkpoint, trust_pickle=args.trust_pickle)
    if args.tasks:
        lacking = [t for t in args.tasks if t not in model.config.tasks]
        if lacking:  # before any evaluation set is read
            raise ValueError(
                f"--tasks {' '.join(lacking)}: {args.checkpoint} has no such task (its tasks: "
                f"{', '.join(model.config.tasks)})"
            )
    return model, args.tasks or evaluable_tasks(model.config.tasks, args.checkpoint)


def run(args: argparse.Namespace) -> int:
    from famevil_fast.cli.processes import command_processes

    if args.out:
        check_output_file(args.out)
    with command_processes(args.device) as (shard, device):  # under torchrun each encodes its share
        report = _evaluate(args, device)
    if shard.is_main:
        print(report.to_text())
        if args.out:
            report.save(args.out)
    return 0


def _evaluate(args: argparse.Namespace, device: torch.device) -> EvalReport:
    import contextlib

    import torch

    from famevil_fast.data import build_eval_sets
    from famevil_fast.eval.runner import Evaluator

    model, tasks = load_model(args)
    options = eval_options(args)
    if "cap" in tasks:  # before anything is encoded
        from famevil_fast.cli.commands.caption import check_max_len
        from famevil_fast.eval.caption_tokenize import require_caption_metrics

        require_caption_metrics(options.caption_metrics, "the recipe's eval.caption_metrics")
        if not options.caption_len_from_references:
            check_max_len(options.caption_max_len, model.config.clip.text.context_length)
    model = model.to(device).eval()
    apply_op_backend(model, args.op_backend)
    size = model.config.clip.vision.image_size
    sets = {
        t: build_eval_sets(
            t,
            args.data,
            image_size=size,
            batch_size=args.batch_size,
            backend=args.backend,
            device=device,
            cache_dir=args.cache,
            split=args.split,
            views=options.views,
            eval_resize=options.eval_resize,
        )
        for t in tasks
    }
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    with autocast:
        return Evaluator(sets, options).report(model)
