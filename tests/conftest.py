"""Test configuration. On a machine without a GPU, Triton's interpreter runs the kernels; it must be on
before any @triton.jit runs, so it is set here (importing torch imports no kernel). With a GPU the kernels
compile for it (the interpreter would copy every CUDA tensor to the host, and graph captures would fail).

Automatic backend choices are pinned to the PyTorch references (FAMEVIL_FAST_BACKEND=torch) so that
model-level tests stay fast on the CPU; kernel tests ask for their backend explicitly.

Under pytest-xdist (`make test` runs two workers) each worker gets its share of the cores, for torch's
and the BLAS's threads (the interpreter multiplies with numpy) and for the processes a test starts.
"""

import os

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
if _WORKERS > 1:  # before torch and numpy load their thread pools
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, str(_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(_THREADS)
    try:  # a BLAS that an earlier plugin loaded
        from threadpoolctl import threadpool_limits

        threadpool_limits(_THREADS)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FAMEVIL_FAST_BACKEND", "torch")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
