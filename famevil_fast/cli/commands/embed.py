"""``famevil-fast embed``: L2-normalised embeddings of images and/or texts, written to a safetensors file."""

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
    check_output_file,
    output_file,
    positive_int,
)

if TYPE_CHECKING:
    import torch

    from famevil_fast.eval.sharding import EvalShard

NAME = "embed"
HELP = (
    "Embed image files/folders and/or lines of a text file with a FAME-ViL checkpoint (two-tower mode; under "
    "torchrun the processes share the inputs and rank 0 writes the file)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_argument(parser)
    add_trust_pickle_argument(parser)
    parser.add_argument(
        "--images",
        nargs="*",
        default=[],
        help="image files, or folders (their .jpg/.jpeg/.png/.webp/.bmp files, not subfolders; a file named "
        "twice is embedded once); the file "
        "records the paths as given here and `search` prints them as stored, so a relative path resolves "
        "only from the directory embed ran in",
    )
    parser.add_argument(
        "--texts",
        default=None,
        help="UTF-8 text file, one text per line, lines ended by \\n or \\r\\n (row i of the tensor `text` "
        "is line i + 1; blank lines are refused but at the end)",
    )
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
        help="output file, its name ending in .safetensors: tensors 'image' (N, D) and 'text' (M, D); the "
        "image paths, one per line, in the metadata field 'images' (a list over 32 MB in "
        "OUT.images.<checksum>.txt, named by the field 'images_file'); the field 'model_fingerprint' "
        "identifies the model that embedded the images, which `search` checks; missing parent directories "
        "are created",
    )
    add_eval_resize_argument(parser)
    parser.add_argument("--batch-size", type=positive_int, default=64, help="inputs per batch")
    add_device_argument(parser)
    add_op_backend_argument(parser)


def run(args: argparse.Namespace) -> int:
    from famevil_fast.cli.processes import command_processes

    if Path(args.out).suffix != ".safetensors":
        raise ValueError(f"--out must name a .safetensors file (embed writes safetensors), got {args.out}")
    if not args.images and not args.texts:
        raise ValueError("nothing to embed: give --images and/or --texts")
    check_output_file(args.out)  # before anything is embedded
    with command_processes(args.device) as (shard, device):  # under torchrun each embeds its share
        out, meta = _embed(args, shard, device)
    if shard.is_main:
        from famevil_fast.cli.gallery_file import write_gallery

        listing = write_gallery(args.out, out, meta)  # parent folders made, plain permissions
        listed = f" (image paths in {listing})" if listing is not None else ""
        print(f"wrote {', '.join(f'{k} {tuple(v.shape)}' for k, v in out.items())} to {args.out}{listed}")
    return 0


def _texts(path: Path) -> list[str]:
    """The texts of a UTF-8 file, one a line, so that row i of ``text`` is line i + 1: a blank line before
    the last text is refused (it would shift the rows after it); blank lines at the end are ignored."""
    if not path.exists():
        raise FileNotFoundError(f"text file not found: {path}")
    if not path.is_file():
        raise ValueError(f"--texts must name a text file, got {path} (not a file)")
    try:
        content = path.read_bytes().decode("utf-8")  # no newline translation: a lone "\r" ends no line
    except UnicodeDecodeError as error:
        reason = f"{error.reason} at byte {error.start}"
        raise ValueError(f"text file {path} is not UTF-8 text ({reason})") from None
    lines = [line.strip() for line in content.split("\n")]  # only "\n" ends a line (a "\r" before it is
    # stripped): str.splitlines would also end one at a form feed or U+2028 inside a text
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise ValueError(f"text file {path} holds no text (one text per line)")
    if "" in lines:
        raise ValueError(
            f"text file {path}: line {lines.index('') + 1} is blank; give one text on every line (row i of "
            "the embeddings is line i + 1)"
        )
    return lines


def _embed(
    args: argparse.Namespace, shard: EvalShard, device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The embeddings (on the CPU; under torchrun, process 0 holds all of them and the others none) and the
    file's metadata."""
    import torch

    from famevil_fast.cli.images import ImageFileBatches, collect_images
    from famevil_fast.model import FameViL
    from famevil_fast.text import tokenize

    texts = _texts(Path(args.texts)) if args.texts else None  # checked before the model is loaded
    files = collect_images(args.images) if args.images else None
    if files is not None:
        from famevil_fast.cli.gallery_file import check_image_paths

        check_image_paths(list(map(str, files)))  # before the model is loaded and anything embedded
    model = FameViL.from_pretrained(args.checkpoint, trust_pickle=args.trust_pickle)
    meta: dict[str, str] = {"task": args.task}
    if files is not None and shard.is_main:
        from famevil_fast.cli.gallery_file import model_fingerprint

        meta["model_fingerprint"] = model_fingerprint(model, args.task)  # on the CPU, before the move
    apply_op_backend(model, args.op_backend)
    model = model.to(device).eval()
    parts: dict[str, list[torch.Tensor]] = {}  # per batch, in order: in process 0 alone under torchrun
    bs = args.batch_size
    with torch.no_grad():
        if files is not None:
            batches = ImageFileBatches(files, bs, model.config.clip.vision.image_size, args.eval_resize)
            parts["image"] = shard.map_batches(
                batches, lambda b: model.encode_image(b[1].to(device), args.task).cpu()
            )
            meta["images"] = "\n".join(map(str, files))
            meta["eval_resize"] = args.eval_resize  # search reads its references the same way
        if texts is not None:
            ids = tokenize(texts)
            chunks = [ids[i : i + bs] for i in range(0, len(texts), bs)]
            parts["text"] = shard.map_batches(
                chunks, lambda chunk: model.encode_text(chunk.to(device), args.task).cpu()
            )
    if not shard.is_main:
        return {}, meta
    return {name: torch.cat(values) for name, values in parts.items()}, meta
