"""``famevil-fast info``: the build (compiled extension, CUDA, Triton) and a model's parameter budget."""

from __future__ import annotations

import argparse
import platform

from famevil_fast.cli.options import add_trust_pickle_argument, positive_int

NAME = "info"
HELP = "Show the build (extension, CUDA, Triton, backends) and a model's parameters per component."


# the model whose parameters are counted without --checkpoint
DEFAULTS = {"clip": "ViT-B-16", "bottleneck": 64, "xaa": "both"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--clip",
        default=None,
        help=f"CLIP preset (ViT-B-16, ViT-B-32, ViT-L-14, tiny, micro) (default: {DEFAULTS['clip']}); with "
        "--checkpoint, the preset of a checkpoint that carries no config (one that carries another config "
        "is refused)",
    )
    parser.add_argument(
        "--bottleneck",
        type=positive_int,
        default=None,
        help=f"task-adapter bottleneck r (default: {DEFAULTS['bottleneck']})",
    )
    parser.add_argument(
        "--xaa",
        default=None,
        choices=["both", "text", "none"],
        help=f"cross-attention adapters (default: {DEFAULTS['xaa']})",
    )
    parser.add_argument(
        "--checkpoint",
        default=None,
        help="count the parameters of this checkpoint instead (its own config: not with --bottleneck or "
        "--xaa; --clip only for a checkpoint that carries no config)",
    )
    add_trust_pickle_argument(parser)


def model_options(args: argparse.Namespace) -> dict[str, object]:
    """--clip, --bottleneck and --xaa with their defaults applied; ValueError when --bottleneck or --xaa
    is given with --checkpoint, whose config they cannot change (--clip there is the CLIP preset of a
    checkpoint that carries no config, see ``parameter_table``)."""
    given = {name: getattr(args, name) for name in DEFAULTS}
    if args.checkpoint:
        named = [f"--{name}" for name, value in given.items() if value is not None and name != "clip"]
        if named:
            raise ValueError(
                f"{' and '.join(named)} cannot be used with --checkpoint, which counts the checkpoint's own "
                "model (its sizes come from the checkpoint; --clip only names the CLIP preset of a "
                "checkpoint that carries no config); they describe the model counted without it"
            )
        return {}
    return {name: DEFAULTS[name] if value is None else value for name, value in given.items()}


def build_report() -> list[tuple[str, str]]:
    import torch

    from famevil_fast import __version__, _ext
    from famevil_fast.ops._backend import forced_backend, triton_importable

    rows = [
        ("famevil_fast", __version__),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})"),
        ("CUDA device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none"),
        ("compiled extension", "yes" if _ext.cpu_ext_available() else f"no ({_ext.import_error()})"),
        ("  with CUDA kernels", "yes" if _ext.cuda_ext_available() else "no"),
        ("  CPU kernels threaded", _threading(_ext.cpu_ext_threaded())),
        ("triton", _triton_version() if triton_importable() else "not installed"),
        ("flash-attn", "installed" if _flash_attn() else "not installed (SDPA is used)"),
        ("forced backend", forced_backend() or "none (automatic)"),
    ]
    return rows


def _threading(threaded: bool | None) -> str:
    import torch

    from famevil_fast import _ext

    if not _ext.cpu_ext_available():
        return "no extension"
    if threaded is None:
        return "unknown (an extension built before it reported this: rebuild it)"
    if threaded:
        return f"yes ({torch.get_num_threads()} threads)"
    return "no (built without OpenMP, which torch's threads use here: one thread)"


def _triton_version() -> str:
    import triton

    return triton.__version__


def _flash_attn() -> bool:
    from famevil_fast.model.attention import _flash_attn_func

    return _flash_attn_func() is not None


def parameter_table(args: argparse.Namespace) -> dict[str, int]:
    import torch

    from famevil_fast.cli.options import refused_preset
    from famevil_fast.model import FameViL, FameViLConfig, clip_preset
    from famevil_fast.model.weights import load_famevil_checkpoint

    if args.checkpoint:
        preset = clip_preset(args.clip) if args.clip else None
        with refused_preset(args.clip, f"--checkpoint {args.checkpoint}"):
            model = load_famevil_checkpoint(FameViL, args.checkpoint, args.trust_pickle, preset=preset)
        return model.parameter_counts()
    o = model_options(args)
    config = FameViLConfig(clip=clip_preset(o["clip"]), adapter_bottleneck=o["bottleneck"], xaa=o["xaa"])
    with torch.device("meta"):
        return FameViL(config).parameter_counts()


def run(args: argparse.Namespace) -> int:
    o = model_options(args)
    counts = parameter_table(args)  # before anything is printed: a bad --checkpoint or --clip is one line
    for key, value in build_report():
        print(f"{key:<22} {value}")
    print()
    source = args.checkpoint or f"{o['clip']}, r={o['bottleneck']}, xaa={o['xaa']}"
    print(f"parameters of FAME-ViL ({source}):")
    for name, count in counts.items():
        print(f"  {name:<12} {count:>13,}  ({count / 1e6:.2f}M)")
    return 0
