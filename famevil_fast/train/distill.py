"""Multi-teacher distillation: frozen single-task teachers run on the student's batch, and each task's
loss becomes L = (2 - b) * L_gt + b * L_kd (spec 3.2, b = 1 by default).

Distillation losses (temperature 1, teacher probabilities by softmax):
- itc: soft-target CE of the student's similarity rows (and columns) against the teacher's. By default the
  teacher's logits come from teacher image x teacher text; ``faithful_itc`` reproduces the official code,
  which paired the teacher's image with the student's text (and vice versa);
- tgir: the same for query -> target logits (one way);
- scr: soft-target CE of class logits; cap: soft-target CE of every trained token position.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from famevil_fast.model.famevil import FameViL, TaskOutput
from famevil_fast.model.losses import Gather
from famevil_fast.ops import contrastive_distill_loss


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows (those marked in the bool mask ``rows``, when given) of the cross-entropy between the
    teacher's softmax and the student's log-softmax."""
    target = F.softmax(teacher_logits.float(), dim=-1)
    per_row = -(target * F.log_softmax(student_logits.float(), dim=-1)).sum(-1)
    if rows is None:
        return per_row.mean()
    return (per_row * rows).sum() / rows.sum().clamp_min(1)


def kd_loss(
    task: str,
    student: TaskOutput,
    teacher: TaskOutput,
    faithful_itc: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    s, t = student.outputs, teacher.outputs
    if task == "itc":
        if faithful_itc:
            i2t = contrastive_distill_loss(
                s["image"],
                s["text"],
                s["scale"],
                t["image"],
                s["text"].detach(),
                t["scale"],
                two_way=False,
                backend=backend,
            )
            t2i = contrastive_distill_loss(
                s["text"],
                s["image"],
                s["scale"],
                t["text"],
                s["image"].detach(),
                t["scale"],
                two_way=False,
                backend=backend,
            )
            return 0.5 * (i2t + t2i)
        return contrastive_distill_loss(
            s["image"],
            s["text"],
            s["scale"],
            t["image"],
            t["text"],
            t["scale"],
            two_way=True,
            backend=backend,
        )
    if task == "tgir":
        return contrastive_distill_loss(
            s["query"],
            s["target"],
            s["scale"],
            t["query"],
            t["target"],
            t["scale"],
            two_way=False,
            backend=backend,
        )
    if task in ("scr", "cap"):
        if s["logits"].shape != t["logits"].shape:
            raise ValueError(
                f"{task} teacher logits {tuple(t['logits'].shape)} do not match "
                f"the student's {tuple(s['logits'].shape)}"
            )
        return soft_cross_entropy(s["logits"], t["logits"], s.get("trained"))  # caption: no padding
    raise ValueError(f"no distillation loss for task {task!r}")


class Teachers(nn.Module):
    """Frozen single-task teachers, keyed by task."""

    def __init__(self, teachers: Mapping[str, FameViL]) -> None:
        super().__init__()
        self.models = nn.ModuleDict(dict(teachers))
        for p in self.models.parameters():
            p.requires_grad_(False)

    @classmethod
    def load(cls, paths: Mapping[str, str], student: FameViL) -> Teachers:
        teachers = {}
        for task, path in paths.items():
            model = FameViL.from_pretrained(
                path,
                caption_loss_on_padding=student.config.caption_loss_on_padding,
                caption_vocab=student.config.caption_vocab,
                attention=student.config.attention,
                backend=student.config.backend,
            )
            if task not in model.config.tasks:
                raise ValueError(f"teacher {path} has tasks {model.config.tasks}, not {task!r}")
            teachers[task] = model.eval()
        return cls(teachers)

    def __contains__(self, task: str) -> bool:
        return task in self.models

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], task: str, gather: Gather | None = None) -> TaskOutput:
        return self.models[task](batch, task, gather)


def combine(gt: torch.Tensor, kd: torch.Tensor, balance: float) -> torch.Tensor:
    return (2.0 - balance) * gt + balance * kd
