"""``famevil-fast caption``: describe images with a trained model (greedy or beam search, cached decoding)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from famevil_fast.cli.options import (
    add_checkpoint_argument,
    add_device_argument,
    add_eval_resize_argument,
    add_op_backend_argument,
    add_trust_pickle_argument,
    apply_op_backend,
    non_negative_int,
    positive_int,
)

if TYPE_CHECKING:
    import torch

    from famevil_fast.eval.sharding import EvalShard

NAME = "caption"
HELP = (
    "Generate captions for image files or folders with a FAME-ViL checkpoint (under torchrun the processes "
    "share the images and rank 0 prints)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    add_trust_pickle_argument(parser)
    parser.add_argument(
        "images",
        nargs="+",
        help="image files, or folders (their .jpg/.jpeg/.png/.webp/.bmp files, not subfolders); a file named "
        "twice is captioned once",
    )
    parser.add_argument("--beams", type=positive_int, default=1, help="beam width (1 = greedy)")
    parser.add_argument(
        "--max-len",
        type=positive_int,
        default=40,
        help="longest caption in tokens: at most the model's text context less the start token (76 for CLIP)",
    )
    parser.add_argument(
        "--no-repeat-ngram",
        type=non_negative_int,
        default=0,
        help="forbid repeating any n-gram of this length (0 = off, as the reference; tiny_cpu uses 2)",
    )
    add_eval_resize_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per batch")
    add_device_argument(parser)
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each batch's whole decode as one CUDA graph (same captions, fewer launches)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run each decoding step as one torch.compile (Inductor) graph: about a third fewer kernels a "
        "step, alone or with --cuda-graph (in place of the fused step of --op-backend triton); the first "
        "batch of a new size or --max-len compiles first (tens of seconds); captions match except where two "
        "words tie to within rounding",
    )
    add_op_backend_argument(parser, decodes=True)


def run(args: argparse.Namespace) -> int:
    from famevil_fast.cli.processes import command_processes

    with command_processes(args.device) as (shard, device):  # under torchrun each captions its share
        _caption(args, shard, device)
    return 0


def check_max_len(max_len: int, context_length: int) -> None:
    """ValueError unless ``max_len`` tokens fit the text context after the start token."""
    limit = context_length - 1
    if max_len > limit:
        raise ValueError(
            f"--max-len must be at most {limit} (the model's text context of {context_length} tokens, "
            f"less the start token), got {max_len}"
        )


def _caption(args: argparse.Namespace, shard: EvalShard, device: torch.device) -> None:
    """Print ``file<TAB>caption`` per image, in order: as each batch is done in one process; by rank 0 once
    every process has captioned its share under torchrun."""
    from famevil_fast.cli.images import ImageFileBatches, collect_images
    from famevil_fast.model import FameViL

    files = collect_images(args.images)
    model = FameViL.from_pretrained(args.checkpoint, trust_pickle=args.trust_pickle).to(device).eval()
    check_max_len(args.max_len, model.config.clip.text.context_length)
    apply_op_backend(model, args.op_backend)
    batches = ImageFileBatches(files, args.batch_size, model.config.clip.vision.image_size, args.eval_resize)

    def caption(batch: tuple[list[Path], torch.Tensor]) -> list[str]:
        chunk, pixels = batch
        captions = model.caption(
            pixels.to(device),
            max_len=args.max_len,
            num_beams=args.beams,
            no_repeat_ngram=args.no_repeat_ngram,
            cuda_graph=args.cuda_graph,
            compiled=args.compile,
        )
        lines = [f"{f}\t{text}" for f, text in zip(chunk, captions)]
        if not shard.enabled:
            print("\n".join(lines), flush=True)
        return lines

    done = shard.map_batches(batches, caption)  # every batch's lines in rank 0; [] in the others
    if shard.enabled and shard.is_main:
        print("\n".join(line for lines in done for line in lines))
