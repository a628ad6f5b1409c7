"""Operators with interchangeable backends: Triton kernels, the compiled extension, PyTorch references.

Every op takes ``backend=None`` (automatic) or a backend name; ``"torch"`` always runs the reference.
"""

from famevil_fast.ops.activation import quick_gelu
from famevil_fast.ops.adapter import AdapterParams, fused_adapter
from famevil_fast.ops.contrastive import contrastive_distill_loss, contrastive_loss
from famevil_fast.ops.cross_attention import CrossAttentionParams, context_key_values, cross_attention_adapter

__all__ = [
    "AdapterParams",
    "CrossAttentionParams",
    "context_key_values",
    "contrastive_distill_loss",
    "contrastive_loss",
    "cross_attention_adapter",
    "fused_adapter",
    "quick_gelu",
]
