"""The multi-task trainer: task sampling, distillation, gradient combination, mixed precision, distributed
data parallelism, checkpoints with exact resume, logging and periodic evaluation.

One optimizer update = ``update_frequency`` micro-batches whose tasks the sampler picks. Each micro-batch
loss is divided by that count and back-propagated (or, with ``mixed_task_batches``, the update's batches go
through shared backbone passes); IMTL-G instead buffers each task's gradient and combines them. A
non-finite loss or gradient skips the update (or stops the run) and names the task that produced it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import signal
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from famevil_fast.data.records import shared_reads
from famevil_fast.data.transforms import to_device
from famevil_fast.devices import resolve_device
from famevil_fast.model import FameViL, FameViLConfig, TaskOutput, clip_preset
from famevil_fast.model.losses import Gather
from famevil_fast.train.checkpoint import (
    STATE_FILE,
    CheckpointManager,
    cuda_rng_state,
    require_entries,
    rng_untouched,
)
from famevil_fast.train.config import RESUME_MAY_CHANGE, TrainConfig, resume_differences
from famevil_fast.train.cuda_graph import GraphedStep
from famevil_fast.train.distill import Teachers, combine, kd_loss
from famevil_fast.train.distributed import (
    DistInfo,
    FeatureGather,
    gather_objects,
    init_from_env,
    process_device,
)
from famevil_fast.train.imtl import GradientBuffer
from famevil_fast.train.logging import RunLogger
from famevil_fast.train.master_weights import MasterWeights
from famevil_fast.train.optim import build_optimizer, build_scheduler, freeze_backbone, zero_untouched_grads
from famevil_fast.train.sampling import TaskSampler
from famevil_fast.train.tensor_lists import norms_grouped


class TaskStream(Protocol):
    """An endless, resumable source of one task's training batches."""

    def next_batch(self) -> dict[str, torch.Tensor]: ...

    def __len__(self) -> int: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class NonFiniteLoss(RuntimeError):
    """Raised when a non-finite loss or gradient stops the run (``train.nonfinite: stop``); ``reason``
    names the task(s), e.g. "non-finite loss of task(s) ['scr']"."""

    def __init__(self, message: str, reason: str = "non-finite loss or gradient") -> None:
        super().__init__(message)
        self.reason = reason


