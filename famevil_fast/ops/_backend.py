"""Backend selection shared by every op: which implementations exist and which one runs.

Each op offers ``backend=None`` (automatic) plus a fixed list of names; ``"torch"`` is always the plain
PyTorch reference. Triton kernels run on CUDA devices, and on the CPU only under ``TRITON_INTERPRET=1``.
Also the FLOP formulas of the fused operators (``register_flop_formulas``) and the check that makes the
fused ops run those operators while ``torch.utils.flop_counter.FlopCounterMode`` counts (``counting_flops``).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_INSTALLED


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """True when a Triton kernel can run on tensors of ``device``."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpreting()


def check_backend(op: str, backend: str | None, allowed: tuple[str, ...]) -> None:
    if backend is not None and backend not in allowed:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {allowed} or None (automatic)")


def same_device_and_dtype(
    op: str, named: dict[str, torch.Tensor | None], dtype: torch.dtype | None = None
) -> None:
    """Raise ValueError naming the offending tensor when one is not a floating-point tensor, or when
    devices or dtypes disagree."""
    tensors = {k: v for k, v in named.items() if v is not None}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    first_name, first = next(iter(tensors.items()))
    want_dtype = first.dtype if dtype is None else dtype
    for name, t in tensors.items():
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != want_dtype:
            raise ValueError(f"{op}: {name} has dtype {t.dtype} but {first_name} has {want_dtype}")


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on the gradients of a fused backward, with edges to what they depend on (the saved inputs,
    the incoming gradients), whose own backward raises: a second derivative that reaches them fails."""

    @staticmethod
    def forward(ctx, op: str, count: int, *tensors: torch.Tensor):  # type: ignore[override]
        ctx.op = op
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        raise RuntimeError(
            f"{ctx.op}: the fused backward cannot be differentiated again (double backward through "
            "create_graph=True gradients); use backend='torch' for higher-order gradients"
        )


def once_differentiable_grads(op: str, grads: tuple, depends_on: tuple) -> tuple:
    """``grads`` from a fused backward whose kernels work outside autograd. Under ``create_graph=True``
    (grad mode on in the backward) they come back connected to ``depends_on`` (the tensors they were
    computed from: saved inputs, incoming gradients) through a node whose backward raises RuntimeError, so
    that a second derivative through them fails when it is taken, whichever inputs it is taken for, instead
    of silently treating them as constants; a create_graph backward that is not differentiated through them
    again is unaffected."""
    if not torch.is_grad_enabled():
        return grads
    marked = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    sources = [t for t in depends_on if isinstance(t, torch.Tensor) and t.requires_grad]
    if not marked or not sources:
        return grads
    wrapped = _FirstOrderOnly.apply(op, len(marked), *[grads[i] for i in marked], *sources)
    out = list(grads)
    for i, g in zip(marked, wrapped):
        out[i] = g
    return tuple(out)


def require_int(op: str, name: str, value: object) -> int:
    """``value`` when it is a Python int (or an integer scalar such as numpy's); TypeError otherwise, bools
    and tensors included (a tensor would need a read-back from the device)."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor) or not hasattr(value, "__index__"):
        raise TypeError(f"{op}: {name} must be a Python int, got {type(value).__name__} {value!r}")
    return int(value.__index__())


# Every backend name some op offers; FAMEVIL_FAST_BACKEND must be one of them.
KNOWN_BACKENDS = ("torch", "triton", "cuda", "cpu", "blocked")


def forced_backend() -> str | None:
    """``FAMEVIL_FAST_BACKEND`` (e.g. "torch"): every op that offers that backend takes it instead of its
    automatic choice (explicit arguments still win); ops without it choose automatically. A name that no op
    offers raises ValueError."""
    value = os.environ.get("FAMEVIL_FAST_BACKEND", "").strip()
    if value and value not in KNOWN_BACKENDS:
        raise ValueError(f"FAMEVIL_FAST_BACKEND={value!r} names no backend; expected one of {KNOWN_BACKENDS}")
    return value or None


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def select_backend(
    op: str,
    backend: str | None,
    allowed: tuple[str, ...],
    x: torch.Tensor,
    triton_pays: bool | Callable[[], bool] = True,
) -> str:
    """The backend that runs ``op`` on ``x``: the explicit argument, else ``FAMEVIL_FAST_BACKEND`` when it
    is one of ``allowed``, else "triton" where Triton runs on x's device and dtype and, on a GPU,
    ``triton_pays`` (the op's measured rule for where its kernels beat the PyTorch path; see docs/ops.md;
    a callable is called only there, where the rule decides), else "torch". Under
    ``TRITON_INTERPRET=1`` on the CPU the automatic choice is Triton, so that the kernels are exercised.
    Raises ValueError when the chosen Triton backend cannot run on x."""
    check_backend(op, backend, allowed)
    chosen = backend if backend is not None else forced_backend()
    if chosen is not None and chosen in allowed:
        if chosen == "triton":
            require_triton(op, x)
        return chosen
    if "triton" in allowed and triton_runs_on(x.device) and x.dtype in KERNEL_DTYPES:
        if x.device.type != "cuda" or (triton_pays() if callable(triton_pays) else triton_pays):
            return "triton"
    return "torch"


def require_triton(op: str, x: torch.Tensor) -> None:
    """ValueError unless the Triton kernels can run on x (device, interpreter, dtype)."""
    if not triton_importable():
        raise ValueError(f"{op}: backend 'triton' needs the triton package, which is not installed")
    if not triton_runs_on(x.device):
        raise ValueError(
            f"{op}: backend 'triton' runs on CUDA tensors, or on the CPU with TRITON_INTERPRET=1; "
            f"x is on {x.device}"
        )
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"{op}: backend 'triton' supports float32, float16 and bfloat16 inputs, got {x.dtype}"
        )


