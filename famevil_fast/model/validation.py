"""Input checks of the model's public methods: each failure is a ValueError that says what was expected."""

from __future__ import annotations

import torch

from famevil_fast.capture import host_reads_allowed
from famevil_fast.model.config import TextConfig, VisionConfig
from famevil_fast.text.special_tokens import EOT_ID


def check_task(task: str, tasks: tuple[str, ...]) -> None:
    if not isinstance(task, str):
        raise ValueError(f"task must be a string, one of {tasks}; got {type(task).__name__}")
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}: this model has tasks {tasks}")


def check_can_caption(xaa: str) -> None:
    """Captioning reads the image through the text tower's cross-attention adapters."""
    if xaa == "none":
        raise ValueError(
            "captioning needs cross-attention adapters in the text tower (xaa='both' or 'text'); "
            "this model has xaa='none'"
        )


def check_pixels(pixels: torch.Tensor, cfg: VisionConfig, device: torch.device, name: str = "pixels") -> None:
    if not isinstance(pixels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(pixels).__name__}")
    if not pixels.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point image tensor (normalised pixels), got dtype {pixels.dtype}"
        )
    size = cfg.image_size
    if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (size, size):
        raise ValueError(
            f"{name} must have shape (B, 3, {size}, {size}) for this model, got {tuple(pixels.shape)}"
        )
    if pixels.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if pixels.device != device:
        raise ValueError(f"{name} is on {pixels.device} but the model is on {device}")


def check_input_ids(
    input_ids: torch.Tensor, cfg: TextConfig, device: torch.device, name: str = "input_ids"
) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(
            f"{name} must be a torch.Tensor of token ids (B, L); use famevil_fast.tokenize(texts)"
        )
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must hold integer token ids (int64), got dtype {input_ids.dtype}")
    if input_ids.dim() != 2 or not 1 <= input_ids.shape[1] <= cfg.context_length or input_ids.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape (B, L) with B >= 1 and 1 <= L <= {cfg.context_length}, "
            f"got {tuple(input_ids.shape)}"
        )
    if input_ids.device != device:
        raise ValueError(f"{name} is on {input_ids.device} but the model is on {device}")
    if not host_reads_allowed():
        return
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(
            f"{name} has token ids in [{lo}, {hi}], outside the vocabulary [0, {cfg.vocab_size})"
        )
    missing = (~(input_ids == EOT_ID).any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(
            f"{name}: rows {missing[:8]} have no end-of-text token ({EOT_ID}); "
            "tokenize texts with famevil_fast.tokenize"
        )


def check_same_batch(**tensors: torch.Tensor) -> None:
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch sizes differ: {sizes}")
