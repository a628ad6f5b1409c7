"""Devices named by the user (a command's ``--device``, a recipe's ``train.device``): which names are
accepted, and the check of a name against this machine."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?)$")


def resolve_device(name: str | None, source: str = "--device") -> torch.device:
    """The device ``name`` names; None: cuda when available, else cpu. ValueError naming ``source`` when the
    name is not cpu, cuda or cuda:N, or when this machine has no such CUDA device."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"{source}={name!r}: expected cpu, cuda or cuda:N")
    device = torch.device(name)
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"{source}={name!r} but CUDA is not available on this machine (use cpu)")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(
            f"{source}={name!r} but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1})"
        )
    return device
