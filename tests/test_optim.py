"""Parameter groups and the per-group learning-rate schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from famevil_fast.train.config import ScheduleSection
from famevil_fast.train.optim import build_scheduler, lr_factor, parameter_groups


class TwoPartModel(nn.Module):
    """A backbone block and a head, named as the model names them."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Linear(3, 3)
        self.heads = nn.ModuleDict({"scr": nn.Linear(3, 2)})


def _rates(warmup: int, decay_at: list[int], new_decay_at: list[int] | None, updates: int) -> dict:
    model = TwoPartModel()
    groups = parameter_groups(model, lr=1.0, multiplier=10.0, weight_decay=0.1)
    optimizer = torch.optim.SGD(groups, lr=1.0)
    cfg = ScheduleSection(
        warmup_updates=warmup,
        warmup_start_factor=0.5,
        decay_at=decay_at,
        decay_factor=0.1,
        new_module_decay_at=new_decay_at,
    )
    scheduler = build_scheduler(optimizer, cfg)
    seen: dict[str, list[float]] = {g["group"]: [] for g in optimizer.param_groups}
    for _ in range(updates):
        for g in optimizer.param_groups:
            seen[g["group"]].append(g["lr"])
        optimizer.step()
        scheduler.step()
    return seen


def test_groups_split_backbone_and_new_modules_and_decay():
    groups = {g["group"]: g for g in parameter_groups(TwoPartModel(), 2.0, 5.0, 0.3)}
    assert set(groups) == {"backbone", "backbone_no_decay", "new", "new_no_decay"}
    assert groups["backbone"]["lr"] == 2.0 and groups["new"]["lr"] == 10.0
    assert groups["new_no_decay"]["names"] == ["heads.scr.bias"]
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0 and groups["new"]["weight_decay"] == 0.3


def test_every_group_decays_together_by_default():
    seen = _rates(warmup=2, decay_at=[3, 5], new_decay_at=None, updates=7)
    expected = [lr_factor(u, 2, 0.5, [3, 5], 0.1) for u in range(7)]
    assert seen["backbone"] == pytest.approx(expected)
    assert seen["new"] == pytest.approx([10 * f for f in expected])


def test_new_modules_can_keep_their_rate_while_the_backbone_decays():
    seen = _rates(warmup=0, decay_at=[2, 4], new_decay_at=[4], updates=6)
    assert seen["backbone"] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert seen["backbone_no_decay"] == pytest.approx(seen["backbone"])
    assert seen["new"] == pytest.approx([10, 10, 10, 10, 1, 1])
    assert seen["new_no_decay"] == pytest.approx(seen["new"])
