"""``famevil-fast embed``: L2-normalised embeddings of images and/or texts, written to a safetensors file."""

from __future__ import annotations

import argparse

from famevil_fast.cli.options import (
    add_device_argument,
    add_eval_resize_argument,
    add_trust_pickle_argument,
    output_file,
    positive_int,
)
from famevil_fast.devices import resolve_device

NAME = "embed"
HELP = "Embed image files/folders and/or lines of a text file with a FAME-ViL checkpoint (two-tower mode)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or file (famevil_fast or official layout)")
    add_trust_pickle_argument(parser)
    parser.add_argument("--images", nargs="*", default=[], help="image files or folders")
    parser.add_argument("--texts", default=None, help="text file, one text per line")
    parser.add_argument(
        "--task",
        default="itc",
        choices=("itc", "tgir"),
        help="whose adapters to use: itc (retrieval) or tgir (targets)",
    )
    parser.add_argument(
        "--out",
        type=output_file,
        required=True,
        help="output .safetensors (tensors 'image', 'text'); missing parent directories are created",
    )
    add_eval_resize_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="inputs per batch")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from famevil_fast.cli.images import collect_images, load_pixels
    from famevil_fast.model import FameViL
    from famevil_fast.text import tokenize

    if not args.images and not args.texts:
        raise ValueError("nothing to embed: give --images and/or --texts")
    device = resolve_device(args.device)
    model = FameViL.from_pretrained(args.checkpoint, trust_pickle=args.trust_pickle).to(device).eval()
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"task": args.task}
    bs = args.batch_size
    with torch.no_grad():
        if args.images:
            files = collect_images(args.images)
            size = model.config.clip.vision.image_size
            chunks = (files[i : i + bs] for i in range(0, len(files), bs))
            batches = (load_pixels(chunk, size, args.eval_resize) for chunk in chunks)
            out["image"] = torch.cat([model.encode_image(b.to(device), args.task).cpu() for b in batches])
            meta["images"] = "\n".join(map(str, files))
        if args.texts:
            path = Path(args.texts)
            if not path.exists():
                raise FileNotFoundError(f"text file not found: {path}")
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if not lines:
                raise ValueError(f"text file {path} holds no text (one text per line)")
            ids = tokenize(lines)
            out["text"] = torch.cat(
                [
                    model.encode_text(ids[i : i + bs].to(device), args.task).cpu()
                    for i in range(0, len(lines), bs)
                ]
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(out, args.out, metadata=meta)
    print(f"wrote {', '.join(f'{k} {tuple(v.shape)}' for k, v in out.items())} to {args.out}")
    return 0
