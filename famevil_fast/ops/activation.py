"""QuickGELU, ``x * sigmoid(1.702 x)``: the activation of CLIP's MLPs, with a fused Triton backend.

The reference runs three elementwise kernels forward and five backward over the MLP's hidden activations
(at ViT-B/16's batch of 64 images, 12,608 x 3,072 values, twelve times a tower pass). The Triton kernels
(``famevil_fast.kernels.activation``) move x and y once forward and x, dy and dx once backward, about a
quarter of the reference's bytes each way, in float32 arithmetic rounded once.
"""

from __future__ import annotations

import torch

from famevil_fast.ops._backend import check_backend, dispatch_mode_active, select_backend

BACKENDS = ("triton", "torch")
QUICK_GELU_ALPHA = 1.702


def quick_gelu_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: ``x * sigmoid(1.702 x)`` in x's dtype."""
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


def quick_gelu_backend(x: torch.Tensor, backend: str | None = None) -> str:
    """The backend ``quick_gelu`` runs for x: "triton" or "torch". The automatic choice on a GPU is the
    reference: the kernels take over automatically only where a card has timed them faster
    (``bench/bench_activation.py``, and ``fast_quick_gelu`` in ``bench/bench_train_step.py``), which none
    has yet."""
    return select_backend("quick_gelu", backend, BACKENDS, x, triton_pays=False)


def quick_gelu(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``x * sigmoid(1.702 x)`` for a floating-point x of any shape (CLIP's QuickGELU).

    ``backend``: "triton", "torch" or None (automatic: on CUDA the reference, ``quick_gelu_backend``; on
    the CPU, the kernels under TRITON_INTERPRET=1; ``FAMEVIL_FAST_BACKEND`` overrides the automatic
    choice). The Triton output is contiguous; a non-contiguous x is copied first."""
    check_backend("quick_gelu", backend, BACKENDS)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"quick_gelu: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"quick_gelu: x must be a floating-point tensor, got {x.dtype}")
    if quick_gelu_backend(x, backend) == "torch":
        return quick_gelu_reference(x)
    return _triton_quick_gelu(x.contiguous())


def _triton_quick_gelu(x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling() or dispatch_mode_active():  # the operator, where a graph or mode sees it
        from famevil_fast.kernels import custom_ops  # noqa: F401  (registers torch.ops.famevil_fast)

        return torch.ops.famevil_fast.quick_gelu(x)
    from famevil_fast.kernels.autograd import quick_gelu_eager

    return quick_gelu_eager(x)
