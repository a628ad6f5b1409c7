"""QuickGELU, ``x * sigmoid(1.702 x)``: the activation of CLIP's MLPs, with a fused Triton backend.

The reference runs three elementwise kernels forward and five backward over the MLP's hidden activations
(at ViT-B/16's batch of 64 images, 12,608 x 3,072 values, twelve times a tower pass). The Triton kernels
(``famevil_fast.kernels.activation``) move x and y once forward and x, dy and dx once backward, about a
quarter of the reference's bytes each way, in float32 arithmetic rounded once.
"""

from __future__ import annotations

import torch

from famevil_fast.capture import static_shapes_enabled
from famevil_fast.ops._backend import check_backend, select_backend

BACKENDS = ("triton", "torch")
QUICK_GELU_ALPHA = 1.702
# The automatic rule on a GPU: elements of x from which the kernels take over, in a training step captured
# as a CUDA graph (no host time per launch) and in eager training (where the reference's three launches
# cost less host time than the Triton launch, so the kernels must also save device time beyond it)
TRITON_QUICK_GELU_MIN_ELEMENTS_IN_GRAPH = 1 << 20
TRITON_QUICK_GELU_MIN_ELEMENTS = 1 << 24


def quick_gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: ``x * sigmoid(1.702 x)`` in x's dtype."""
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


def triton_quick_gelu_pays(x: torch.Tensor) -> bool:
    """The automatic rule on a GPU: the kernels for training activations (grad mode on, x requiring a
    gradient) from ``TRITON_QUICK_GELU_MIN_ELEMENTS_IN_GRAPH`` elements in a step captured as a CUDA graph
    (its warm-up and capture run under ``static_shapes``) and from ``TRITON_QUICK_GELU_MIN_ELEMENTS``
    eagerly. Inference (evaluation, caption decoding) keeps the reference, so that graphed decoding gives
    eager decoding's tokens."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return False
    if static_shapes_enabled():
        return x.numel() >= TRITON_QUICK_GELU_MIN_ELEMENTS_IN_GRAPH
    return x.numel() >= TRITON_QUICK_GELU_MIN_ELEMENTS


def quick_gelu_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend ``quick_gelu`` runs for x: "triton" or "torch". Inside ``torch.compile`` the automatic
    choice on a GPU is the reference, which Inductor fuses with its neighbours."""
    return select_backend(
        "quick_gelu",
        backend,
        BACKENDS,
        x,
        lambda: not torch.compiler.is_compiling() and triton_quick_gelu_pays(x),
    )


def quick_gelu(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` for a floating-point x of any shape (CLIP's QuickGELU).

    ``backend``: "triton", "torch" or None (automatic: on CUDA, the kernels for training activations of
    ``triton_quick_gelu_pays``'s sizes; on the CPU, the kernels under TRITON_INTERPRET=1;
    ``FAMEVIL_FAST_BACKEND`` overrides the automatic choice). The Triton output is contiguous; a
    non-contiguous x is copied first."""
    check_backend("quick_gelu", backend, BACKENDS)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quick_gelu: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"quick_gelu: x must be a floating-point tensor, got {x.dtype}")
    if quick_gelu_backend(x, backend) == "torch":
        return quick_gelu_reference(x)
    return _triton_quick_gelu(x.contiguous())


def _triton_quick_gelu(x: torch.Tensor) -> torch.Tensor:
    from famevil_fast.kernels import custom_ops  # noqa: F401  (registers torch.ops.famevil_fast)

    # the operator where a graph is traced or a dispatch mode (a FLOP or byte counter, fake tensors) looks on
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return torch.ops.famevil_fast.quick_gelu(x)
    from famevil_fast.kernels.autograd import quick_gelu_eager

    return quick_gelu_eager(x)
