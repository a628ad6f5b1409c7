"""IMTL-G gradient combination: the batched per-tensor combination against the one-tensor-at-a-time
reference, on the gradients of a whole FAME-ViL model (ViT-B/16 on a GPU, the tiny model on the CPU).

Four tasks; every task gets a random gradient for the backbone, the tasks that use the cross-attention
adapters (tgir, scr, cap) for those, and each task for its own adapters and head, as in one round-robin
update of the full recipe. ``pytest bench/bench_imtl.py -s --benchmark-disable`` prints the report.
"""

from __future__ import annotations

import pytest
import torch

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.train.imtl import combine_all_per_tensor, combine_each_tensor, combine_global

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PRESET = "ViT-B-16" if CUDA else "tiny"
TASKS = ("itc", "tgir", "scr", "cap")
XAA_TASKS = ("tgir", "scr", "cap")
ROUNDS = 5 if CUDA else 2


def _users(name: str) -> tuple[str, ...]:
    for task in TASKS:
        if f".{task}." in name or name.startswith(f"heads.{task}"):
            return (task,)
    return XAA_TASKS if ".xaa." in name else TASKS


@pytest.fixture(scope="module")
def gradients() -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    with torch.device("meta"):
        model = FameViL(FameViLConfig(clip=clip_preset(PRESET), tasks=TASKS))
    names = [n for n, _ in model.named_parameters()]
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    buffers: dict[str, dict[str, torch.Tensor]] = {t: {} for t in TASKS}
    for n in names:
        for t in _users(n):
            buffers[t][n] = torch.randn(shapes[n], generator=gen, device=DEVICE)
    return buffers, names


def test_report(gradients, median_ms, device_description) -> None:
    buffers, names = gradients
    fast, reference = combine_all_per_tensor(buffers, names), combine_each_tensor(buffers, names)
    assert set(fast) == set(reference)
    for n in reference:
        torch.testing.assert_close(fast[n], reference[n], rtol=1e-4, atol=1e-5)
    timings = {
        "per tensor, one at a time (reference)": lambda: combine_each_tensor(buffers, names),
        "per tensor, batched by shape": lambda: combine_all_per_tensor(buffers, names),
        "global (one alpha for the shared parameters)": lambda: combine_global(buffers, names),
    }
    timings = {label: median_ms(fn, DEVICE, reps=ROUNDS, warmup=1) for label, fn in timings.items()}
    params = sum(t.numel() for t in buffers["itc"].values())
    print(f"\nIMTL-G combination, {PRESET} FAME-ViL ({len(names)} tensors, {params / 1e6:.1f}M per task)")
    print(f"4 tasks, {device_description(DEVICE)}")
    base = next(iter(timings.values()))
    for label, ms in timings.items():
        print(f"  {label:<46} {ms:9.1f} ms  x{base / ms:5.1f}")
