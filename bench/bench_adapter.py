"""Fused adapter speed (target 3 of bench/RESULTS.md): forward and backward separately, eager PyTorch module
vs ``torch.compile`` of it vs the Triton kernels, bf16, d = 768, r in {64, 512}, at 12,608 and 1,048,576
tokens on a GPU.

``test_adapter`` times one (size, implementation, direction) with pytest-benchmark; ``test_adapter_report``
times all of them in one process and prints the table the target is judged on: milliseconds, the speed-up
over eager and over torch.compile, and the fraction of the card's copy bandwidth reached (bytes floor:
read x and write y forward; read x and dy and write dx backward). With 2 residual terms ("+res" rows)
the forward also reads them, and the eager module adds them separately. ``test_adapter_bound_report``
separates host from device time at a ViT-B/16 batch; ``test_split_adapter_breakdown_report`` lists the
kernels of the split path (r = 512) at 2^20 rows. ``test_adapter_training_dtypes_report`` times
backend="torch" against "triton" (device time, CUDA graph replay) with the dtypes of a bf16-autocast
training step: x bf16 or float32 with float32 parameters, one task a call or three tasks in one mixed-task
call (r = 64, 2 residuals), with the anchor case of bf16 x and parameters beside them, and float32 without
autocast (under autocast the kernels multiply a float32 x in bf16; without it, in float32).

On the CPU the sizes shrink to one small case, torch.compile is skipped and the Triton path runs only
under TRITON_INTERPRET=1, so ``pytest bench/bench_adapter.py --benchmark-disable`` finishes quickly; the
training-dtypes report then runs its cases at 100 rows (d = 64, r = 8) through a simulated graph capture,
untimed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import statistics
import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from famevil_fast.capture import simulated_capture
from famevil_fast.ops import fused_adapter
from famevil_fast.ops._backend import triton_runs_on

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
WIDTH = 768
# 64 rows: the GPU work is negligible, so the time is each implementation's per-call host cost
TOKENS = (64, 12_608, 1_048_576) if CUDA else (197,)
RANKS = (64, 512) if CUDA else (64,)
ROUNDS = 20 if CUDA else 1
IMPLS = ("eager", "compile", "triton")
DIRECTIONS = ("forward", "backward")


class EagerAdapter(nn.Module):
    """The adapter as plain PyTorch layers: scale * up(relu(down(layer_norm(x)))) (+ residual terms)."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.ones(1))
        with torch.no_grad():  # random, non-zero values everywhere (a zero up-projection is not timed)
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def forward(self, x: torch.Tensor, residual: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        y = self.up(torch.relu(self.down(self.ln(x)))) * self.scale
        for term in residual:
            y = y + term
        return y


class TritonAdapter(nn.Module):
    def __init__(self, eager: EagerAdapter) -> None:
        super().__init__()
        self.eager = eager

    def forward(self, x: torch.Tensor, residual: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        e = self.eager
        params = (e.ln.weight, e.ln.bias, e.down.weight, e.down.bias, e.up.weight, e.up.bias, e.scale)
        return fused_adapter(x, *params, residual=residual or None, backend="triton")


def available(impl: str) -> str | None:
    """None when ``impl`` can run here, else the reason to skip."""
    if impl == "compile" and not CUDA:
        return "torch.compile is timed on a GPU only (CPU compilation takes minutes)"
    if impl == "triton" and not triton_runs_on(DEVICE):
        return "Triton needs a GPU, or TRITON_INTERPRET=1 on the CPU"
    return None


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


@functools.cache
def adapter_module(r: int, impl: str) -> nn.Module:
    """One module per (r, implementation), shared by every size (torch.compile compiles it once)."""
    torch.manual_seed(0)
    eager = EagerAdapter(WIDTH, r).to(DEVICE, DTYPE)
    return {"eager": eager, "compile": torch.compile(eager), "triton": TritonAdapter(eager)}[impl]


def build(tokens: int, r: int, impl: str, residuals: int = 0):
    module = adapter_module(r, impl)
    x = torch.randn(tokens, WIDTH, device=DEVICE, dtype=DTYPE, requires_grad=True)
    res = tuple(torch.randn_like(x, requires_grad=False) for _ in range(residuals))
    grad = torch.randn_like(x)
    return module, x, res, grad


def step(module, x, res, grad, direction: str) -> tuple[Callable[[], object], Callable[[], None]]:
    """(setup, timed): for "forward" the timed call is the forward pass (with autograd recording, as in
    training); for "backward" setup runs the forward and the timed call is the backward pass."""
    state = {}

    def setup() -> None:
        x.grad = None
        if direction == "backward":
            state["out"] = module(x, res)
        _sync()

    def forward() -> None:
        state["out"] = module(x, res)

    def backward() -> None:
        state["out"].backward(grad)

    return setup, forward if direction == "forward" else backward


def median_seconds(setup: Callable, timed: Callable, rounds: int = ROUNDS, warmup: int = 3) -> float:
    for _ in range(warmup if CUDA else 1):
        setup()
        timed()
    times = []
    for _ in range(rounds):
        setup()
        _sync()
        start = time.perf_counter()
        timed()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth() -> float | None:
    """Bytes read + written per second by a device-to-device copy of 1 GiB (None on the CPU)."""
    if not CUDA:
        return None
    src = torch.empty(2**29, device=DEVICE, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: None, lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / seconds


def floor_bytes(tokens: int, direction: str, residuals: int) -> int:
    elem = torch.finfo(DTYPE).bits // 8
    passes = 2 + residuals if direction == "forward" else 3
    return passes * tokens * WIDTH * elem


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("tokens", TOKENS)
def test_adapter(benchmark, tokens: int, r: int, impl: str, direction: str) -> None:
    reason = available(impl)
    if reason:
        pytest.skip(reason)
    module, x, res, grad = build(tokens, r, impl)
    setup, timed = step(module, x, res, grad, direction)
    for _ in range(3 if CUDA else 0):  # compile and autotune outside the timed rounds
        setup()
        timed()
    benchmark.extra_info.update({"tokens": tokens, "r": r, "impl": impl, "direction": direction})
    benchmark.pedantic(lambda: (timed(), _sync()), setup=setup, rounds=ROUNDS, iterations=1)


def describe() -> str:
    import triton

    card = torch.cuda.get_device_name() if CUDA else "CPU"
    return f"{card}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}"


def test_adapter_report() -> None:
    """All cases in one process: the table of target 3 (bench/RESULTS.md)."""
    bandwidth = copy_bandwidth()
    lines = [f"fused adapter, d={WIDTH}, {DTYPE}, {describe()}"]
    if bandwidth:
        lines.append(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    lines.append(
        "tokens     r  res  direction   eager ms  compile ms  triton ms  x eager  x compile  %copy bw"
    )
    rows = []
    for tokens in TOKENS:
        for r in RANKS:
            for residuals in (0, 2):
                for direction in DIRECTIONS:
                    ms = {}
                    for impl in IMPLS:
                        if available(impl) is None:
                            module, x, res, grad = build(tokens, r, impl, residuals)
                            ms[impl] = 1e3 * median_seconds(*step(module, x, res, grad, direction))
                    rows.append((tokens, r, residuals, direction, ms))
                    lines.append(_format_row(tokens, r, residuals, direction, ms, bandwidth))
    if available("triton") is None:  # the timed kernels compute the eager module's result
        lines.append("triton against eager, relative error (output, input gradient):")
        errors = {
            (tokens, r, residuals): triton_error(tokens, r, residuals)
            for tokens in TOKENS
            for r in RANKS
            for residuals in (0, 2)
        }
        lines += [f"{t:>9} {r:>4} {n:>4}  {e[0]:.2e} {e[1]:.2e}" for (t, r, n), e in errors.items()]
    report = "\n".join(lines)
    print("\n" + report)
    assert all("eager" in ms for *_, ms in rows)
    if available("triton") is None:
        wrong = {case: e for case, e in errors.items() if not max(e) <= ERROR_TOL}
        assert not wrong, f"Triton adapter differs from eager (tokens, r, residuals): {wrong}"


ERROR_TOL = 0.1  # relative (Frobenius) error; bf16 rounding gives about 1e-2, a wrong tile far more


def triton_error(tokens: int, r: int, residuals: int) -> tuple[float, float]:
    """Relative error of the Triton adapter's output and input gradient against the eager module's, on the
    same inputs."""
    _, x, res, grad = build(tokens, r, "eager", residuals)
    results = []
    for impl in ("eager", "triton"):
        x.grad = None
        out = adapter_module(r, impl)(x, res)
        out.backward(grad)
        results.append((out.detach().float(), x.grad.float()))
    (y, dx), (y_t, dx_t) = results

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return float((got - want).norm() / want.norm().clamp_min(1e-30))

    return rel(y_t, y), rel(dx_t, dx)


def _format_row(
    tokens: int, r: int, residuals: int, direction: str, ms: dict, bandwidth: float | None
) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    triton_ms = ms.get("triton")
    vs_eager = ms["eager"] / triton_ms if triton_ms else None
    vs_compile = ms["compile"] / triton_ms if triton_ms and "compile" in ms else None
    fraction = None
    if triton_ms and bandwidth:
        fraction = 100 * floor_bytes(tokens, direction, residuals) / (triton_ms / 1e3) / bandwidth
    timings = f"{ms['eager']:>9.3f} {cell(ms.get('compile'), '>11.3f')} {cell(triton_ms, '>10.3f')}"
    ratios = f"{cell(vs_eager, '>8.2f')} {cell(vs_compile, '>10.2f')} {cell(fraction, '>9.1f')}"
    return f"{tokens:>9} {r:>4} {residuals:>4}  {direction:<9} {timings} {ratios}"


def test_adapter_bound_report(kernel_profile) -> None:
    """What bounds the adapter at a ViT-B/16 batch of 64 (12,608 rows): wall time against the summed time
    of the kernels it runs; the difference is host-side cost (Python, dispatch, launches)."""
    tokens = TOKENS[1] if CUDA else TOKENS[0]
    lines = [
        f"fused adapter bound, {tokens} rows, d={WIDTH}, r=64, 2 residuals, {DTYPE}, {describe()}",
        "impl     direction   wall ms  kernels  kernel ms  host share",
    ]
    for impl in ("eager", "triton"):
        if available(impl) is not None:
            continue
        for direction in DIRECTIONS:
            module, x, res, grad = build(tokens, 64, impl, 2)
            setup, timed = step(module, x, res, grad, direction)
            wall = 1e3 * median_seconds(setup, timed)
            profile = kernel_profile(timed, DEVICE, setup)
            if profile is None:
                lines.append(f"{impl:<8} {direction:<9} {wall:>9.3f}  (no device profile)")
                continue
            count, kernel_ms = profile
            share = max(0.0, 1 - kernel_ms / wall)
            lines.append(
                f"{impl:<8} {direction:<9} {wall:>9.3f} {count:>8} {kernel_ms:>10.3f} {share:>10.0%}"
            )
    print("\n" + "\n".join(lines))


def test_split_adapter_breakdown_report(kernel_breakdown) -> None:
    """Where the split adapter's time goes (r = 512: the bottleneck passes through memory) at 2^20 rows on a
    GPU: the kernels of each direction by device time, Triton path and eager PyTorch."""
    tokens, r = (TOKENS[-1], RANKS[-1]) if CUDA else (TOKENS[0], 160)
    lines = [f"split adapter kernels, {tokens} rows, d={WIDTH}, r={r}, {DTYPE}, {describe()}"]
    for impl in ("eager", "triton"):
        if available(impl) is not None:
            continue
        for direction in DIRECTIONS:
            module, x, res, grad = build(tokens, r, impl)
            setup, timed = step(module, x, res, grad, direction)
            median_seconds(setup, timed, rounds=1)  # compile and warm up outside the profile
            ranked = kernel_breakdown(timed, DEVICE, setup, top=6)
            if ranked is None:
                lines.append(f"{impl:<8} {direction:<9} (no device profile)")
                continue
            total = sum(ms for _, _, ms in ranked)
            lines.append(f"{impl:<8} {direction:<9} top kernels {total:.3f} ms")
            lines += [f"    {ms:8.3f} ms {calls:>3}x  {name}" for name, calls, ms in ranked]
    print("\n" + "\n".join(lines))


# ---------------------------------------------------------------------------------------------------
# The dtypes of a training step under bf16 autocast: float32 master parameters, x bf16 (a branch output) or
# float32 (the residual stream), one task's adapter or three tasks' in one mixed-task call

BF16, F32 = torch.bfloat16, torch.float32
TRAIN_D, TRAIN_R = (WIDTH, 64) if CUDA else (64, 8)
ONE_TASK = (12_608,) if CUDA else (100,)  # rows of each task, in contiguous blocks (per-sample layout)
THREE_TASKS = (12_608, 25_216, 25_216) if CUDA else (20, 40, 40)
TRAIN_DIRECTIONS = ("forward", "fwd+bwd")
# At the CPU's 100 rows and r = 8 one ReLU that bf16 rounding flips moves a bias gradient by ~10% (cases 5
# and 7 under TRITON_INTERPRET: 0.125-0.128, the PyTorch side farther from float64); at the GPU's sizes it
# averages out.
TRAINING_ERROR_TOL = ERROR_TOL if CUDA else 0.5


@dataclasses.dataclass(frozen=True)
class DtypeCase:
    """One adapter call of the training step: x's and the parameters' dtype, autocast, rows per task."""

    x_dtype: torch.dtype
    param_dtype: torch.dtype
    autocast: bool
    segments: tuple[int, ...]  # one entry: a single-task call; more: a mixed-task call with task ids

    @property
    def rows(self) -> int:
        return sum(self.segments)

    @property
    def mixed(self) -> bool:
        return len(self.segments) > 1


# the first: the anchor; the last: float32 kernels without autocast (products in float32)
DTYPE_MIXES = ((BF16, BF16, False), (BF16, F32, True), (F32, F32, True), (F32, F32, False))
TRAINING_CASES = tuple(DtypeCase(*mix, seg) for seg in (ONE_TASK, THREE_TASKS) for mix in DTYPE_MIXES)


@dataclasses.dataclass
class TrainingInputs:
    x: torch.Tensor
    params: tuple[torch.Tensor, ...]  # AdapterParams order, each with a leading task dim when mixed
    residual: tuple[torch.Tensor, ...]
    task_ids: torch.Tensor | None
    grads: dict[torch.dtype, torch.Tensor]  # the output's gradient, in either dtype the output may have

    def leaves(self) -> tuple[torch.Tensor, ...]:
        return (self.x, *self.params)


def training_inputs(case: DtypeCase) -> TrainingInputs:
    """Random inputs of ``case`` (seeded: both backends get the same values). The residual terms are the
    block's stream (x's dtype) and its MLP branch (bf16 under autocast), as ``fused_adapter`` takes them."""
    torch.manual_seed(0)
    d, r, lead = TRAIN_D, TRAIN_R, (len(case.segments),) if case.mixed else ()
    shapes = ((d,), (d,), (r, d), (r,), (d, r), (d,), (1,))
    means, stds = (1, 0, 0, 0, 0, 0, 1), (0.1, 0.1, d**-0.5, 0.1, r**-0.5, 0.1, 0.1)
    params = tuple(
        (m + s * torch.randn(*lead, *shape, device=DEVICE)).to(case.param_dtype).requires_grad_()
        for shape, m, s in zip(shapes, means, stds)
    )
    x = torch.randn(case.rows, d, device=DEVICE, dtype=case.x_dtype, requires_grad=True)
    branch_dtype = BF16 if case.autocast else case.x_dtype
    residual = (torch.randn_like(x), torch.randn(case.rows, d, device=DEVICE, dtype=branch_dtype))
    task_ids = None
    if case.mixed:
        blocks = [torch.full((n,), k, device=DEVICE) for k, n in enumerate(case.segments)]
        task_ids = torch.cat(blocks)
    grad = torch.randn(case.rows, d, device=DEVICE)
    return TrainingInputs(x, params, residual, task_ids, {BF16: grad.to(BF16), F32: grad})


def training_call(case: DtypeCase, backend: str, inp: TrainingInputs) -> torch.Tensor:
    """The adapter as the training step runs it: Triton mixed-task calls take the task ids; the PyTorch path
    runs each task's adapter on its contiguous rows (``TaskAdapters._per_segment``, no read-back)."""
    if not case.mixed or backend == "triton":
        kwargs = {"task_ids": inp.task_ids, "check_task_ids": False} if case.mixed else {}
        return fused_adapter(inp.x, *inp.params, residual=inp.residual, backend=backend, **kwargs)
    outs, start = [], 0
    for task, n in enumerate(case.segments):
        rows = slice(start, start + n)
        params = [p[task] for p in inp.params]
        outs.append(
            fused_adapter(inp.x[rows], *params, residual=[t[rows] for t in inp.residual], backend=backend)
        )
        start += n
    return torch.cat(outs)


def training_step(case: DtypeCase, backend: str, inp: TrainingInputs, direction: str) -> Callable:
    """One call (gradients cleared first, so that a replay writes them afresh); returns the output."""

    def run() -> torch.Tensor:
        for t in inp.leaves():
            t.grad = None
        autocast = torch.autocast(DEVICE.type, dtype=BF16, cache_enabled=False)
        with autocast if case.autocast else contextlib.nullcontext():
            out = training_call(case, backend, inp)
        if direction == "fwd+bwd":
            out.backward(inp.grads[out.dtype])
        return out

    return run


def graph_replay_ms(run: Callable, median_ms: Callable) -> float:
    """Device milliseconds of ``run`` captured as a CUDA graph (warmed up, Triton autotuned, on a side
    stream first), the median of replays timed with CUDA events: no host cost is left in it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return median_ms(graph.replay, DEVICE, reps=ROUNDS, warmup=2)


def device_ms(run: Callable, median_ms: Callable) -> float | None:
    """Graph-replay time on a GPU; on the CPU no time (None), but ``run`` goes through a simulated capture,
    which fails at any call a real capture would reject."""
    if CUDA:
        return graph_replay_ms(run, median_ms)
    with simulated_capture():
        run()
    return None


def training_errors(case: DtypeCase) -> tuple[float, float]:
    """Relative error of the Triton adapter against the PyTorch one on the same inputs: (output, gradients
    of x and of every parameter, the largest)."""
    inp = training_inputs(case)
    results = []
    for backend in ("torch", "triton"):
        out = training_step(case, backend, inp, "fwd+bwd")()
        results.append([out.detach()] + [t.grad for t in inp.leaves()])

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        got, want = got.float(), want.float()
        return float((got - want).norm() / want.norm().clamp_min(1e-30))

    errors = [rel(got, want) for got, want in zip(*reversed(results))]
    return errors[0], max(errors[1:])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _training_row(number: int, case: DtypeCase, direction: str, ms: dict, error: float | None) -> str:
    def cell(value: float | None, width: int, spec: str) -> str:
        return format(value, f">{width}{spec}") if value is not None else "-".rjust(width)

    torch_ms, triton_ms = ms.get("torch"), ms.get("triton")
    ratio = triton_ms / torch_ms if torch_ms and triton_ms else None
    autocast = "bf16" if case.autocast else "no"
    dtypes = f"{_dtype_name(case.x_dtype):<9} {_dtype_name(case.param_dtype):<9} {autocast:<8}"
    timings = f"{cell(torch_ms, 9, '.3f')} {cell(triton_ms, 9, '.3f')} {cell(ratio, 8, '.2f')}"
    return (
        f"{number:>4} {case.rows:>7} {len(case.segments):>5}  {dtypes} {direction:<9} {timings}"
        f" {cell(error, 9, '.2e')}"
    )


def timed(run: Callable, median_ms: Callable, label: str, notes: list[str]) -> float | None:
    """``device_ms``; on a GPU a call that fails (e.g. cannot be captured) is noted, not raised, so that the
    other cases still print. On the CPU it raises: the harness check must fail."""
    try:
        return device_ms(run, median_ms)
    except Exception as error:
        if not CUDA:
            raise
        notes.append(f"{label}: {type(error).__name__}: {str(error)[:300]}")
        return None


def training_case_rows(number: int, case: DtypeCase, median_ms: Callable, notes: list[str]) -> tuple:
    """The two table rows of ``case`` (forward, forward + backward) and its errors (None without Triton)."""
    backends = [b for b in ("torch", "triton") if b == "torch" or available(b) is None]
    errors = training_errors(case) if "triton" in backends else None
    lines = []
    for i, direction in enumerate(TRAIN_DIRECTIONS):
        ms = {}
        for backend in backends:
            run = training_step(case, backend, training_inputs(case), direction)
            ms[backend] = timed(run, median_ms, f"case {number} {backend} {direction}", notes)
        lines.append(_training_row(number, case, direction, ms, errors[i] if errors else None))
    return lines, errors


def test_adapter_training_dtypes_report(median_ms) -> None:
    """The adapter with the dtypes of a bf16-autocast training step (float32 parameters; x bf16 or float32)
    and in mixed-task calls of 3 tasks: device time (CUDA graph replay) of backend="torch" against "triton",
    to tell which configuration makes the kernels slow. Rel err: Triton against PyTorch, the output on the
    forward row, the largest of the gradients (x, parameters) on the fwd+bwd row. Rows print as they are
    measured (a run cut short still shows the cases done)."""
    header = [
        f"fused adapter, training dtypes, d={TRAIN_D}, r={TRAIN_R}, 2 residuals, {describe()}",
        "device ms: CUDA graph replay" if CUDA else "(GPU only: device times; here a harness check)",
        "case    rows tasks  x dtype   params    autocast direction  torch ms triton ms  tri/tor   rel err",
    ]
    print("\n" + "\n".join(header), flush=True)
    failed, notes = {}, []
    for number, case in enumerate(TRAINING_CASES, 1):
        rows, errors = training_case_rows(number, case, median_ms, notes)
        print("\n".join(rows), flush=True)
        if errors is not None and not max(errors) <= TRAINING_ERROR_TOL:
            failed[number] = errors
    for note in notes:
        print(f"not timed: {note}")
    assert not failed, f"Triton adapter differs from PyTorch (case: output, gradient error): {failed}"
    assert not notes, f"{len(notes)} measurements failed (listed above)"
