"""Starting a model from another FAME-ViL checkpoint with a different set of tasks (e.g. fine-tuning after
pre-training): the shared weights move over, the rest of the model keeps its fresh initialisation.

Shared = every weight whose name and shape both models have: the CLIP backbone (required in full), the
cross-attention adapters, and the adapters and heads of tasks both models train. The checkpoint's other
tasks (e.g. the pre-training objectives' adapters and heads) are left behind. A checkpoint stored with its
config must have the model's CLIP config (head counts and activation appear in no shape); a state dict may
come bare or in a training container (``{"model": ...}``, ``{"state_dict": ...}``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from famevil_fast.model.config import CLIPConfig
from famevil_fast.model.weights import (
    config_differences,
    config_location,
    is_new_module_key,
    mismatch_summary,
    named_canonical,
    read_state_dict,
    stored_clip_config,
    unwrap_container,
)


@dataclass
class TransferReport:
    """Which parameters came from the checkpoint, which kept their initialisation, which were left behind."""

    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


def load_shared_weights(
    model: nn.Module, source: str | Path | dict[str, torch.Tensor], trust_pickle: bool = False
) -> TransferReport:
    """Copy the weights ``model`` shares with the checkpoint ``source`` into it (see the module docstring);
    ``trust_pickle`` as for ``read_state_dict``.

    A backbone weight missing from the checkpoint, any shared name whose shapes differ, or a CLIP config
    stored with the checkpoint that differs from ``model.config.clip`` (head counts, activation, ...) is a
    ValueError."""
    what = "the state dict" if isinstance(source, dict) else f"checkpoint {source}"
    if isinstance(source, dict):
        raw, hints = unwrap_container(source, what), {}
    else:
        raw, hints = read_state_dict(source, trust_pickle)
    state, _ = named_canonical(raw, what)
    _check_stored_clip(model, state, hints, source, what)
    own = model.state_dict()
    missing = sorted(k for k in own if not is_new_module_key(k) and k not in state)
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or mismatched:
        found = mismatch_summary((("shape mismatches", mismatched), ("backbone keys missing", missing)))
        raise ValueError(f"{what} cannot start this model: {found}")
    shared = {k: v for k, v in state.items() if k in own}
    model.load_state_dict(shared, strict=False)
    return TransferReport(sorted(shared), sorted(set(own) - set(shared)), sorted(set(state) - set(own)))


def _check_stored_clip(
    model: nn.Module, state: dict[str, torch.Tensor], hints: dict, source: str | Path | dict, what: str
) -> None:
    """Refuse a checkpoint whose stored CLIP config differs from the model's: its weights would fit the
    shapes and compute something else (other head counts or activation)."""
    own = getattr(getattr(model, "config", None), "clip", None)
    if not hints or not isinstance(own, CLIPConfig):
        return
    stored = stored_clip_config(state, hints, source)
    differences = config_differences(stored, own, "model") if stored is not None else []
    if differences:
        raise ValueError(
            f"{what} cannot start this model: the CLIP config stored with it ({config_location(source)}) "
            f"differs from the model's in {', '.join(differences)}"
        )
