"""``famevil-fast convert``: move checkpoints between layouts (official FAME-ViL, famevil_fast, Hugging Face
CLIP), or start a FAME-ViL checkpoint from CLIP weights."""

from __future__ import annotations

import argparse

NAME = "convert"
HELP = (
    "Convert a checkpoint: official FAME-ViL <-> famevil_fast, famevil_fast -> Hugging Face CLIP, "
    "CLIP -> FAME-ViL."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint file or directory (any supported layout)")
    parser.add_argument("dest", help="output: a directory (famevil_fast), or a .pth / .safetensors file")
    parser.add_argument(
        "--to",
        default="famevil_fast",
        choices=["famevil_fast", "official", "huggingface"],
        help="output layout",
    )
    parser.add_argument(
        "--from-clip",
        action="store_true",
        help="the source holds CLIP weights only: add fresh adapters and heads (a FAME-ViL at init)",
    )
    parser.add_argument("--bottleneck", type=int, default=64, help="task-adapter r with --from-clip")
    parser.add_argument("--prefix", default="model.", help="key prefix of the official layout")
    parser.add_argument(
        "--trust-pickle", action="store_true", help="allow non-tensor objects in a trusted .pth/.ckpt"
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from famevil_fast.model import FameViL, FameViLConfig
    from famevil_fast.model.export import to_huggingface, to_official_famevil
    from famevil_fast.model.weights import load_clip_state_dict

    if args.from_clip:
        _, clip = load_clip_state_dict(args.source)
        model = FameViL.from_clip(args.source, FameViLConfig(clip=clip, adapter_bottleneck=args.bottleneck))
    else:
        model = FameViL.from_pretrained(args.source, trust_pickle=args.trust_pickle)
    if args.to == "famevil_fast":
        model.save_pretrained(args.dest)
    elif args.to == "official":
        torch.save(to_official_famevil(model.state_dict(), prefix=args.prefix), args.dest)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in to_huggingface(model.state_dict()).items()}, args.dest)
    print(f"wrote {args.to} checkpoint to {args.dest} ({model.parameter_counts()['total']:,} parameters)")
    return 0
