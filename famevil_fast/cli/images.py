"""Reading user-given image files for the inference commands (eval crop, CLIP normalisation)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from famevil_fast.data.image_files import load_images

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def collect_images(paths: list[str]) -> list[Path]:
    """Files as given, and the image files inside given folders (sorted; subfolders are not searched, also
    those whose names end in an image suffix); a missing path is an error. A file reached twice (named
    twice, or named and inside a named folder) is kept once, where it first appears, with a warning."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"image path not found: {p}")
        if p.is_dir():
            found.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()))
        else:
            found.append(p)
    if not found:
        raise ValueError(f"no images found in {paths}")
    return _first_of_each_file(found)


def _first_of_each_file(files: list[Path]) -> list[Path]:
    """``files`` without the later mentions of a file (the same file once symbolic links and ".." are
    resolved), with a warning counting them."""
    seen: set[Path] = set()
    kept, dropped = [], []
    for f in files:
        real = f.resolve()
        (dropped if real in seen else kept).append(f)
        seen.add(real)
    if dropped:
        warnings.warn(
            f"{len(dropped)} image paths name a file already listed (e.g. {dropped[0]}); each file is used "
            "once",
            stacklevel=3,
        )
    return kept


class ImageFileBatches:
    """Image files in batches of ``batch_size`` (the last one shorter), each ``(files, pixels)`` as
    :func:`load_images` makes it. The files of the next ``prefetch`` batches are decoded on ``threads``
    threads while the current batch is used; ``iter_steps`` makes only the batches asked for (a process's
    share under torchrun, ``famevil_fast.eval.sharding``)."""

    def __init__(
        self,
        files: list[Path],
        batch_size: int,
        image_size: int,
        eval_resize: str = "keep_aspect",
        threads: int | None = None,
        prefetch: int = 2,
    ) -> None:
        from famevil_fast.data.backends.base import default_threads

        self.files, self.batch_size, self.image_size = files, batch_size, image_size
        self.eval_resize, self.prefetch = eval_resize, max(0, prefetch)
        self.threads = threads or default_threads()

    def __len__(self) -> int:
        return -(-len(self.files) // self.batch_size)

    def chunk(self, step: int) -> list[Path]:
        return self.files[step * self.batch_size : (step + 1) * self.batch_size]

    def __iter__(self) -> Iterator[tuple[list[Path], torch.Tensor]]:
        for _, batch in self.iter_steps(range(len(self))):
            yield batch

    def iter_steps(self, steps: range) -> Iterator[tuple[int, tuple[list[Path], torch.Tensor]]]:
        """``(step, (files, pixels))`` of ``steps`` in order."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=self.threads)
        try:
            pending: deque = deque()
            for step in steps:
                pending.append((step, self._submit(pool, self.chunk(step))))
                if len(pending) > self.prefetch:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:  # a consumer that stops early (an error, a break) leaves no decoding behind
            pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self, pool, files: list[Path]) -> list:
        return [(f, pool.submit(load_images, [f], self.image_size, self.eval_resize)) for f in files]

    @staticmethod
    def _collect(step: int, decoding: list) -> tuple[int, tuple[list[Path], torch.Tensor]]:
        files = [f for f, _ in decoding]
        return step, (files, torch.cat([job.result() for _, job in decoding]))
