"""Deterministic random task streams and tiny configs for trainer tests."""

from __future__ import annotations

import torch
from helpers import token_batch

from famevil_fast.train.config import load_config


class RandomStream:
    """Batch k of a task is a pure function of (seed, k): resumable by its position alone."""

    def __init__(
        self,
        task: str,
        seed: int = 0,
        batch: int = 4,
        size: int = 32,
        length: int = 64,
        rows: slice | None = None,
        poison_at: int | None = None,
    ) -> None:
        self.task, self.seed, self.batch, self.size, self.length = task, seed, batch, size, length
        self.rows = rows or slice(None)
        self.position = 0
        self.poison_at = poison_at

    def next_batch(self) -> dict[str, torch.Tensor]:
        k = self.position
        self.position += 1
        g = torch.Generator().manual_seed(self.seed * 100_003 + k)
        b, s = self.batch, self.size
        out = {
            "pixels": torch.randn(b, 3, s, s, generator=g),
            "ref_pixels": torch.randn(b, 3, s, s, generator=g),
            "target_pixels": torch.randn(b, 3, s, s, generator=g),
            "input_ids": token_batch(b, seed=self.seed * 7919 + k),
            "labels": torch.randint(0, 10, (b,), generator=g),
        }
        if self.poison_at == k:
            out["pixels"] = out["pixels"] * float("nan")
            out["ref_pixels"] = out["ref_pixels"] * float("nan")
        return {key: v[self.rows] for key, v in out.items()}

    def __len__(self) -> int:
        return self.length

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state) -> None:
        self.position = int(state["position"])


TASKS = ("itc", "tgir", "scr", "cap")


def streams(seed: int = 0, **kwargs) -> dict[str, RandomStream]:
    return {t: RandomStream(t, seed + i, **kwargs) for i, t in enumerate(TASKS)}


def micro_config(run_dir, *overrides: str):
    base = [
        "model.clip=micro",
        "model.adapter_bottleneck=8",
        "data.image_size=32",
        "data.batch_size=4",
        "train.updates=4",
        "train.precision=fp32",
        "train.device=cpu",
        "optim.lr=1e-3",
        "optim.new_module_lr_multiplier=2.0",
        "schedule.warmup_updates=2",
        "schedule.decay_at=[3]",
        "eval.every=0",
        f"checkpoint.dir={run_dir}",
        "checkpoint.every=0",
        "logging.progress=false",
        "logging.tensorboard=false",
    ]
    return load_config(None, base + list(overrides))
