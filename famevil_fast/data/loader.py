"""Loaders: batches of a :class:`~famevil_fast.data.tasks.SampleTable` decoded by an image backend.

:class:`TrainLoader` shuffles per epoch, shards across ranks and resumes exactly. Epoch ``e`` is the
permutation ``default_rng([seed, e])``; global step ``b`` takes permutation positions
``[b * B * W, (b + 1) * B * W)`` and rank ``r`` the ``r``-th block of ``B`` of them (``B`` batch size, ``W``
world size). With ``drop_last=False`` a partial last step is split as evenly as possible over the ranks in
rank order, and dropped when it holds fewer samples than there are ranks: every rank runs the same number
of steps and no batch is empty. The crop, flip and view of a sample are hashed from (seed, epoch,
position, image slot), so a batch is a pure function of (seed, epoch, step): ``state_dict()`` stores only
the epoch and the number of batches the caller has received, and a loader restored from it yields exactly
the remaining batches.

Batches are built by a background thread (``prefetch`` ahead; on CUDA on a side stream the consumer
waits on). Samples whose image is missing or undecodable are dropped from their batch (so a batch can be
smaller than ``batch_size``) and summarised in one :class:`~famevil_fast.data.images.SkippedImagesWarning`
per epoch.

:class:`EvalBatches` walks a table once in order with the eval crop (its resize keeping the aspect, or
squashing as the official code, per ``eval_resize``), dropping nothing but undecodable images.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from famevil_fast.data.backends import ImageBackend, Loaded, choose_backend, make_backend
from famevil_fast.data.fiq_convert import FIQ_CATEGORIES
from famevil_fast.data.images import SkippedImages
from famevil_fast.data.tasks import SampleTable, train_table
from famevil_fast.data.transforms import CropPlan, check_eval_resize, counter_uniforms, to_device

_END = object()


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def backend_name(
    backend: str | ImageBackend | None, device: torch.device, cache_dir: str | os.PathLike | None = None
) -> str:
    """The name of the backend ``resolve_backend`` picks, without building it."""
    if isinstance(backend, ImageBackend):
        return backend.name
    return backend or ("cache" if cache_dir is not None else choose_backend(device))


def resolve_backend(
    backend: str | ImageBackend | None,
    root: str | os.PathLike,
    image_size: int,
    device: torch.device,
    cache_dir: str | os.PathLike | None = None,
    num_threads: int | None = None,
    verify_cache: bool = True,
) -> ImageBackend:
    """An image backend from a name (None: ``cache`` when ``cache_dir`` is given, else automatic)."""
    if isinstance(backend, ImageBackend):
        return backend
    name = backend_name(backend, device, cache_dir)
    if name == "cache":
        if cache_dir is None:
            raise ValueError("data backend 'cache' needs cache_dir (build one with `famevil-fast cache`)")
        from famevil_fast.data.backends.cache_backend import CacheBackend

        return CacheBackend(cache_dir, image_size, device, num_threads, verify=verify_cache, root=root)
    return make_backend(name, root, image_size, device, num_threads)


def _image_paths(
    table: SampleTable,
    idx: np.ndarray,
    uniforms: dict[str, np.ndarray] | None,
    eval_resize: str = "keep_aspect",
) -> tuple[list, CropPlan]:
    """The image of each (slot, sample), slot-major, and their crop plan (training draws a random view;
    without ``uniforms``, the eval crop after the ``eval_resize`` resize)."""
    paths: list[str] = []
    plans: list[np.ndarray] = []
    drawn: dict[str, list[int]] = {}
    for slot in table.slots:
        choices = table.images[slot]
        if uniforms is None:
            paths += [choices[i][0] for i in idx]
            continue
        u = uniforms[slot]
        if table.distinct_views and slot == table.distinct_views[1]:
            views = _other_views(drawn[table.distinct_views[0]], [len(choices[i]) for i in idx], u[:, 5])
        else:
            views = [min(int(u[k, 5] * len(choices[i])), len(choices[i]) - 1) for k, i in enumerate(idx)]
        drawn[slot] = views
        paths += [choices[i][v] for i, v in zip(idx, views)]
        plans.append(u[:, :5])
    return paths, CropPlan(np.concatenate(plans) if plans else None, eval_resize=eval_resize)


def _other_views(first: list[int], counts: list[int], u: np.ndarray) -> list[int]:
    """A view index other than ``first`` (uniform over the rest), or ``first`` when it is the only view."""
    out = []
    for f, n, x in zip(first, counts, u):
        offset = 1 + min(int(x * (n - 1)), n - 2) if n > 1 else 0
        out.append((f + offset) % n)
    return out


def _slot_rows(loaded: Loaded, n_slots: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Samples whose every image decoded, and for each slot the rows of ``loaded.pixels`` holding them."""
    keep = loaded.ok.reshape(n_slots, n).all(axis=0)
    row = np.cumsum(loaded.ok) - 1
    return keep, [row[s * n : (s + 1) * n][keep] for s in range(n_slots)]