def grads_finite(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A flag on ``device`` (no read-back): whether every tensor of ``grads`` is finite, from one fused
    norm (a norm that overflows counts as non-finite, as it does for the update's gradient norm)."""
    if not grads:
        return torch.ones((), dtype=torch.bool, device=device)
    return norms_grouped(grads).isfinite().all().to(device)


def task_means(losses: list[list[Any]]) -> dict[str, float]:
    """Mean loss per task over an update's micro-batches (a task can have several), in first-seen order."""
    grouped: dict[str, list[float]] = {}
    for task, value in losses:
        grouped.setdefault(task, []).append(value)
    return {task: sum(values) / len(values) for task, values in grouped.items()}


def non_finite_reason(record: Mapping[str, Any]) -> str:
    """What made an update fail: the tasks with a non-finite loss, else those with a non-finite gradient."""
    bad = sorted({t for t, v in record["losses"] if not math.isfinite(v)})
    if bad:
        return f"non-finite loss of task(s) {bad}"
    tasks = record.get("nonfinite_gradient_tasks")
    if tasks:
        return f"non-finite gradient of task(s) {sorted(set(tasks))} with finite losses"
    return "non-finite gradient norm (every loss and task gradient finite: their combination overflowed)"


def check_new_run(checkpoint_dir: str | Path, resume: bool = False) -> None:
    """Refuse (ValueError) to start a new run in ``checkpoint_dir`` when it holds another run's checkpoints:
    the new run's checkpoints would be mixed with (and pruned among) the old ones, and a later resume would
    continue whichever is newest. With ``resume`` there is nothing to refuse: the run continues the newest
    checkpoint, or starts afresh where there is none. Reads the directory only, so a command can call it
    before it builds anything."""
    if resume:
        return
    existing = CheckpointManager(checkpoint_dir).list()
    if existing:
        raise ValueError(
            f"{checkpoint_dir} already holds the checkpoints of a run (newest: {existing[-1].name}): "
            "continue it with --resume (checkpoint.resume=true), or start the new run in another "
            "checkpoint.dir (or remove the old one)"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def corpus_caption_vocab(root: str) -> tuple[int, ...]:
    """Every token of the FashionGen training captions under ``root``, plus the end token."""
    from famevil_fast.data.tasks import read_products
    from famevil_fast.text import EOT_ID, SOT_ID, tokenize

    ids = tokenize([p.text for p in read_products("fashiongen", root, "train")])
    vocab = set(torch.unique(ids).tolist()) - {0, SOT_ID}
    return tuple(sorted(vocab | {EOT_ID}))


def num_attributes(cfg: TrainConfig) -> int:
    """PAC classes: ``model.num_attributes``, else the attribute vocabulary size (0 without the pac task)."""
    if "pac" not in cfg.model.tasks:
        return cfg.model.num_attributes or 0
    from famevil_fast.train.data_feed import pac_attributes

    attributes = pac_attributes(cfg)
    found = len(attributes.vocabulary)
    if cfg.model.num_attributes is None:
        return found
    if cfg.model.num_attributes < found:
        raise ValueError(
            f"model.num_attributes={cfg.model.num_attributes} is smaller than the {found} attributes of "
            f"{attributes.source}: leave it null (the vocabulary's size) or raise it"
        )
    return cfg.model.num_attributes


class RandomFrozenBackboneWarning(UserWarning):
    """``train.freeze_backbone`` keeps a backbone that no weights were loaded into: it stays random."""


def warn_if_random_backbone(cfg: TrainConfig) -> None:
    """Warn when a frozen backbone starts from no weights (model.init, init_from and resume_weights null):
    only the adapters and heads learn, on random features."""
    m = cfg.model
    if m.init or m.init_from or m.resume_weights:
        return
    how = "true (the default with model.adapter_type xmodal)" if m.adapter_type == "xmodal" else "true"
    warnings.warn(
        RandomFrozenBackboneWarning(
            f"train.freeze_backbone is {how}, but model.init, init_from and resume_weights are null: the "
            "frozen backbone stays random and only adapters and heads learn; give CLIP weights "
            "(model.init) or set train.freeze_backbone=false"
        ),
        stacklevel=3,
    )


def build_model(cfg: TrainConfig) -> FameViL:
    m = cfg.model
    vocab = corpus_caption_vocab(cfg.data.root) if m.caption_vocab == "corpus" and "cap" in m.tasks else None
    fields = m.model_fields(vocab, num_attributes(cfg))
    if m.resume_weights:
        with _names_missing_file("model.resume_weights", m.resume_weights):
            return FameViL.from_pretrained(m.resume_weights, trust_pickle=m.trust_pickle, **fields)
    config = FameViLConfig(clip=clip_preset(m.clip), **fields)
    if config.clip.vision.image_size != cfg.data.image_size:
        raise ValueError(
            f"data.image_size={cfg.data.image_size} but the {m.clip} model takes "
            f"{config.clip.vision.image_size} px"
        )
    if m.init and m.init_from:
        raise ValueError("set model.init (CLIP weights) or model.init_from (a FAME-ViL checkpoint), not both")
    if m.init:
        with _names_missing_file("model.init", m.init), _names_config_conflict(m.init, m.clip):
            return FameViL.from_clip(m.init, config, trust_pickle=m.trust_pickle, match_stored_config=True)
    model = FameViL(config)
    if m.init_from:
        from famevil_fast.model.transfer import load_shared_weights

        with _names_missing_file("model.init_from", m.init_from):
            load_shared_weights(model, m.init_from, trust_pickle=m.trust_pickle)
    return model


@contextlib.contextmanager
def _names_missing_file(field: str, path: str) -> Iterator[None]:
    """A missing checkpoint's FileNotFoundError prefixed with the config field that named it (and, for a
    relative path, the working directory it is read from)."""
    try:
        yield
    except FileNotFoundError as exc:
        where = "" if Path(path).is_absolute() else f" (a relative path, read from {Path.cwd()})"
        raise FileNotFoundError(f"{field}: {exc}{where}") from exc


@contextlib.contextmanager
def _names_config_conflict(path: str, preset: str) -> Iterator[None]:
    """A CLIP config stored with ``model.init``'s weights that differs from the recipe's ``model.clip``
    preset, as one ValueError naming both fields and the differences."""
    from famevil_fast.model.weights import StoredConfigConflict

    try:
        yield
    except StoredConfigConflict as conflict:
        raise ValueError(
            f"model.init {path}: the CLIP config stored with it ({conflict.location}) differs from "
            f"model.clip {preset}'s in {', '.join(conflict.differences)}; set model.clip to the preset of "
            "these weights"
        ) from None


class TrainingModule(nn.Module):
    """What DDP wraps: one forward for a dict of task batches, run separately or through shared passes."""

    def __init__(self, model: FameViL) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batches: dict[str, dict[str, torch.Tensor]], gather: Gather | None = None, mixed: bool = False
    ) -> dict[str, TaskOutput]:
        if mixed and len(batches) > 1:
            return self.model.forward_mixed(batches, gather)
        return {task: self.model(batch, task, gather) for task, batch in batches.items()}


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        streams: Mapping[str, TaskStream] | None = None,
        evaluator=None,
        model: FameViL | None = None,
    ) -> None:
        self.cfg = config.validate()
        run_dir = Path(config.checkpoint.dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise NotADirectoryError(f"checkpoint.dir {str(run_dir)!r} is a file, not a run directory")
        t = config.train
        wanted = resolve_device(t.device, "train.device")
        self.dist: DistInfo = init_from_env(wanted.type)
        self.device = process_device(wanted, self.dist)
        seed_everything(t.seed)
        with shared_reads():  # the caption vocabulary, PAC's attributes and every task's table: one parse
            # loaded models come in eval mode; training mode turns adapter dropout (and the like) on
            self.model = (model or build_model(config)).to(self.device).train()
            if streams is None:
                from famevil_fast.train.data_feed import build_streams

                streams = build_streams(config, self.dist, self.device)
        if t.freeze_backbone:
            freeze_backbone(self.model)
            if model is None and self.dist.is_main:
                warn_if_random_backbone(config)
        self.master_weights = MasterWeights(self.model) if t.master_weights else None
        self.optimizer = build_optimizer(self.model, config.optim, self.master_weights)
        self.scheduler = build_scheduler(self.optimizer, config.schedule)
        missing = [task for task in config.model.tasks if task not in streams]
        if missing:
            raise ValueError(f"no training data for task(s) {missing}")
        self.streams = dict(streams)
        self.sampler = TaskSampler(
            config.model.tasks,
            t.sampling,
            {k: len(s) for k, s in self.streams.items()},
            t.update_frequency,
            t.seed,
            t.task_weights,
        )
        self.teachers = (
            Teachers.load(
                config.distill.teachers, self.model, config.distill.faithful_itc, config.model.trust_pickle
            ).to(self.device)
            if config.distill.enabled
            else None
        )
        self.module = TrainingModule(self.model)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(
                self.module, device_ids=ids, find_unused_parameters=True
            )
            if self.master_weights is not None:  # DDP gave every process rank 0's bf16 weights
                self.master_weights.broadcast()
        self.gather = FeatureGather(self.dist) if self.dist.enabled else None
        self.checkpoints = CheckpointManager(config.checkpoint.dir, config.checkpoint.keep_last)
        self.evaluator = evaluator
        self.update = 0
        self._checkpointed: Path | None = None  # the newest checkpoint written or resumed from
        self._resumed_from: Path | None = None
        self.history: list[dict[str, Any]] = []
        self.eval_results: list[dict[str, Any]] = []
        self._stop_signal: int | None = None  # this process's signal
        self.stopped_by: int | None = None  # the signal that stopped ``fit`` (under DDP: agreed on)
        self._agreed_stop: int | None = None  # under DDP: the signal of any process, agreed at each update
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.graphed = self._graphed_step() if t.cuda_graphs else None

    def _graphed_step(self) -> GraphedStep:
        if self.dist.enabled:
            raise ValueError("train.cuda_graphs runs in one process; turn it off for distributed training")
        bf16 = torch.bfloat16 if self.cfg.train.precision == "bf16" else None
        self._loss_weight = torch.ones((), device=self.device)  # 1 / micro-batches of the update
        losses = torch.compile(self._graph_losses) if self.cfg.train.compile else self._graph_losses
        return GraphedStep(losses, [p for _, p in self.trainable], autocast_dtype=bf16)

    def _graph_losses(self, batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one micro-step as the captured graphs compute it (autocast is applied by GraphedStep)."""
        task_losses = self._micro_losses(batches)
        return sum(task_losses.values()) * self._loss_weight, task_losses

    # ------------------------------------------------------------------ state
    # what ``state`` adds to a checkpoint and ``resume`` needs
    STATE_ENTRIES = ("scheduler", "sampler", "streams")

    def state(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "streams": {task: s.state_dict() for task, s in self.streams.items()},
            "history": self.history[-1000:],
            "config": self.cfg.to_dict(),
        }

    def save(self) -> Path | None:
        """Write the checkpoint of the current update, unless this very update's checkpoint was already
        written (or resumed from) and is still there: nothing has changed since, and rewriting it would
        only delete and write the same files again (the end of a run whose last update was a periodic
        checkpoint, or a resumed run with nothing left to do). Under DDP every process calls it (each
        process's CUDA random state, of its own GPU, is gathered) and the main process writes; returns
        the checkpoint there, None elsewhere."""
        if self.device.type == "cuda":  # the same on every process: all of them gather, or none
            cuda_rng: list[torch.Tensor | None] = gather_objects(cuda_rng_state(self.device), self.dist)
        else:
            cuda_rng = [None] * self.dist.world_size
        if not self.dist.is_main:
            return None
        done = self._checkpointed
        if done is not None and done.name == f"step_{self.update:08d}" and done in self.checkpoints.list():
            return done
        self._checkpointed = self.checkpoints.save(
            self.update, self.model, self.optimizer, self.state(), self.float32_state_dict(), cuda_rng
        )
        return self._checkpointed

    def _agreed_checkpoint(self, path: Path | None) -> Path | None:
        """``path`` (the checkpoint to resume, or None) once every process found the same one: each looks at
        the run directory as its own node's filesystem shows it, and processes that resumed different
        updates would run out of step. ValueError naming what each found otherwise."""
        found = gather_objects(None if path is None else str(path.resolve()), self.dist)
        if len(set(found)) > 1:
            listing = ", ".join(f"rank {rank}: {seen or 'none'}" for rank, seen in enumerate(found))
            raise ValueError(
                f"the processes found different checkpoints to resume ({listing}); every process must see "
                "the same run directory (a shared filesystem, in sync)"
            )
        return path

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from ``path`` or the newest checkpoint of the run directory; False when there is none.
        Checkpoints of the run directory after the resumed update move to ``<dir>/superseded/`` (with a
        warning), so that the continued run's own checkpoints are the ones kept and resumed. Under DDP every
        process calls it, and all must find the same checkpoint (see ``_agreed_checkpoint``)."""
        path = self._agreed_checkpoint(Path(path) if path else self.checkpoints.latest())
        if path is None:
            return False
        check = functools.partial(self._check_resumed_config, path)
        load = None
        if self.master_weights is not None:
            load = functools.partial(self.master_weights.load_float32_state_dict, self.model)
        state = self.checkpoints.load(
            path,
            self.model,
            self.optimizer,
            check,
            load,
            device=self.device,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        for task, stream_state in state["streams"].items():
            if task in self.streams:
                self.streams[task].load_state_dict(stream_state)
        self.history = list(state.get("history", []))
        self.update = int(state["update"])
        self._resumed_from = path
        self._checkpointed = path if path.name == f"step_{self.update:08d}" else None
        moved = self.checkpoints.set_aside_after(self.update) if self.dist.is_main else []
        if moved:
            warnings.warn(
                f"resumed from {path} at update {self.update}: the {len(moved)} later checkpoint(s) of "
                f"{self.checkpoints.directory} now lie in {moved[0].parent} (this run continues from "
                "the older one)",
                stacklevel=2,
            )
        return True

    def float32_state_dict(self) -> dict[str, torch.Tensor] | None:
        """With ``train.master_weights``, the model's state dict with the optimizer's float32 masters in
        place of its bf16 parameters (what checkpoints and the final export hold); else None (the model's
        own)."""
        if self.master_weights is None:
            return None
        return self.master_weights.float32_state_dict(self.model)

    def _check_resumed_config(self, path: Path, state: Mapping[str, Any]) -> None:
        """Refuse a training state that lacks an entry ``resume`` restores, and a recipe that changes what
        the resumed updates compute (see RESUME_MAY_CHANGE), before anything of the checkpoint is restored."""
        require_entries(path / STATE_FILE, dict(state), {None: self.STATE_ENTRIES})
        differences = resume_differences(state.get("config") or {}, self.cfg)
        if differences:
            raise ValueError(
                f"cannot resume from {path}: the recipe differs from the checkpoint's config in "
                f"field(s) that an exact resume cannot change: {'; '.join(differences)}. Restore them, or "
                "start a new run in another checkpoint.dir (fields that may change on resume: "
                f"{', '.join(RESUME_MAY_CHANGE)})"
            )

    # ------------------------------------------------------------------ one update
    def _autocast(self):
        if self.cfg.train.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: to_device(v, self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _task_loss(self, task: str, out, batch) -> torch.Tensor:
        if self.teachers is None or task not in self.teachers:
            return out.loss
        teacher_out = self.teachers(batch, task, self.gather)
        distill, backend = self.cfg.distill, self.cfg.model.backend
        kd = kd_loss(task, out, teacher_out, distill.faithful_itc, backend, self.gather)
        return combine(out.loss, kd, self.cfg.distill.balance)

    def _micro_losses(self, batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Each task's loss (with its distillation term) for one micro-step's batches."""
        outputs = self.module(batches, self.gather, mixed=len(batches) > 1)
        return {t: self._task_loss(t, outputs[t], batches[t]) for t in batches}

    def _micro_batches(self, tasks: list[str]) -> Iterator[dict[str, dict[str, torch.Tensor]]]:
        batches = [(task, self._to_device(self.streams[task].next_batch())) for task in tasks]
        grouped = self.cfg.train.mixed_task_batches and len(set(tasks)) == len(tasks)
        if grouped:
            yield dict(batches)
        else:
            for task, batch in batches:
                yield {task: batch}

    def train_update(self) -> dict[str, Any]:
        """Run one optimizer update; returns its losses (per micro-batch task) and whether it was applied.

        A non-finite loss or gradient leaves the parameters and the optimizer untouched; under
        ``train.nonfinite: stop`` it raises NonFiniteLoss before the update count and the scheduler advance.
        """
        tasks = self.sampler.next_update()
        imtl = GradientBuffer(self.trainable) if self.cfg.train.gradient_strategy != "sum" else None
        losses, probes = self._accumulate(tasks, imtl)
        buffers = None
        if imtl is not None:
            buffers = imtl.buffers  # kept until the step is decided: they name a task whose gradient is bad
            imtl.apply(self.cfg.train.gradient_strategy)
        hidden = self.graphed.untouched_grads_hidden() if self.graphed else contextlib.nullcontext()
        with hidden:  # parameters no micro-batch reached keep .grad None, as in eager steps
            values, grad_norm, agreed_flags = self._read_losses_and_norm(losses, probes)
            applied = all(math.isfinite(v) for v in values)
            culprits = None if applied else self._gradient_culprits(probes, buffers, agreed_flags)
            del buffers
            if applied:
                self._clip(grad_norm)
                if self.cfg.optim.step_untouched:
                    zero_untouched_grads(self.optimizer, [p for _, p in self.trainable])
                self.optimizer.step()
        self._zero_grad()
        record = {
            "update": self.update + 1,
            "applied": applied,
            "grad_norm": values[-1],
            "lr": self.optimizer.param_groups[0]["lr"],  # the rate this update used (before the step below)
            "losses": [[t, v] for (t, _), v in zip(losses, values)],
        }
        if not applied:
            record["nonfinite_gradient_tasks"] = culprits
            self._non_finite(record)  # under "stop" this raises: nothing below happens
        self.scheduler.step()
        self.update += 1
        self.history.append(record)
        return record

    def _accumulate(
        self, tasks: list[str], imtl: GradientBuffer | None
    ) -> tuple[list[tuple[str, torch.Tensor]], list[tuple[list[str], torch.Tensor | None]]]:
        """Forward and backward of every micro-batch of the update: (task, loss) pairs, and per micro-batch
        its tasks with a device flag (no read-back) of whether the accumulated gradient is still finite
        after it (None for the last one, which the gradient norm of the update covers; IMTL-G keeps each
        task's gradient apart instead)."""
        micro = list(self._micro_batches(tasks))
        losses: list[tuple[str, torch.Tensor]] = []
        probes: list[tuple[list[str], torch.Tensor | None]] = []
        for i, batches in enumerate(micro):
            last = i == len(micro) - 1
            if self.graphed is not None:
                self._loss_weight.fill_(1.0 / len(tasks))
                losses.extend(self.graphed(batches).items())
            else:
                losses.extend(self._backward(batches, len(tasks), defer_sync=not last and imtl is None))
            if imtl is not None:
                imtl.collect(next(iter(batches)))
            probe = None if last or imtl is not None else grads_finite(self._grads(), self.device)
            probes.append((list(batches), probe))
        return losses, probes

    def _backward(
        self, batches: dict[str, dict[str, torch.Tensor]], count: int, defer_sync: bool
    ) -> list[tuple[str, torch.Tensor]]:
        """Eager forward and backward of one micro-step (``defer_sync``: leave DDP's gradient all-reduce to
        a later micro-step)."""
        with self.module.no_sync() if defer_sync and self.dist.enabled else contextlib.nullcontext():
            with self._autocast():
                task_losses = self._micro_losses(batches)
            total = sum(task_losses.values()) / count
            total.backward()
        return [(t, loss.detach().float()) for t, loss in task_losses.items()]

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for _, p in self.trainable if p.grad is not None]

    def _read_losses_and_norm(
        self,
        losses: list[tuple[str, torch.Tensor]],
        probes: list[tuple[list[str], torch.Tensor | None]],
    ) -> tuple[list[float], torch.Tensor, list[bool] | None]:
        """The losses and the gradient norm (last), read back in one transfer, and the norm itself.

        Under DDP the losses are those of the global batch and every process gets the same values: one
        all-gather per update of each process's losses (already weighted by its share of the rows, see
        ``model.losses``: their mean is the global loss; NaN on any process makes it NaN), of its
        micro-batch gradient probes (the third value: per probe that is not None, whether it is finite on
        every process) and of its stop signal (the largest one is agreed on: ``_agreed_stop``). The gradient
        norm needs none: DDP has already averaged the gradients."""
        grad_norm = torch.nn.utils.get_total_norm(self._grads())
        norm = grad_norm.detach().float().to(self.device).reshape(1)
        local = torch.stack([v for _, v in losses])
        if not self.dist.enabled:
            return torch.cat([local, norm]).tolist(), grad_norm, None
        import torch.distributed as dist

        flags = [p for _, p in probes if p is not None]
        finite = torch.stack(flags).float() if flags else local.new_zeros(0)
        stop = torch.full((1,), float(self._stop_signal or 0), device=self.device)
        row = torch.cat([local.float(), finite, stop])
        rows = [torch.empty_like(row) for _ in range(self.dist.world_size)]
        dist.all_gather(rows, row)
        table = torch.stack(rows)
        n, f = local.shape[0], finite.shape[0]
        mean = table[:, :n].sum(0) / self.dist.world_size
        out = torch.cat([mean, norm, table[:, n : n + f].amin(0), table[:, -1:].amax(0)]).tolist()
        self._agreed_stop = int(out[-1]) or None
        return out[: n + 1], grad_norm, [v == 1.0 for v in out[n + 1 : n + 1 + f]]

    def _clip(self, grad_norm: torch.Tensor) -> None:
        """Scale the gradients down to ``train.clip_grad_norm`` (a finite norm: checked before)."""
        if self.cfg.train.clip_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(
                [p for _, p in self.trainable], self.cfg.train.clip_grad_norm, grad_norm
            )

    def _gradient_culprits(
        self,
        probes: list[tuple[list[str], torch.Tensor | None]],
        buffers: Mapping[str, Mapping[str, torch.Tensor]] | None,
        agreed: list[bool] | None = None,
    ) -> list[str]:
        """Tasks whose gradient is non-finite (read back only for a failed update). IMTL-G: each task whose
        buffered gradient is; sum: the first micro-batch after which the accumulated gradient was (later
        ones cannot be told apart: NaN stays NaN). Empty when every gradient is finite (the norm overflowed,
        or the IMTL-G combination did). ``agreed`` (DDP): the probes' flags over every process, in place of
        the local ones (the accumulated gradient is local until the last micro-batch; the last probe and the
        IMTL-G buffers are read from gradients DDP has averaged, the same on every process)."""
        if buffers is not None:
            names = list(buffers)
            flags = [grads_finite(list(buffers[t].values()), self.device) for t in names]
            return [t for t, ok in zip(names, torch.stack(flags).tolist()) if not ok] if flags else []
        flags = [flag if flag is not None else grads_finite(self._grads(), self.device) for _, flag in probes]
        read = torch.stack(flags).tolist()
        if agreed is not None:
            given = iter(agreed)
            read = [next(given) if flag is not None else ok for (_, flag), ok in zip(probes, read)]
        for (tasks, _), ok in zip(probes, read):
            if not ok:
                return tasks
        return []

    def _zero_grad(self) -> None:
        if self.graphed is not None:
            self.graphed.zero_grad()  # the captured graphs accumulate into these gradient tensors
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _non_finite(self, record: dict[str, Any]) -> None:
        """Log the failed update; under ``train.nonfinite: stop`` raise NonFiniteLoss naming the cause."""
        reason = non_finite_reason(record)
        stop = self.cfg.train.nonfinite == "stop"
        outcome = (
            f"stopping at update {self.update} (update {record['update']} not applied: parameters, "
            "optimizer and scheduler unchanged)"
            if stop
            else "the update was skipped"
        )
        text = f"update {record['update']}: {reason}; {outcome}"
        if self.logger is not None:
            self.logger.message(text)
        if stop:
            raise NonFiniteLoss(text, reason)

    # ------------------------------------------------------------------ loop
    logger: RunLogger | None = None

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._check_evaluation()
        # a caller's resume() before fit stands; else checkpoint.resume continues the run directory's newest
        resumed = self._resumed_from is not None or (cfg.checkpoint.resume and self.resume())
        if not resumed:
            self._check_new_run()
        self.logger = RunLogger(
            cfg.checkpoint.dir,
            cfg.train.updates,
            self.update,
            cfg.logging.tensorboard,
            cfg.logging.progress,
            enabled=self.dist.is_main,
        )
        if resumed:
            self.logger.message(f"resumed from {self._resumed_from} at update {self.update}")
        elif cfg.checkpoint.resume:
            self.logger.message(
                f"no checkpoint to resume in {self.checkpoints.directory}: starting a new run"
            )
        previous = {s: signal.signal(s, self._request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        status = "finished"
        try:
            while self.update < cfg.train.updates:
                record = self.train_update()
                logged = self._log(record)
                # the update's losses were read back with its gradient norm: the bar shows them, no extra sync
                self.logger.advance(update=self.update, losses=task_means(record["losses"]))
                if cfg.eval.every and self.update % cfg.eval.every == 0 and self.update < cfg.train.updates:
                    self.evaluate()
                    self._agree_stop()  # a signal caught while evaluating stops every process now
                if cfg.checkpoint.every and self.update % cfg.checkpoint.every == 0:
                    self.save()
                stop = self._agreed_stop if self.dist.enabled else self._stop_signal
                if stop is not None:  # under DDP every process stops after the same update
                    status = f"interrupted by signal {stop}"
                    self.stopped_by = stop
                    if not logged:  # the run's last update: logged whatever logging.every
                        self._log(record, last=True)
                    break
            self.save()
            if status == "finished" and self.dist.is_main:
                self.model.save_pretrained(Path(cfg.checkpoint.dir) / "final", self.float32_state_dict())
            results = self.evaluate() if status == "finished" else {}
        except NonFiniteLoss as exc:  # no checkpoint: the last one saved stays the newest
            status = f"stopped ({exc.reason})"
            raise
        except BaseException as exc:  # a crash: the log must not call it finished
            status = f"failed ({type(exc).__name__}: {exc})"
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.logger.message(f"training {status} at update {self.update}")
            self.logger.close()
        return {"status": status, "update": self.update, "eval": results}

    def _check_new_run(self) -> None:
        """Refuse to start a run at update 0 in a directory holding another run's checkpoints (see
        ``check_new_run``). A trainer already at a later update was resumed by the caller."""
        if self.update == 0:
            check_new_run(self.cfg.checkpoint.dir)

    def _check_evaluation(self) -> None:
        """Fail before training rather than at the first evaluation when the evaluator cannot run here:
        the caption metrics need pycocoevalcap, and METEOR needs Java."""
        if self.evaluator is None or "cap" not in getattr(self.evaluator, "sets", {"cap": None}):
            return
        from famevil_fast.eval.caption_tokenize import require_caption_metrics

        require_caption_metrics(self.cfg.eval.caption_metrics, "eval.caption_metrics")

    def _agree_stop(self) -> None:
        """Under DDP, agree on the stop signals caught since the last update's exchange (the largest one), so
        that every process stops after this update rather than the next."""
        if not self.dist.enabled:
            return
        import torch.distributed as dist

        flag = torch.full(
            (1,), float(max(self._agreed_stop or 0, self._stop_signal or 0)), device=self.device
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._agreed_stop = int(flag.item()) or None

    def _request_stop(self, signum, frame) -> None:
        self._stop_signal = signum

    def _log(self, record: dict[str, Any], last: bool = False) -> bool:
        """Log the update's losses every ``logging.every`` updates, at the first, and at the last (the
        recipe's ``train.updates``, or ``last``: an interruption's); whether it logged."""
        every = self.cfg.logging.every
        first_or_last = last or self.update in (1, self.cfg.train.updates)
        if not (every and (self.update % every == 0 or first_or_last)):
            return False
        values: dict[str, Any] = {"lr": record["lr"], "grad_norm": record["grad_norm"]}
        if not record["applied"]:
            values["applied"] = False
        values.update({f"loss/{task}": value for task, value in task_means(record["losses"]).items()})
        self.logger.log(self.update, values)
        return True

    def evaluate(self) -> dict[str, Any]:
        """Run the evaluator and return its results on rank 0 ({} elsewhere). Under DDP an evaluator whose
        ``runs_on_every_process`` is true (``Evaluator``: each process encodes its share of the sets) is
        called by every process; any other only by rank 0."""
        if self.evaluator is None:
            return {}
        if not self.dist.is_main and not getattr(self.evaluator, "runs_on_every_process", False):
            return {}
        self.model.eval()
        try:
            # the evaluation draws nothing from the training's random stream: a run evaluated at update k
            # and a run that stopped (and checkpointed) at k before evaluating draw the same dropout masks
            with torch.no_grad(), self._autocast(), rng_untouched(self.device):
                results = self.evaluator(self.model)
        finally:
            self.model.train()
        if not self.dist.is_main:
            return {}
        self.eval_results.append({"update": self.update, **results})
        if self.logger is not None:
            for task, metrics in results.items():
                numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
                self.logger.log(self.update, numbers, kind=f"eval/{task}")
        return results
