"""Contrastive loss, forward + backward: the naive PyTorch loss (logits materialised) and open_clip's
ClipLoss against the fused backends (the CUDA kernel; the Triton log-sum-exp kernels with cuBLAS
products), time and extra peak memory, in one process on the same inputs.

GPU: 4,096 / 16,384 / 65,536 rows, D = 512, bfloat16 (BENCH_HUGE=1 adds one run at 1,048,576 rows).
CPU: 8,192 rows, D = 512, float32 (1,024 rows under --benchmark-disable, to stay quick).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from famevil_fast.ops import contrastive as C
from famevil_fast.ops.contrastive import contrastive_loss

GPU_ROWS = (4096, 16384, 65536)
GPU_TABLE = "contrastive loss fwd+bwd, D=512, bf16 (GPU)"
GPU_TRITON_TABLE = "contrastive loss fwd+bwd, D=512, bf16 (GPU), Triton backend"
DIM = 512
SCALE = 10.0
BF16_PEAK_TFLOPS = 790.0  # H100 / H200 dense bf16 (the figure bench_train_step uses for MFU)


def naive_loss(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Logits in the input dtype, cross-entropy both ways in float32."""
    logits = (s * (a @ b.T)).float()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def open_clip_loss(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    from open_clip.loss import ClipLoss

    return ClipLoss()(a, b, logit_scale=s)


def gpu_baselines() -> dict:
    """The naive loss, and open_clip's ClipLoss where open_clip is importable (the rows say which ran)."""
    baselines = {"naive": naive_loss}
    if importlib.util.find_spec("open_clip") is not None:
        baselines["open_clip ClipLoss"] = open_clip_loss
    return baselines


def _inputs(rows: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device=device).manual_seed(0)
    a = F.normalize(torch.randn(rows, DIM, device=device, generator=g), dim=1).to(dtype).requires_grad_()
    b = F.normalize(torch.randn(rows, DIM, device=device, generator=g), dim=1).to(dtype).requires_grad_()
    s = torch.tensor(SCALE, device=device, requires_grad=True)
    return a, b, s


def _step(loss_fn, a, b, s):
    def run():
        a.grad = b.grad = s.grad = None
        loss = loss_fn(a, b, s)
        loss.backward()
        run.loss = loss.detach()

    return run


LOSS_RTOL, GRAD_RTOL = 1e-2, 5e-2  # bf16 logits against float32 sums; the gradients are bf16


def _result(run, inputs) -> tuple[float, list[torch.Tensor]]:
    """The loss and the input gradients of ``run``'s last call (on the host: no device memory held)."""
    return float(run.loss), [t.grad.detach().to("cpu", torch.float32, copy=True) for t in inputs[:2]]


def _disagreement(want, got) -> str | None:
    """None when loss and gradients agree within bf16 tolerance, else what differs."""
    (loss_w, grads_w), (loss_g, grads_g) = want, got
    if not abs(loss_g - loss_w) <= LOSS_RTOL * max(1.0, abs(loss_w)):
        return f"loss {loss_g:.5g} != {loss_w:.5g}"
    for name, w, g in zip("ab", grads_w, grads_g):
        err = float((g - w).norm() / w.norm().clamp_min(1e-30))
        if not err <= GRAD_RTOL:
            return f"grad {name}: relative error {err:.3g}"
    return None


class _Meter:
    """Times and measures one step function with the session's helpers."""

    def __init__(self, benchmark, median_ms, extra_peak_bytes, device, reps, warmup):
        self.benchmark, self.median_ms, self.extra_peak_bytes = benchmark, median_ms, extra_peak_bytes
        self.device, self.reps, self.warmup = device, reps, warmup

    def measure(self, run):
        """(median ms, extra peak bytes), or (None, None) when the run does not fit in memory."""
        try:
            ms = self.median_ms(run, self.device, reps=self.reps, warmup=self.warmup)
            return ms, self.extra_peak_bytes(run, self.device)
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            return None, None

    def compare(self, table, case, inputs, fast_fn, baselines):
        """Times each baseline against the fused loss, and checks that every one that ran gives the fused
        loss's value and input gradients."""
        fast = _step(fast_fn, *inputs)
        self.benchmark(fast)
        fast_ms, fast_bytes = self.measure(fast)
        assert fast_ms is not None, f"{case}: the fused loss ran out of memory"
        want, wrong = _result(fast, inputs), []
        for name, fn in baselines.items():
            run = _step(fn, *inputs)
            base_ms, base_bytes = self.measure(run)
            table.add(case, name, base_ms, fast_ms, base_bytes, fast_bytes)
            if base_ms is not None and (problem := _disagreement(want, _result(run, inputs))):
                wrong.append(f"{name}: {problem}")
        assert not wrong, f"{case}: the fused loss and its baselines disagree: {wrong}"


def _gpu_available() -> bool:
    return torch.cuda.is_available() and C.unavailable_reason("cuda", torch.device("cuda")) is None


@pytest.mark.skipif(not _gpu_available(), reason="needs a CUDA device and the CUDA build")
@pytest.mark.parametrize("rows", GPU_ROWS)
def test_contrastive_gpu_bf16(benchmark, ratio_table, median_ms, extra_peak_bytes, rows):
    device = torch.device("cuda")
    table = ratio_table(GPU_TABLE, device)
    meter = _Meter(benchmark, median_ms, extra_peak_bytes, device, reps=20, warmup=3)
    fused = lambda a, b, s: contrastive_loss(a, b, s, backend="cuda")
    meter.compare(table, f"{rows} rows", _inputs(rows, torch.bfloat16, device), fused, gpu_baselines())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rows", GPU_ROWS)
def test_contrastive_gpu_bf16_triton(benchmark, ratio_table, median_ms, extra_peak_bytes, rows):
    """The Triton backend (log-sum-exp kernels + cuBLAS products) against the same baselines and the CUDA
    kernel."""
    device = torch.device("cuda")
    table = ratio_table(GPU_TRITON_TABLE, device)
    meter = _Meter(benchmark, median_ms, extra_peak_bytes, device, reps=20, warmup=3)
    fused = lambda a, b, s: contrastive_loss(a, b, s, backend="triton")
    baselines = gpu_baselines()
    if _gpu_available():
        baselines["CUDA kernel"] = lambda a, b, s: contrastive_loss(a, b, s, backend="cuda")
    baselines["Triton, two sweeps"] = _two_sweep_triton
    baselines["Triton, autograd terms"] = _autograd_terms_triton
    baselines["Triton, library logits"] = _library_logits_triton
    meter.compare(table, f"{rows} rows", _inputs(rows, torch.bfloat16, device), fused, baselines)


def _autograd_terms_triton(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Triton loss composed of the log-sum-exp node and autograd over the positive terms, instead of
    one node whose gradient tiles hold the target terms."""
    from famevil_fast.ops import contrastive_triton

    contrastive_triton.TARGETS_IN_KERNEL = False
    try:
        return contrastive_loss(a, b, s, backend="triton")
    finally:
        contrastive_triton.TARGETS_IN_KERNEL = True


def _library_logits_triton(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Triton loss whose forward sweep reads dot products that the library GEMM wrote, a chunk of rows
    at a time (``configs.CONTRASTIVE_LIBRARY_LOGITS``)."""
    from famevil_fast.kernels import configs

    previous = configs.CONTRASTIVE_LIBRARY_LOGITS
    configs.CONTRASTIVE_LIBRARY_LOGITS = True
    try:
        return contrastive_loss(a, b, s, backend="triton")
    finally:
        configs.CONTRASTIVE_LIBRARY_LOGITS = previous


def _two_sweep_triton(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Triton loss with the column statistics from a second sweep instead of per-block partials."""
    from famevil_fast.kernels import configs

    budget = configs.CONTRASTIVE_COL_PARTIAL_BYTES
    configs.CONTRASTIVE_COL_PARTIAL_BYTES = 0
    try:
        return contrastive_loss(a, b, s, backend="triton")
    finally:
        configs.CONTRASTIVE_COL_PARTIAL_BYTES = budget


@pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("BENCH_HUGE") != "1", reason="BENCH_HUGE=1 on a GPU"
)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_contrastive_gpu_million_rows(ratio_table, median_ms, extra_peak_bytes, backend):
    if backend == "cuda" and not _gpu_available():
        pytest.skip("the extension was built without CUDA")
    device = torch.device("cuda")
    meter = _Meter(None, median_ms, extra_peak_bytes, device, reps=1, warmup=1)
    a, b, s = _inputs(1 << 20, torch.bfloat16, device)
    ms, extra = meter.measure(_step(lambda a, b, s: contrastive_loss(a, b, s, backend=backend), a, b, s))
    assert ms is not None and torch.isfinite(a.grad).all()
    table = ratio_table(GPU_TABLE if backend == "cuda" else GPU_TRITON_TABLE, device)
    table.add(f"{1 << 20} rows", "naive (does not fit)", None, ms, None, extra)


@pytest.mark.skipif(
    C.unavailable_reason("cpu", torch.device("cpu")) is not None, reason="extension not built"
)
def test_contrastive_cpu_fp32(benchmark, ratio_table, median_ms, extra_peak_bytes):
    device = torch.device("cpu")
    quick = benchmark.disabled
    rows = 1024 if quick else 8192
    table = ratio_table("contrastive loss fwd+bwd, D=512, fp32 (CPU)", device)
    meter = _Meter(
        benchmark, median_ms, extra_peak_bytes, device, reps=1 if quick else 3, warmup=int(not quick)
    )
    fused = lambda a, b, s: contrastive_loss(a, b, s, backend="cpu")
    meter.compare(table, f"{rows} rows", _inputs(rows, torch.float32, device), fused, {"naive": naive_loss})


BOUND_ROWS = (4096, 16384) if torch.cuda.is_available() else (256,)


def _bound_losses(device: torch.device) -> dict:
    """The losses the bound report compares on ``device``: the plain one and every fused backend there."""
    losses = {"naive": naive_loss}
    for backend in ("triton", "cuda") if device.type == "cuda" else ("cpu",):
        if C.unavailable_reason(backend, device) is None:
            losses[backend] = lambda a, b, s, backend=backend: contrastive_loss(a, b, s, backend=backend)
    if "triton" in losses:
        losses["tri-ag"] = _autograd_terms_triton  # the Triton loss with autograd over the linear terms
        losses["tri-lib"] = _library_logits_triton  # its forward over library-GEMM dot products
    return losses


def test_contrastive_bound_report(median_ms, kernel_breakdown, device_description):
    """What bounds each loss: wall time against the summed time of its kernels (the difference is host-side
    cost), the products' FLOP floor at the card's bf16 peak, and the kernels that take the device time.
    On the CPU: a check that the report runs (no device profile, float32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines = [
        f"contrastive loss bound, fwd+bwd, D={DIM}, {dtype}, {device_description(device)}",
        "rows    loss     wall ms  kernels  kernel ms  host share  floor ms",
    ]
    for rows in BOUND_ROWS:
        inputs = _inputs(rows, dtype, device)
        floor_ms = 4 * 2 * rows * rows * DIM / (BF16_PEAK_TFLOPS * 1e12) * 1e3  # fwd + 3 bwd products
        for name, fn in _bound_losses(device).items():
            run = _step(fn, *inputs)
            wall = median_ms(run, device, reps=10, warmup=2)
            kernels = kernel_breakdown(run, device, top=0)  # one profiled call: totals and top kernels
            count = sum(calls for _, calls, _ in kernels or [])
            kernel_ms = sum(ms for _, _, ms in kernels) if kernels is not None else float("nan")
            share = f"{max(0.0, 1 - kernel_ms / wall):.0%}" if kernels is not None else "-"
            timing = f"{wall:>8.3f} {count:>8} {kernel_ms:>10.3f} {share:>11}"
            lines.append(f"{rows:<7} {name:<7} {timing} {floor_ms:>9.3f}")
            if rows == BOUND_ROWS[-1] and name != "naive":
                top = (kernels or [])[:6]
                lines += [f"    {ms:>8.3f} ms {calls:>5}x  {kernel}" for kernel, calls, ms in top]
            assert inputs[0].grad is not None and torch.isfinite(inputs[0].grad).all()
        del inputs
    print("\n" + "\n".join(lines))


def test_gpu_baselines_leave_out_open_clip_where_it_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "open_clip" else real(name))
    assert list(gpu_baselines()) == ["naive"]


def test_disagreement_sees_a_wrong_loss_or_gradient():
    grads = [torch.ones(4, 2), torch.full((4, 2), -1.0)]
    assert _disagreement((8.3, grads), (8.31, [g * 1.01 for g in grads])) is None
    assert _disagreement((8.3, grads), (8.6, grads)).startswith("loss")
    assert _disagreement((8.3, grads), (8.3, [grads[0], 2 * grads[1]])).startswith("grad b")