def make_batch(
    table: SampleTable,
    backend: ImageBackend,
    idx: np.ndarray,
    uniforms: dict[str, np.ndarray] | None,
    device: torch.device,
    skipped: SkippedImages,
    eval_resize: str = "keep_aspect",
) -> dict[str, torch.Tensor]:
    """Decode the images of samples ``idx`` and gather their fields; samples with a bad image are dropped.
    Without ``uniforms`` the images get the eval crop, resized as ``eval_resize`` says."""
    batch: dict[str, torch.Tensor] = {}
    keep = np.ones(len(idx), dtype=bool)
    if table.slots:
        paths, plan = _image_paths(table, idx, uniforms, eval_resize)
        loaded = backend.load(paths, plan)
        for path, reason in loaded.failures:
            skipped.add(path, reason)
        keep, rows = _slot_rows(loaded, len(table.slots), len(idx))
        pixels = loaded.pixels
        for slot, r in zip(table.slots, rows):
            whole = len(r) == len(pixels) and np.array_equal(r, np.arange(len(r)))
            batch[slot] = pixels if whole else pixels[to_device(torch.from_numpy(r), pixels.device)]
    sel = torch.from_numpy(idx[keep])
    for name, values in table.fields.items():
        batch[name] = to_device(values[sel], device)
    return batch


class _Producer:
    """Runs ``make(step)`` for steps in order on a thread, ``depth`` batches ahead."""

    def __init__(self, make, steps: range, depth: int, device: torch.device) -> None:
        self.make, self.steps, self.device = make, steps, device
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="famevil-data", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        try:
            for step in self.steps:
                if self.stop.is_set():
                    return
                with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                    batch = self.make(step)
                    event = torch.cuda.Event() if cuda else None
                    if event is not None:
                        event.record(stream)
                if not self._put((step, batch, event)):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def __iter__(self) -> Iterator[tuple[int, dict]]:
        while True:
            item = self.queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            step, batch, event = item
            if event is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                for t in batch.values():
                    if t.device.type == "cuda":
                        t.record_stream(current)
            yield step, batch

    def close(self) -> None:
        self.stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.queue.get_nowait()
        self.thread.join()


def _iterate(make, steps: range, prefetch: int, device: torch.device) -> Iterator[tuple[int, dict]]:
    if prefetch <= 0:
        for step in steps:
            yield step, make(step)
        return
    producer = _Producer(make, steps, prefetch, device)
    try:
        yield from producer
    finally:
        producer.close()


