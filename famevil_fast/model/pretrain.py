"""FashionViL pre-training objectives as FAME-ViL tasks: their heads and training forwards.

- ``mvc`` (multi-view contrastive): the two-tower image embedding of view A against the fusion-mode
  embedding v + t of the text with view B of the same product (an augmented copy of the same view when
  the product has one); symmetric InfoNCE with logits s^2 cos (learnable s, init 4).
- ``pac`` (pseudo-attribute classification): the two-tower image and text embeddings through ONE cosine
  classifier (embedding and class weights L2-normalised, no bias, no temperature); soft multi-hot
  targets 1/k.
- ``itm`` (image-text matching): every second pair's text is replaced by its image's hardest in-batch
  negative (highest two-tower similarity, no gradient; the ``itc`` adapters when the model has that task,
  else the ``itm`` ones); fusion-mode v + t -> Linear(E, 2); cross-entropy.

Each objective has its own task adapters and head, like the downstream tasks: the objectives ask different
things of the towers (two-tower and fused embeddings, unimodal classification, fused matching), and what
pre-training hands to fine-tuning is the shared backbone and cross-attention adapters; the downstream
tasks' adapters start fresh (``model.transfer``).

Batches: ``mvc`` pixels (view A), fused_pixels (view B), input_ids; ``pac`` pixels, input_ids,
attribute_ids (B, K) padded with -1; ``itm`` pixels, input_ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from famevil_fast.model import pretrain_losses as pl
from famevil_fast.model.config import FameViLConfig
from famevil_fast.model.heads import NormScale
from famevil_fast.model.losses import Gather
from famevil_fast.model.validation import check_pixels, check_same_batch

if TYPE_CHECKING:
    from famevil_fast.model.famevil import FameViL, TaskOutput

PRETRAIN_BATCH_KEYS = {
    "mvc": ("pixels", "input_ids", "fused_pixels"),
    "pac": ("pixels", "input_ids", "attribute_ids"),
    "itm": ("pixels", "input_ids"),
}


class CosineClassifier(nn.Module):
    """``normalize(x) @ normalize(W).T``: the cosine of the embedding with every class weight, both
    L2-normalised, no bias, no temperature (PAC's shared head; logits lie in [-1, 1]). Class weights start
    standard normal, as in the official code (uniformly random directions)."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        if dim < 1 or classes < 1:
            raise ValueError(f"CosineClassifier needs dim >= 1 and classes >= 1, got {dim} and {classes}")
        self.weight = nn.Parameter(torch.empty(classes, dim))
        nn.init.normal_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"CosineClassifier of dimension {self.weight.shape[1]} got inputs of dimension {x.shape[-1]}"
            )
        return F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=1).to(x.dtype))


def build_pretrain_heads(config: FameViLConfig) -> nn.ModuleDict:
    """Heads of the pre-training tasks of ``config`` (a FameViLConfig)."""
    heads = nn.ModuleDict()
    dim = config.clip.embed_dim
    if "mvc" in config.tasks:
        heads["mvc"] = NormScale(config.norm_scale_init)
    if "pac" in config.tasks:
        heads["pac"] = CosineClassifier(dim, config.num_attributes)
    if "itm" in config.tasks:
        heads["itm"] = nn.Linear(dim, 2)
    return heads


def forward_mvc(model: FameViL, batch: dict[str, torch.Tensor], gather: Gather | None) -> TaskOutput:
    from famevil_fast.model.famevil import TaskOutput

    view_a, ids, view_b = batch["pixels"], batch["input_ids"], batch["fused_pixels"]
    model._check_pair(view_a, ids, "pixels")
    check_pixels(view_b, model.config.clip.vision, model.device, "fused_pixels")
    check_same_batch(pixels=view_a, fused_pixels=view_b)
    image = F.normalize(model.image_features(view_a, "mvc"), dim=-1)
    v, t = model.fused_features(view_b, ids, "mvc")
    fused = F.normalize(v + t, dim=-1)
    scale = model.heads["mvc"].logit_scale()
    loss = pl.mvc_loss(image, fused, scale, gather, model.config.backend)
    return TaskOutput(loss, {"image": image, "fused": fused, "scale": scale})


def forward_pac(model: FameViL, batch: dict[str, torch.Tensor], gather: Gather | None) -> TaskOutput:
    from famevil_fast.model.famevil import TaskOutput

    pixels, ids, attributes = batch["pixels"], batch["input_ids"], batch["attribute_ids"]
    model._check_pair(pixels, ids, "pixels")
    pl.check_attribute_ids(attributes, pixels.shape[0], model.config.num_attributes)
    head = model.heads["pac"]
    image_logits = head(model.image_features(pixels, "pac"))
    text_logits = head(model.text_features(ids, "pac"))
    loss = pl.pac_loss(image_logits, text_logits, attributes, gather, check_ids=False)
    return TaskOutput(loss, {"image_logits": image_logits, "text_logits": text_logits})


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block (dropout off), each module's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def matching_similarity(model: FameViL, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Two-tower cosine similarities (B images x B texts) that choose ITM's hard negatives: without grad and
    in eval mode, so that adapter dropout does not change which negative is hardest."""
    task = "itc" if "itc" in model.config.tasks else "itm"
    with torch.no_grad(), evaluation_mode(model):
        image = F.normalize(model.image_features(pixels, task).float(), dim=-1)
        text = F.normalize(model.text_features(input_ids, task).float(), dim=-1)
    return image @ text.T


def forward_itm(model: FameViL, batch: dict[str, torch.Tensor], gather: Gather | None) -> TaskOutput:
    from famevil_fast.model.famevil import TaskOutput

    pixels, ids = batch["pixels"], batch["input_ids"]
    model._check_pair(pixels, ids, "pixels")
    text_index, labels = pl.itm_pairs(matching_similarity(model, pixels, ids), ids)
    v, t = model.fused_features(pixels, ids[text_index], "itm")
    logits = model.heads["itm"](v + t)
    return TaskOutput(
        pl.itm_loss(logits, labels, gather, check_labels=False),
        {"logits": logits, "labels": labels, "text_index": text_index},
    )


FORWARDS = {"mvc": forward_mvc, "pac": forward_pac, "itm": forward_itm}