# ---------------------------------------------------------------------------------------------------
# FLOP counting

FlopFormula = Callable[..., int]

# Operators whose formula is registered (or that already had one): a call site checks this set, not the
# registry of torch.utils.flop_counter.
_FORMULA_REGISTERED: set[str] = set()
_REGISTERING = threading.Lock()  # torch refuses a second registration: two threads' first calls take turns


def register_flop_formulas(formulas: Mapping[str, FlopFormula]) -> list[str]:
    """Register each formula with ``torch.utils.flop_counter.register_flop_formula`` for the operator
    ``torch.ops.famevil_fast.<name>`` it is keyed by, so that ``FlopCounterMode`` counts the matrix
    products inside the operator; and add it to every FlopCounterMode counting on this thread (a counter
    copies the registry when it is made, which may be before a lazily imported operator exists). Formulas
    take what the counter passes: the operator's arguments with tensors replaced by their shapes, and
    ``out_shape``. An operator this build does not register (no compiled extension, no triton) is skipped,
    and one that has a formula already keeps it. Returns the names of the operators that have one."""
    try:
        from torch.utils import flop_counter
    except ImportError:  # pragma: no cover - part of every supported torch
        return []
    counters = active_flop_counters()
    found = []
    for name, formula in formulas.items():
        packet = getattr(torch.ops.famevil_fast, name, None)
        if packet is None:
            continue
        with _REGISTERING:
            if packet not in flop_counter.flop_registry:
                flop_counter.register_flop_formula(packet)(formula)
        registered = flop_counter.flop_registry[packet]
        for counter in counters:
            registry = getattr(counter, "flop_registry", None)
            if isinstance(registry, dict):
                registry.setdefault(packet, registered)
        _FORMULA_REGISTERED.add(name)
        found.append(name)
    return found


# torch internals behind the check; a torch without them counts the fused ops' products as zero
_DISPATCH_STACK_LEN = getattr(torch._C, "_len_torch_dispatch_stack", None)


def dispatch_mode_active() -> bool:
    """Whether a torch dispatch mode (a FLOP or byte counter, fake tensors) watches the calls on this thread:
    a fused op then runs as its registered operator, which the mode sees, not as bare kernel launches."""
    return _DISPATCH_STACK_LEN is not None and bool(_DISPATCH_STACK_LEN())


def active_flop_counters() -> list[Any]:
    """The ``torch.utils.flop_counter.FlopCounterMode`` objects counting on this thread (usually none; the
    check costs one call into torch while no dispatch mode is active)."""
    if not dispatch_mode_active():
        return []
    try:
        from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - present in every torch this package supports
        return []

    counters = []
    for mode in _get_current_dispatch_mode_stack():
        counter = getattr(mode, "counter", mode)  # newer torch pushes a dispatch mode that refers to it
        if isinstance(counter, FlopCounterMode):
            counters.append(counter)
    return counters


def counting_flops(formulas: Mapping[str, FlopFormula]) -> bool:
    """True while a FlopCounterMode counts on this thread, after making sure that it holds the formulas of
    these operators (otherwise registered on the first call after ``torch.utils.flop_counter`` is loaded).
    The fused ops' eager paths launch their kernels outside torch's dispatcher, where the counter sees
    nothing; while this is True they run their registered operators instead, whose formulas count the
    products inside them, forward and backward."""
    counting = bool(active_flop_counters())
    # a counter exists only once torch.utils.flop_counter is loaded; it is not loaded here (it loads triton)
    loaded = "torch.utils.flop_counter" in sys.modules
    if counting or (loaded and not _FORMULA_REGISTERED.issuperset(formulas)):
        register_flop_formulas(formulas)  # also into the counters made before the operators existed
    return counting


def matmul_flops(rows: int, inner: int, cols: int) -> int:
    """FLOPs of a (rows, inner) @ (inner, cols) product as torch.utils.flop_counter counts them."""
    return 2 * rows * inner * cols