class TrainLoader:
    """Shuffled, sharded, exactly resumable batches of one task (see the module docstring)."""

    def __init__(
        self,
        table: SampleTable,
        backend: ImageBackend,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        prefetch: int = 2,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"TrainLoader: batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"TrainLoader: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        self.table, self.backend = table, backend
        self.batch_size, self.seed, self.rank, self.world_size = (
            int(batch_size),
            int(seed),
            int(rank),
            int(world_size),
        )
        self.drop_last, self.prefetch = drop_last, int(prefetch)
        self.device = backend.device
        self.skipped = SkippedImages(f"{table.name} loader")
        self._epoch, self._position = 0, 0
        if len(self) == 0:
            need = f"one global batch of {self.batch_size} x" if drop_last else "one sample for each of"
            raise ValueError(
                f"TrainLoader: {table.name} has {len(table)} samples, "
                f"fewer than {need} {self.world_size} ranks"
            )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        n = len(self.table)
        full, rest = divmod(n, self.global_batch)
        # a partial last step needs one sample per rank, so that no rank gets an empty batch
        return full + int(not self.drop_last and rest >= self.world_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: another epoch starts at its first batch, the same one keeps its place."""
        if epoch != self._epoch:
            self._epoch, self._position = int(epoch), 0

    def state_dict(self) -> dict:
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "num_samples": len(self.table),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "drop_last": self.drop_last,
            "table": self.table.name,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` left off; ValueError when it was saved with other data, seed, batch size,
        world size or ``drop_last`` (a state that predates the field is not checked for it), or when its
        position is not a step of an epoch here."""
        mine = self.state_dict()
        for key in ("seed", "num_samples", "batch_size", "world_size", "drop_last"):
            if state.get(key) != mine[key] and (key in state or key != "drop_last"):
                raise ValueError(
                    f"TrainLoader.load_state_dict: {key} is {state.get(key)} in the state but {mine[key]} "
                    "here; an exact resume needs the same data, seed, batch size, world size and drop_last"
                )
        if not 0 <= int(state["position"]) < len(self):  # the step after an epoch's last is the next's first
            raise ValueError(
                f"TrainLoader.load_state_dict: position {state['position']} outside 0..{len(self) - 1}"
            )
        self._epoch, self._position = int(state["epoch"]), int(state["position"])

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.table))

    def positions(self, step: int) -> np.ndarray:
        """Epoch positions of this rank's samples in global step ``step``: the ``rank``-th of ``world_size``
        consecutive blocks of the step's positions, as even as possible (so ``batch_size`` each, except in a
        partial last step)."""
        start = step * self.global_batch
        base, extra = divmod(min(self.global_batch, len(self.table) - start), self.world_size)
        lo = start + self.rank * base + min(self.rank, extra)
        return np.arange(lo, lo + base + int(self.rank < extra))

    def batch(self, epoch: int, step: int, perm: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Batch ``step`` of ``epoch`` for this rank (pure function of seed, epoch, step)."""
        perm = self.permutation(epoch) if perm is None else perm
        pos = self.positions(step)
        uniforms = {
            slot: counter_uniforms(self.seed, epoch, pos, slot=s) for s, slot in enumerate(self.table.slots)
        }
        return make_batch(self.table, self.backend, perm[pos], uniforms, self.device, self.skipped)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, start, n = self._epoch, self._position, len(self)
        perm = self.permutation(epoch)
        for step, batch in _iterate(
            lambda b: self.batch(epoch, b, perm), range(start, n), self.prefetch, self.device
        ):
            self._position = step + 1
            if self._position == n:
                self.skipped.report()
                self._epoch, self._position = epoch + 1, 0
            yield batch

    def stream(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, moving to the next epoch at the end of each."""
        while True:
            yield from self

    def close(self) -> None:
        self.backend.close()


class EvalBatches:
    """All samples of a table, in order, in batches, with the eval crop; re-iterable.

    ``eval_resize``: "keep_aspect" (default: shorter side to round(S * 256 / 224), aspect kept) or "squash"
    (the official code's resize to a square, aspect not preserved), then the centre crop S."""

    def __init__(
        self,
        table: SampleTable,
        backend: ImageBackend,
        batch_size: int,
        prefetch: int = 2,
        eval_resize: str = "keep_aspect",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"EvalBatches: batch_size must be >= 1, got {batch_size}")
        self.table, self.backend, self.batch_size, self.prefetch = (
            table,
            backend,
            int(batch_size),
            int(prefetch),
        )
        self.eval_resize = check_eval_resize(eval_resize)
        self.device = backend.device
        self.skipped = SkippedImages(f"{table.name}")

    def __len__(self) -> int:
        return -(-len(self.table) // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.table)

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        idx = np.arange(step * self.batch_size, min((step + 1) * self.batch_size, len(self.table)))
        return make_batch(self.table, self.backend, idx, None, self.device, self.skipped, self.eval_resize)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for _, batch in self.iter_steps(range(len(self))):
            yield batch

    def iter_steps(self, steps: range) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(step, batch)`` of the given steps in their order, prefetched as in iteration (a distributed
        evaluation makes every ``world``-th batch in each process, ``famevil_fast.eval.sharding``)."""
        yield from _iterate(self.batch, steps, self.prefetch, self.device)
        rows = sum(
            len(range(s * self.batch_size, min((s + 1) * self.batch_size, len(self.table)))) for s in steps
        )
        self.skipped.report(total=rows * max(1, len(self.table.slots)))


def build_train_loader(
    task: str,
    root: str | os.PathLike,
    batch_size: int,
    image_size: int = 224,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    backend: str | ImageBackend | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    split: str = "train",
    dataset: str | None = None,
    drop_last: bool = True,
    num_threads: int | None = None,
    prefetch: int = 2,
    check_files: bool = True,
    verify_cache: bool = True,
    categories: Sequence[str] = FIQ_CATEGORIES,
) -> TrainLoader:
    """A :class:`TrainLoader` for ``task`` ("itc", "tgir", "scr", "cap") over the datasets under ``root``.

    ``backend``: "dali", "torchvision", "pil", "cache" or None (``cache`` when ``cache_dir`` is given, else
    automatic, see ``famevil_fast.data.backends``). ``device`` defaults to CUDA when available; every tensor
    of a batch is on it. ``dataset`` overrides the task's dataset ("fashion200k" for "itc"); ``categories``
    restricts "tgir" to some FashionIQ categories.
    """
    dev = torch.device(device) if device is not None else default_device()
    # images missing from where the backend reads them (the cache or the files) are dropped up front
    from_cache = backend_name(backend, dev, cache_dir) == "cache"
    source = getattr(backend, "cache", cache_dir) if from_cache else False
    table = train_table(task, root, split, dataset, cache_dir, check_files, categories, source)
    images = resolve_backend(backend, root, image_size, dev, cache_dir, num_threads, verify_cache)
    if hasattr(images, "max_batch"):
        images.max_batch = max(images.max_batch, batch_size * max(1, len(table.slots)))
    return TrainLoader(table, images, batch_size, seed, rank, world_size, drop_last, prefetch)
