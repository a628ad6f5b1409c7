"""QuickGELU (``famevil_fast.ops.quick_gelu``): eager PyTorch vs torch.compile of it vs the Triton kernels,
forward and backward separately, at the hidden activations of CLIP's MLPs in a ViT-B/16 step at batch 64
(image tower 12,608 x 3,072, text tower 4,928 x 2,048), bf16 on a GPU.

Reported per case: wall time, device time of the kernels (what a CUDA-graph replay pays), the speed-up of
each over eager, and the fraction of the card's copy bandwidth the Triton kernels reach (forward: x read, y
written; backward: x and dy read, dx written). On the CPU one small float32 case runs as a check of the
harness (Triton under TRITON_INTERPRET=1, no torch.compile), not as a measurement.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from bench_adapter import available, copy_bandwidth  # the same skip reasons and copy measurement

from famevil_fast.ops import quick_gelu
from famevil_fast.ops.activation import quick_gelu_reference

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = {"image MLP": (12608, 3072), "text MLP": (4928, 2048)} if CUDA else {"micro": (197, 96)}
IMPLS = ("eager", "compile", "triton")
DIRECTIONS = ("forward", "backward")
REPS = 20 if CUDA else 2


@functools.cache
def compiled_reference() -> Callable[[torch.Tensor], torch.Tensor]:
    """Static shapes: each shape gets kernels of its own, as the training step's compiled graph would."""
    return torch.compile(quick_gelu_reference, dynamic=False)


def activation(impl: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if impl == "triton":
        return functools.partial(quick_gelu, backend="triton")
    return compiled_reference() if impl == "compile" else quick_gelu_reference


Call = Callable[[], object]


def case(shape: tuple[int, int], impl: str, direction: str) -> tuple[Call, Call]:
    """(call, setup) of one direction: the forward of a fresh activation, or the backward of one made in
    ``setup`` (its forward untimed)."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = (3 * torch.randn(shape, device=DEVICE, generator=g)).to(DTYPE).requires_grad_()
    grad = torch.randn(shape, device=DEVICE, generator=g).to(DTYPE)
    fn = activation(impl)
    state: dict[str, torch.Tensor] = {}
    if direction == "forward":
        return (lambda: fn(x)), (lambda: None)

    def setup() -> None:
        state["y"] = fn(x)

    return (lambda: torch.autograd.grad(state["y"], x, grad)), setup


def tensors_moved(direction: str) -> int:
    """Tensors of the activation's size a fused pass reads or writes."""
    return 2 if direction == "forward" else 3


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_quick_gelu(benchmark, name: str, impl: str, direction: str) -> None:
    if reason := available(impl):
        pytest.skip(reason)
    call, setup = case(SHAPES[name], impl, direction)
    benchmark.extra_info.update({"shape": SHAPES[name], "impl": impl, "direction": direction})
    benchmark.pedantic(call, setup=setup, rounds=REPS, iterations=1, warmup_rounds=1)


def test_quick_gelu_matches_the_reference() -> None:
    """The benchmark's own check: the Triton output and gradient against eager PyTorch in the timed dtype."""
    if reason := available("triton"):
        pytest.skip(reason)
    for shape in SHAPES.values():
        x = (3 * torch.randn(shape, device=DEVICE)).to(DTYPE).requires_grad_()
        grad = torch.randn(shape, device=DEVICE).to(DTYPE)
        outs = {}
        for impl in ("eager", "triton"):
            y = activation(impl)(x)
            outs[impl] = (y, *torch.autograd.grad(y, x, grad))
        tol = 2e-2 if DTYPE != torch.float32 else 1e-5
        for got, want in zip(outs["triton"], outs["eager"]):
            torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_quick_gelu_report(median_ms, kernel_profile, device_description) -> None:
    """Every case in one process: wall and device milliseconds, speed-ups over eager, and the Triton
    kernels' share of the copy bandwidth."""
    bandwidth = copy_bandwidth()
    lines = [
        f"QuickGELU, {DTYPE}, {device_description(DEVICE)}"
        + (f", copy bandwidth {bandwidth / 1e12:.2f} TB/s" if bandwidth else ""),
        f"{'case':<10} {'direction':<9} {'impl':<8} {'wall ms':>8} {'device ms':>9} {'x eager':>8} "
        f"{'%copy bw':>8}",
    ]
    for name, shape in SHAPES.items():
        for direction in DIRECTIONS:
            rows = {}
            for impl in IMPLS:
                if available(impl) is None:
                    call, setup = case(shape, impl, direction)

                    def timed(call=call, setup=setup) -> None:
                        setup()
                        call()

                    setup_ms = median_ms(setup, DEVICE, reps=REPS) if direction == "backward" else 0.0
                    wall = median_ms(timed, DEVICE, reps=REPS) - setup_ms
                    profile = kernel_profile(call, DEVICE, setup)
                    rows[impl] = (wall, None if profile is None else profile[1])
            base = rows["eager"]
            for impl, (wall, device) in rows.items():
                speed = base[1] / device if device and base[1] else base[0] / wall
                moved = tensors_moved(direction) * shape[0] * shape[1] * torch.finfo(DTYPE).bits // 8
                share = f"{100 * moved / (device / 1e3) / bandwidth:.0f}" if bandwidth and device else "n/a"
                dev = f"{device:.3f}" if device is not None else "n/a"
                share = share if impl == "triton" else ""
                lines.append(
                    f"{name:<10} {direction:<9} {impl:<8} {wall:>8.3f} {dev:>9} {speed:>8.2f} {share:>8}"
                )
            print("\n" + "\n".join(lines), flush=True)  # each case as it is measured: a time limit
            lines = []  # that ends the part keeps the rows already printed
