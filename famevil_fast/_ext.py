"""Loading of the compiled extension ``famevil_fast._C``.

Owns the single import attempt and the one warning printed when the extension is missing. Every op asks
``cpu_ext_available()`` / ``cuda_ext_available()`` before choosing a compiled backend, so a missing build
degrades to the PyTorch references instead of failing.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch  # (also loads libc10/libtorch, which _C links against)

_C: ModuleType | None
_IMPORT_ERROR: str | None

try:
    # by its full name: ``from famevil_fast import _C`` inside the package's own import would report a
    # missing build as a circular import
    _C = importlib.import_module("famevil_fast._C")

    _IMPORT_ERROR = None
except ImportError as exc:  # the package works without it, on the PyTorch references
    _C = None
    _IMPORT_ERROR = (
        "not built" if isinstance(exc, ModuleNotFoundError) and exc.name == "famevil_fast._C" else str(exc)
    )
    warnings.warn(
        "famevil_fast: the compiled extension famevil_fast._C is not available "
        f"({_IMPORT_ERROR}); every op falls back to its PyTorch reference. "
        "Reinstall with `pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


# Read once: backend choices run inside torch.compile graphs, where a call into _C would break the graph.
_BUILT_WITH_CUDA: bool = _C is not None and bool(_C.built_with_cuda())


def extension() -> ModuleType | None:
    """The compiled module, or None when it could not be imported."""
    return _C


def cpu_ext_available() -> bool:
    return _C is not None


def cuda_ext_available() -> bool:
    return _BUILT_WITH_CUDA


def cpu_ext_threaded() -> bool | None:
    """Whether the CPU kernels spread over the cores: their ``at::parallel_for`` runs on torch's thread pool
    when torch's parallel backend is not OpenMP, and on OpenMP threads only when the extension was compiled
    with OpenMP (None: no extension, or one built before the extension reported it)."""
    built_with_openmp = getattr(_C, "built_with_openmp", None)
    if built_with_openmp is None:
        return None
    return bool(built_with_openmp()) or "parallel backend: OpenMP" not in torch.__config__.parallel_info()


def import_error() -> str | None:
    """Why the extension could not be imported (None when it was)."""
    return _IMPORT_ERROR
