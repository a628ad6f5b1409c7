"""Test configuration. Triton's interpreter must be on before any @triton.jit runs, so it is set here.

Automatic backend choices are pinned to the PyTorch references (FAMEVIL_FAST_BACKEND=torch) so that
model-level tests stay fast on the CPU; kernel tests ask for their backend explicitly.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FAMEVIL_FAST_BACKEND", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
