"""Optimizer and learning-rate schedule of the reference recipes.

Parameter groups: the CLIP backbone at the base learning rate, the new modules (task adapters,
cross-attention adapters, heads) at ``new_module_lr_multiplier`` times it. Biases never decay; LayerNorm
weights, embeddings and scale parameters do not decay either unless ``decay_norms_and_scales`` reproduces
the official code, whose name filter missed them. Schedule: linear warm-up from a start factor, then
multi-step decay, at the same updates for every group unless the new modules have their own decay points.
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from famevil_fast.model.weights import is_new_module_key
from famevil_fast.train.config import OptimSection, ScheduleSection
from famevil_fast.train.master_weights import MasterAdamW, MasterWeights

NO_DECAY_SUFFIXES = ("norm_s", ".scale", "class_embedding", "pos_embed", "logit_scale")


def is_norm_or_scale(name: str, param: torch.Tensor) -> bool:
    return ".ln" in name or "ln_" in name or name.endswith(NO_DECAY_SUFFIXES) or ("token_embed" in name)


def parameter_groups(
    model: nn.Module, lr: float, multiplier: float, weight_decay: float, decay_norms_and_scales: bool = False
) -> list[dict]:
    """Four groups: (backbone | new modules) x (decay | no decay); frozen parameters are left out."""
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    names: dict[tuple[bool, bool], list[str]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        new = is_new_module_key(name)
        no_decay = name.endswith("bias") or (not decay_norms_and_scales and is_norm_or_scale(name, param))
        key = (new, not no_decay)
        groups.setdefault(key, []).append(param)
        names.setdefault(key, []).append(name)
    return [
        {
            "params": params,
            "names": names[key],
            "lr": lr * (multiplier if key[0] else 1.0),
            "weight_decay": weight_decay if key[1] else 0.0,
            "group": ("new" if key[0] else "backbone") + ("" if key[1] else "_no_decay"),
        }
        for key, params in sorted(groups.items())
    ]


FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # one kernel per parameter: on 2 CPU cores 5x the foreach step


def build_optimizer(
    model: nn.Module, cfg: OptimSection, master_weights: MasterWeights | None = None
) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups`` (the fused implementation on CUDA and CPU devices); with
    ``master_weights``, over their float32 masters (``MasterAdamW``)."""
    groups = parameter_groups(
        model, cfg.lr, cfg.new_module_lr_multiplier, cfg.weight_decay, cfg.decay_norms_and_scales
    )
    if not groups:
        raise ValueError("no trainable parameters")
    device = groups[0]["params"][0].device.type
    kind = {"fused": True} if device in FUSED_ADAMW_DEVICES else {"foreach": True}
    settings = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kind)
    if master_weights is not None:
        return MasterAdamW(groups, master_weights, **settings)
    return torch.optim.AdamW(groups, **settings)


def lr_factor(
    update: int, warmup: int, start_factor: float, decay_at: list[int], decay_factor: float
) -> float:
    """Learning-rate multiplier at a (0-based) update."""
    factor = decay_factor ** bisect.bisect_right(sorted(decay_at), update)
    if update < warmup:
        factor *= start_factor + (1.0 - start_factor) * update / warmup
    return factor


def group_decay_at(group: dict, cfg: ScheduleSection) -> list[int]:
    """The decay points of one parameter group: ``new_module_decay_at`` for the new modules when set,
    else ``decay_at``."""
    new = group["group"].startswith("new")  # the labels of ``parameter_groups``
    return cfg.new_module_decay_at if new and cfg.new_module_decay_at is not None else cfg.decay_at


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleSection
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then multi-step decay, one factor per parameter group (see ``group_decay_at``)."""

    def schedule(decay_at: list[int]):
        return lambda update: lr_factor(
            update, cfg.warmup_updates, cfg.warmup_start_factor, decay_at, cfg.decay_factor
        )

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [schedule(group_decay_at(g, cfg)) for g in optimizer.param_groups]
    )


def freeze_backbone(model: nn.Module) -> int:
    """Stop gradients to every CLIP weight; returns how many parameters stay trainable."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(is_new_module_key(name))
        trainable += param.numel() if param.requires_grad else 0
    return trainable


def zero_untouched_grads(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    """``optim.step_untouched``: every parameter of ``params`` without a gradient that the optimizer has
    stepped before gets a zero one, so the coming step moves it as the reference's did (its zero_grad
    zeroed the gradients in place, and AdamW stepped every parameter that had one). A parameter never
    trained stays without (AdamW skips it). ``optimizer.state_key(p)`` names a parameter's state where
    that is another tensor (``MasterAdamW``: its float32 master)."""
    state_key = getattr(optimizer, "state_key", None)
    for p in params:
        if p.grad is None and optimizer.state.get(state_key(p) if state_key else p):
            p.grad = torch.zeros_like(p)
