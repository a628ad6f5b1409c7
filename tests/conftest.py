"""Test configuration. On a machine without a GPU, Triton's interpreter runs the kernels; it must be on
before any @triton.jit runs, so it is set here (importing torch imports no kernel). With a GPU the kernels
compile for it (the interpreter would copy every CUDA tensor to the host, and graph captures would fail).

Automatic backend choices are pinned to the PyTorch references (FAMEVIL_FAST_BACKEND=torch) so that
model-level tests stay fast on the CPU; kernel tests ask for their backend explicitly.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FAMEVIL_FAST_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
