"""Task heads: the learnable-scale L2 normalisation (retrieval tasks), the sub-category classifier and the
caption language-model head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormScale(nn.Module):
    """L2-normalise, then multiply by a learnable scalar (initialised to 4): logits = s^2 cos."""

    def __init__(self, init: float = 4.0) -> None:
        super().__init__()
        self.norm_s = nn.Parameter(torch.full((1,), float(init)))

    def logit_scale(self) -> torch.Tensor:
        """The factor s^2 that multiplies cosine similarities of normalised embeddings (0-d)."""
        return self.norm_s.square().reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.norm_s


def build_heads(
    tasks: tuple[str, ...],
    embed_dim: int,
    text_width: int,
    vocab_size: int,
    num_classes: int,
    norm_scale_init: float,
) -> nn.ModuleDict:
    heads = nn.ModuleDict()
    for task in ("itc", "tgir", "scr", "cap"):
        if task not in tasks:
            continue
        if task in ("itc", "tgir"):
            heads[task] = NormScale(norm_scale_init)
        elif task == "scr":
            heads[task] = nn.Linear(embed_dim, num_classes)
        else:
            heads[task] = nn.Linear(text_width, vocab_size)
    return heads
