"""``famevil-fast convert``: move checkpoints between layouts (official FAME-ViL, famevil_fast, Hugging Face
CLIP), or start a FAME-ViL checkpoint from CLIP weights.

``--to`` picks the layout (the parameter names); for a file DEST its suffix picks the file type
(``.safetensors``, or a torch pickle for ``.pth``/``.pt``/``.bin``/``.ckpt``). ``--to famevil_fast`` writes
a directory; ``--to official`` a file; ``--to huggingface`` either a file, or, for a DEST with no suffix or
an existing directory, a Hugging Face model directory (``model.safetensors`` and a ``CLIPConfig``
``config.json``) that ``transformers.CLIPModel.from_pretrained`` loads. The Hugging Face export holds the
CLIP backbone alone (no task adapters, cross-attention adapters or heads). Files keep the model config
beside the weights (safetensors metadata, or a sidecar ``<file>.config.json``) so that converting back
rebuilds the same model. Missing parent directories of DEST are created.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from famevil_fast.cli.options import add_trust_pickle_argument, positive_int

if TYPE_CHECKING:
    from famevil_fast.model import FameViL

NAME = "convert"
HELP = (
    "Convert a checkpoint: official FAME-ViL <-> famevil_fast, famevil_fast -> Hugging Face CLIP, "
    "CLIP -> FAME-ViL."
)
DEFAULT_BOTTLENECK = 64  # --bottleneck where it applies
DEFAULT_PREFIX = "model."  # --prefix where it applies


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="checkpoint file or directory (any supported layout)")
    parser.add_argument(
        "dest",
        help="output: a directory for --to famevil_fast; a .safetensors / .pth / .pt / .bin / .ckpt file for "
        "--to official, its suffix picking the file type (safetensors or a torch pickle; the config goes in "
        "the safetensors metadata or in DEST.config.json); for --to huggingface either such a file or a "
        "directory (no suffix, or an existing directory) holding model.safetensors and a Hugging Face "
        "config.json that transformers' CLIPModel.from_pretrained loads",
    )
    parser.add_argument(
        "--to",
        default="famevil_fast",
        choices=["famevil_fast", "official", "huggingface"],
        help="output layout: famevil_fast (every weight), official FAME-ViL (mmf), or huggingface (CLIPModel "
        "names: the CLIP backbone only, without adapters or heads)",
    )
    parser.add_argument(
        "--from-clip",
        action="store_true",
        help="the source holds CLIP weights only: add fresh adapters and heads (a FAME-ViL at init); a "
        "FAME-ViL checkpoint is refused, since its trained adapters and heads would be discarded",
    )
    parser.add_argument(
        "--bottleneck",
        type=positive_int,
        default=None,
        help=f"task-adapter r of the fresh adapters; only with --from-clip and --to famevil_fast or official "
        f"(default: {DEFAULT_BOTTLENECK})",
    )
    parser.add_argument(
        "--prefix",
        default=None,
        help=f"key prefix of the official layout, empty or ending in '.' (famevil_fast reads back '', "
        f"'model.', 'module.' and 'module.model.'); only with --to official (default: {DEFAULT_PREFIX!r})",
    )
    parser.add_argument(
        "--clip",
        default=None,
        metavar="PRESET",
        help="CLIP preset (e.g. tiny, ViT-B-16) for a source that carries no config and whose attention-head "
        "counts cannot be inferred from its widths; a source that carries a config other than the preset's "
        "is refused",
    )
    add_trust_pickle_argument(parser)


def run(args: argparse.Namespace) -> int:
    from famevil_fast.model.export import FILE_SUFFIXES, save_huggingface, save_official

    dest = Path(args.dest)
    if args.to == "famevil_fast" and dest.suffix in FILE_SUFFIXES:
        raise ValueError(
            f"--to famevil_fast writes a directory, but {dest} names a {dest.suffix} file: "
            "give a directory, or use --to official / --to huggingface for a single file"
        )
    check_not_source(dest, Path(args.source))
    check_options(args)
    model = _load(args)
    if args.to == "famevil_fast":
        written = [model.save_pretrained(dest)]
    elif args.to == "official":
        prefix = DEFAULT_PREFIX if args.prefix is None else args.prefix
        written = save_official(model, dest, prefix=prefix)
    else:
        written = save_huggingface(model, dest)
    print(f"wrote {args.to} checkpoint to {' + '.join(map(str, written))} ({_contents(model, args.to)})")
    return 0


def _contents(model: FameViL, layout: str) -> str:
    """What the output holds: its parameter count and, for the Hugging Face export, what it leaves out."""
    from famevil_fast.model.weights import new_module_kinds

    counts = model.parameter_counts()
    if layout != "huggingface":
        return f"{counts['total']:,} parameters"
    left_out = new_module_kinds(list(model.state_dict()))
    if not left_out:
        return f"{counts['clip']:,} parameters"
    return (
        f"{counts['clip']:,} parameters: the CLIP backbone only; its {', '.join(left_out)} are not included, "
        "a Hugging Face CLIPModel has no place for them"
    )


def check_not_source(dest: Path, source: Path) -> None:
    """Refuse a DEST whose writing could replace the source checkpoint: the source itself, a path inside
    the source directory, or the directory the source file lies in (where a directory output's files go)."""
    d, s = dest.resolve(), source.resolve()
    if d == s or s in d.parents or (s.parent == d and d.is_dir()):
        raise ValueError(
            f"DEST {dest} would write over the source checkpoint {source} (the same path, inside it, or its "
            "folder); give another DEST"
        )


def check_options(args: argparse.Namespace) -> None:
    """Refuse options that would have no effect with the others given (ValueError naming the option)."""
    if args.bottleneck is not None:
        if not args.from_clip:
            raise ValueError(
                "--bottleneck sets the size of the fresh task adapters that --from-clip adds; without "
                "--from-clip the checkpoint's own adapters are converted as they are"
            )
        if args.to == "huggingface":
            raise ValueError(
                "--bottleneck has no effect with --to huggingface, which writes the CLIP backbone only "
                "(no task adapters)"
            )
    if args.prefix is not None and args.to != "official":
        raise ValueError(
            f"--prefix is the key prefix of the official layout and applies only with --to official, "
            f"not --to {args.to}"
        )
    if args.prefix and not args.prefix.endswith("."):
        raise ValueError(
            f"--prefix {args.prefix!r} would be glued onto the key names ({args.prefix}clip.*), which no "
            f"loader reads: give an empty prefix or one ending in '.', e.g. {DEFAULT_PREFIX!r} or "
            "'module.model.'"
        )


def _load(args: argparse.Namespace) -> FameViL:
    from famevil_fast.cli.options import refused_preset
    from famevil_fast.model import FameViL, FameViLConfig, clip_preset
    from famevil_fast.model.famevil import DiscardedWeightsWarning
    from famevil_fast.model.weights import load_clip_state_dict, load_famevil_checkpoint

    preset = clip_preset(args.clip) if args.clip else None
    if args.from_clip:
        with refused_preset(args.clip, str(args.source)):
            clip = load_clip_state_dict(args.source, trust_pickle=args.trust_pickle, preset=preset)[1]
        bottleneck = DEFAULT_BOTTLENECK if args.bottleneck is None else args.bottleneck
        config = FameViLConfig(clip=clip, adapter_bottleneck=bottleneck)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DiscardedWeightsWarning)
            try:
                return FameViL.from_clip(args.source, config, trust_pickle=args.trust_pickle)
            except DiscardedWeightsWarning as found:
                raise ValueError(
                    f"{args.source} is a FAME-ViL checkpoint: it holds trained {found.kinds}, which "
                    "--from-clip would discard (it keeps only the CLIP backbone and adds fresh ones); "
                    "convert it without --from-clip to keep them"
                ) from None
    with refused_preset(args.clip, str(args.source)):
        return load_famevil_checkpoint(FameViL, args.source, trust_pickle=args.trust_pickle, preset=preset)
