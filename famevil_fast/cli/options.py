"""Command-line options that several ``famevil-fast`` commands share (no heavy imports: parsers are built
before any command runs)."""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from famevil_fast.model import FameViL


def add_op_backend_argument(parser: argparse.ArgumentParser, decodes: bool = False) -> None:
    """``--op-backend``: the model's op backend for this command (``FameViL.set_runtime(backend=...)``,
    QuickGELU's included); ``decodes``: the command decodes captions (its help says how)."""
    decoding = (
        " and decodes captions with each text layer of a step fused into seven kernels (on an H200 slower "
        "than --cuda-graph replay of the plain step; --compile decodes with its own step instead)"
        if decodes
        else ""
    )
    parser.add_argument(
        "--op-backend",
        choices=("torch", "triton"),
        default=None,
        help="backend of the model's ops (adapters, losses, QuickGELU): triton runs the fused kernels (a "
        f"GPU, or TRITON_INTERPRET=1 on the CPU){decoding}; torch runs the PyTorch references (default: the "
        "checkpoint's, automatic unless set)",
    )


def apply_op_backend(model: FameViL, op_backend: str | None) -> None:
    """``--op-backend``'s choice for every op of ``model`` (QuickGELU's included, whatever the checkpoint's
    ``activation_backend``); None keeps the checkpoint's."""
    if op_backend is not None:
        model.set_runtime(backend=op_backend, activation_backend=None)


def integer(text: str) -> int:
    """argparse type: any integer (a command checks its range itself, with a one-line error)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse reports anything else as an error of that option)."""
    return int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return int_at_least(text, 0)


def int_at_least(text: str, low: int) -> int:
    """An integer of at least ``low``; ArgumentTypeError (as argparse types raise) naming both otherwise."""
    value = integer(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def check_output_file(path: str) -> None:
    """ValueError naming --out when a file could not be written at ``path``: the nearest of its folders
    that exists must be a directory in which a file can be created (the missing ones below it are made when
    the file is written), so that a bad --out stops a command before its work rather than after."""
    existing = Path(path).absolute().parent
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {path}: {existing} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ValueError(f"--out {path}: cannot create a file in {existing} ({reason})") from None


def output_file(text: str) -> str:
    """argparse type: the path of a file to write, which must not name an existing directory."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give the path of a file to write")
    return text


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``: cpu, cuda or cuda:N (``famevil_fast.devices.resolve_device`` checks it)."""
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available, else cpu)"
    )


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    """The positional ``checkpoint`` of the commands that load a model for inference."""
    parser.add_argument("checkpoint", help="checkpoint directory or file (famevil_fast or official layout)")


def add_trust_pickle_argument(parser: argparse.ArgumentParser) -> None:
    """``--trust-pickle``: read a trusted torch pickle that holds non-tensor objects (a training container
    with a pickled config); without it such files are refused rather than unpickled."""
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow non-tensor objects (a pickled config, say) in a trusted .pth/.ckpt checkpoint; without "
        "it such a file is refused rather than unpickled",
    )


def add_eval_resize_argument(
    parser: argparse.ArgumentParser, default: str | None = "keep_aspect", default_help: str = "keep_aspect"
) -> None:
    """``--eval-resize``: the resize before the evaluation transform's centre crop (``docs/evaluation.md``,
    "Faithful or fixed"); ``default_help`` says in the help what applies when it is not given."""
    from famevil_fast.data.transforms import EVAL_RESIZE_MODES

    parser.add_argument(
        "--eval-resize",
        choices=list(EVAL_RESIZE_MODES),
        default=default,
        help="image resize before the centre crop: keep the aspect, shorter side to 256/224 of the crop "
        "(keep_aspect), or resize every image to that size squared, as the official code (squash); "
        f"default: {default_help}",
    )


@contextlib.contextmanager
def refused_preset(name: str | None, source: str) -> Iterator[None]:
    """A ``--clip`` preset that the config stored with ``source`` (the checkpoint, as the command line
    names it) contradicts, as one error naming the option and the differing fields."""
    from famevil_fast.model.weights import StoredConfigConflict

    try:
        yield
    except StoredConfigConflict as conflict:
        raise ValueError(
            f"--clip {name} cannot be used with {source}: it carries its own model config "
            f"({conflict.location}), which differs from the preset in {', '.join(conflict.differences)}; "
            "--clip only gives the config of a checkpoint that carries none (leave it out)"
        ) from None
