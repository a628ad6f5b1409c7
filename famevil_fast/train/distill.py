"""Multi-teacher distillation: frozen single-task teachers run on the student's batch, and each task's
loss becomes L = (2 - b) * L_gt + b * L_kd (b = 1 by default, as the official recipe).

Distillation losses (temperature 1, teacher probabilities by softmax):
- itc: soft-target CE of the student's similarity rows (and columns) against the teacher's. By default the
  teacher's logits come from teacher image x teacher text; ``faithful_itc`` reproduces the official code,
  which paired the teacher's image with the student's text (and vice versa);
- tgir: the same for query -> target logits (one way);
- scr: soft-target CE of class logits; cap: soft-target CE of every trained token position.

In distributed training the retrieval logits span the global batch (columns all-gathered, student and
teacher), and each term is weighted by the process's rows (tokens for captions), as the task losses are.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from famevil_fast.model.famevil import FameViL, TaskOutput
from famevil_fast.model.losses import Gather, mean_over_processes, row_weighted
from famevil_fast.ops import contrastive_distill_loss


def distillation_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    rows: torch.Tensor | None = None,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Mean over rows (those marked in the bool mask ``rows``, when given) of the cross-entropy between the
    teacher's softmax and the student's log-softmax; over the global batch's rows in distributed training
    (``gather``: ``mean_over_processes``)."""
    target = F.softmax(teacher_logits.float(), dim=-1)
    per_row = -(target * F.log_softmax(student_logits.float(), dim=-1)).sum(-1)
    if rows is not None:
        per_row = per_row * rows
    count = torch.tensor(per_row.shape[0], device=per_row.device) if rows is None else rows.sum()
    return mean_over_processes(per_row.sum(), count, gather)


def _retrieval_kd(
    rows: torch.Tensor,
    columns: torch.Tensor,
    scale: torch.Tensor,
    teacher_rows: torch.Tensor,
    teacher_columns: torch.Tensor,
    teacher_scale: torch.Tensor,
    gather: Gather | None,
    backend: str | None,
) -> torch.Tensor:
    """One direction: each local row's soft-target CE over every column of the global batch (the columns
    are all-gathered in distributed training, student and teacher alike), weighted by local rows."""
    total = None
    if gather is not None:
        columns, _ = gather(columns)
        teacher_columns, _ = gather(teacher_columns)
        total = columns.shape[0]
    loss = contrastive_distill_loss(
        rows, columns, scale, teacher_rows, teacher_columns, teacher_scale, two_way=False, backend=backend
    )
    return row_weighted(loss, gather, rows.shape[0], total)


def kd_loss(
    task: str,
    student: TaskOutput,
    teacher: TaskOutput,
    faithful_itc: bool = False,
    backend: str | None = None,
    gather: Gather | None = None,
) -> torch.Tensor:
    """The distillation loss of ``task`` (module docstring). With ``gather`` (distributed training) the
    retrieval logits span the global batch, as the task losses do, and every term is weighted so that DDP's
    average over processes is the global batch's loss."""
    s, t = student.outputs, teacher.outputs
    if task == "itc":
        if gather is None and not faithful_itc:  # one kernel for both directions
            teacher_pair = (t["image"], t["text"], t["scale"])
            return contrastive_distill_loss(
                s["image"], s["text"], s["scale"], *teacher_pair, two_way=True, backend=backend
            )
        # faithful: the teacher's columns are the student's (detached), as the official code gathered them;
        # its logits are then the product of two heads' outputs, s_t t_i . s_s x_j: the scale s_t s_s
        teacher_text = s["text"].detach() if faithful_itc else t["text"]
        teacher_image = s["image"].detach() if faithful_itc else t["image"]
        teacher_scale = (t["scale"] * s["scale"]).sqrt().detach() if faithful_itc else t["scale"]
        i2t = _retrieval_kd(
            s["image"], s["text"], s["scale"], t["image"], teacher_text, teacher_scale, gather, backend
        )
        t2i = _retrieval_kd(
            s["text"], s["image"], s["scale"], t["text"], teacher_image, teacher_scale, gather, backend
        )
        return 0.5 * (i2t + t2i)
    if task == "tgir":
        return _retrieval_kd(
            s["query"], s["target"], s["scale"], t["query"], t["target"], t["scale"], gather, backend
        )
    if task in ("scr", "cap"):
        if s["logits"].shape != t["logits"].shape:
            raise ValueError(
                f"{task} teacher logits {tuple(t['logits'].shape)} do not match "
                f"the student's {tuple(s['logits'].shape)}"
            )
        # captions: the trained positions only (no padding)
        return distillation_cross_entropy(s["logits"], t["logits"], s.get("trained"), gather)
    raise ValueError(f"no distillation loss for task {task!r}")


class Teachers(nn.Module):
    """Frozen single-task teachers, keyed by task."""

    def __init__(self, teachers: Mapping[str, FameViL]) -> None:
        super().__init__()
        self.models = nn.ModuleDict(dict(teachers))
        for p in self.models.parameters():
            p.requires_grad_(False)

    @classmethod
    def load(
        cls,
        paths: Mapping[str, str],
        student: FameViL,
        faithful_itc: bool = False,
        trust_pickle: bool = False,
    ) -> Teachers:
        """The teachers of ``paths`` (task -> checkpoint), each checked against the student whose batches
        it will read (``faithful_itc``: the itc teacher scores the student's features, so their sizes must
        agree); ``trust_pickle`` as for ``FameViL.from_pretrained``."""
        teachers = {}
        for task, path in paths.items():
            try:
                model = FameViL.from_pretrained(
                    path,
                    trust_pickle=trust_pickle,
                    caption_loss_on_padding=student.config.caption_loss_on_padding,
                    caption_vocab=student.config.caption_vocab,
                    attention=student.config.attention,
                    backend=student.config.backend,
                    residual_stream=student.config.residual_stream,
                    activation_backend=student.config.activation_backend,
                )
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"distill.teachers.{task}: {exc}") from exc
            if task not in model.config.tasks:
                raise ValueError(f"teacher {path} has tasks {model.config.tasks}, not {task!r}")
            _check_teacher(task, path, model.config, student.config, faithful_itc)
            teachers[task] = model.eval()
        return cls(teachers)

    def __contains__(self, task: str) -> bool:
        return task in self.models

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], task: str, gather: Gather | None = None) -> TaskOutput:
        return self.models[task](batch, task, gather)


def _check_teacher(task: str, path: str, teacher, student, faithful_itc: bool) -> None:
    """Refuse a teacher that cannot read the student's batches or whose outputs the KD loss cannot compare
    (``teacher`` and ``student`` are FameViLConfigs)."""
    mismatch = []
    own, theirs = student.clip.vision.image_size, teacher.clip.vision.image_size
    if own != theirs:
        mismatch.append(f"it takes {theirs} px images, the student's batches have {own} px")
    if task == "scr" and teacher.num_classes != student.num_classes:
        mismatch.append(f"it has {teacher.num_classes} classes, the student {student.num_classes}")
    if task == "itc" and faithful_itc and teacher.clip.embed_dim != student.clip.embed_dim:
        mismatch.append(
            f"distill.faithful_itc pairs its {teacher.clip.embed_dim}-d features with the student's "
            f"{student.clip.embed_dim}-d ones"
        )
    if mismatch:
        raise ValueError(f"distill.teachers.{task} ({path}) does not fit the student: {'; '.join(mismatch)}")


def combine(gt: torch.Tensor, kd: torch.Tensor, balance: float) -> torch.Tensor:
    return (2.0 - balance) * gt + balance * kd
