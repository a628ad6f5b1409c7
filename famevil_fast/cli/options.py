"""Command-line options that several ``famevil-fast`` commands share (no heavy imports: parsers are built
before any command runs)."""

from __future__ import annotations

import argparse


def add_op_backend_argument(parser: argparse.ArgumentParser) -> None:
    """``--op-backend``: the model's op backend (``FameViL.set_runtime(backend=...)``) for this command."""
    parser.add_argument(
        "--op-backend",
        choices=("torch", "triton"),
        default=None,
        help="backend of the model's ops: triton runs the fused kernels (a GPU, or TRITON_INTERPRET=1 on the "
        "CPU) and decodes captions with each text layer of a step fused into seven kernels (on a GPU, with "
        "--cuda-graph: without a graph a step lasts as long as its launches take on the host); torch runs "
        "the PyTorch references (default: the checkpoint's, automatic unless set)",
    )
