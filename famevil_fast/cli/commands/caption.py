"""``famevil-fast caption``: describe images with a trained model (greedy or beam search, cached decoding)."""

from __future__ import annotations

import argparse

from famevil_fast.cli.options import (
    add_device_argument,
    add_eval_resize_argument,
    add_op_backend_argument,
    add_trust_pickle_argument,
    non_negative_int,
    positive_int,
)
from famevil_fast.devices import resolve_device

NAME = "caption"
HELP = "Generate captions for image files or folders with a FAME-ViL checkpoint."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or file (famevil_fast or official layout)")
    add_trust_pickle_argument(parser)
    parser.add_argument("images", nargs="+", help="image files or folders")
    parser.add_argument("--beams", type=positive_int, default=1, help="beam width (1 = greedy)")
    parser.add_argument("--max-len", type=positive_int, default=40, help="longest caption in tokens")
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
    add_op_backend_argument(parser)


def run(args: argparse.Namespace) -> int:

    from famevil_fast.cli.images import collect_images, load_pixels
    from famevil_fast.model import FameViL

    device = resolve_device(args.device)
    model = FameViL.from_pretrained(args.checkpoint, trust_pickle=args.trust_pickle).to(device).eval()
    if args.op_backend is not None:
        model.set_runtime(backend=args.op_backend)
    files = collect_images(args.images)
    size = model.config.clip.vision.image_size
    for start in range(0, len(files), args.batch_size):
        chunk = files[start : start + args.batch_size]
        captions = model.caption(
            load_pixels(chunk, size, args.eval_resize).to(device),
            max_len=args.max_len,
            num_beams=args.beams,
            no_repeat_ngram=args.no_repeat_ngram,
            cuda_graph=args.cuda_graph,
        )
        for f, text in zip(chunk, captions):
            print(f"{f}\t{text}")
    return 0
