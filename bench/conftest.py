"""Shared benchmark helpers, offered as fixtures: ``median_ms`` (CUDA events or perf_counter, median of
repeats), ``extra_peak_bytes`` (peak memory beyond what was allocated before), ``kernel_profile`` (kernels
and their device time), ``kernel_breakdown`` (the kernels taking the most device time),
``device_description`` (card, versions, date) and ``ratio_table`` (baseline-vs-fast rows printed at the
end of the session).

Set ``BENCH_TABLE_OUT=path.md`` to also append the ratio tables to a markdown file (for bench/RESULTS.md).
"""

from __future__ import annotations

import datetime
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

# ---------------------------------------------------------------------------------------------------
# Device and versions


def device_description(device: torch.device) -> str:
    """Card (or CPU) name, torch and triton versions and the date: what every recorded number carries."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() + f", {torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return f"{name}; torch {torch.__version__}; triton {triton_version}; {datetime.date.today().isoformat()}"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"model name\s*:\s*(.+)", f.read())
        return match.group(1).strip() if match else "CPU"
    except OSError:
        return "CPU"


# ---------------------------------------------------------------------------------------------------
# Timing and memory


def median_ms(fn: Callable[[], object], device: torch.device, reps: int = 20, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds; CUDA events around each call on a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _device_kernels(
    fn: Callable[[], object], device: torch.device, setup: Callable[[], object]
) -> list | None:
    """The device-kernel events of one profiled call of ``fn`` (after one unprofiled call), or None on the
    CPU or when the profiler cannot run."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        setup()
        fn()
        setup()
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    except Exception as error:  # a profiler that cannot run must not stop the benchmark
        print(f"kernel profile unavailable: {type(error).__name__}: {error}")
        return None


def kernel_profile(
    fn: Callable[[], object], device: torch.device, setup: Callable[[], object] = lambda: None
) -> tuple[int, float] | None:
    """(kernels one call of ``fn`` runs, their summed device time in ms), from torch.profiler: what separates
    host-side cost (wall time minus kernel time) from device work. ``setup`` runs before each call, outside
    the profile. None on the CPU or when the profiler cannot attribute device time."""
    kernels = _device_kernels(fn, device, setup)
    if kernels is None:
        return None
    return len(kernels), sum(e.time_range.elapsed_us() for e in kernels) / 1e3


def kernel_breakdown(
    fn: Callable[[], object], device: torch.device, setup: Callable[[], object] = lambda: None, top: int = 8
) -> list[tuple[str, int, float]] | None:
    """The ``top`` kernels (0: all) of one call of ``fn`` by summed device time: (name, launches, ms), names
    cut to 70 characters. None where ``kernel_profile`` gives None."""
    kernels = _device_kernels(fn, device, setup)
    if kernels is None:
        return None
    totals: dict[str, tuple[int, float]] = {}
    for e in kernels:
        calls, us = totals.get(e.name, (0, 0.0))
        totals[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[: top or None]
    return [(name[:70], calls, us / 1e3) for name, (calls, us) in ranked]


def _rss_status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def extra_peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory ``fn`` needs beyond what is allocated before it runs (None when it cannot be measured).

    GPU: the caching allocator's peak. CPU: growth of the peak resident set, reset via /proc/self/clear_refs.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss_status("VmRSS")
        fn()
        return _rss_status("VmHWM") - base
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------------
# Ratio tables


@dataclass
class RatioRow:
    case: str
    baseline: str
    baseline_ms: float | None
    fast_ms: float
    baseline_bytes: int | None
    fast_bytes: int | None

    @property
    def ratio(self) -> float | None:
        return None if self.baseline_ms is None else self.baseline_ms / self.fast_ms


@dataclass
class RatioTable:
    title: str
    device: str
    rows: list[RatioRow] = field(default_factory=list)

    def add(
        self,
        case: str,
        baseline: str,
        baseline_ms: float | None,
        fast_ms: float,
        baseline_bytes: int | None = None,
        fast_bytes: int | None = None,
    ) -> None:
        """One comparison; ``None`` times mean the baseline did not run (out of memory)."""
        self.rows.append(RatioRow(case, baseline, baseline_ms, fast_ms, baseline_bytes, fast_bytes))

    def markdown(self) -> str:
        def ms(v):
            return "OOM" if v is None else f"{v:.2f}"

        def mib(v):
            return "n/a" if v is None else f"{v / 2**20:.1f}"

        lines = [
            f"### {self.title}",
            f"({self.device})",
            "",
            "| case | baseline | baseline ms | fast ms | speed-up | baseline extra MiB | fast extra MiB |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            ratio = "n/a" if r.ratio is None else f"{r.ratio:.2f}x"
            lines.append(
                f"| {r.case} | {r.baseline} | {ms(r.baseline_ms)} | {ms(r.fast_ms)} | {ratio} | "
                f"{mib(r.baseline_bytes)} | {mib(r.fast_bytes)} |"
            )
        return "\n".join(lines)


_TABLES: dict[str, RatioTable] = {}


@pytest.fixture(scope="session", name="median_ms")
def median_ms_fixture() -> Callable[..., float]:
    return median_ms


@pytest.fixture(scope="session", name="kernel_profile")
def kernel_profile_fixture() -> Callable[..., tuple[int, float] | None]:
    return kernel_profile


@pytest.fixture(scope="session", name="kernel_breakdown")
def kernel_breakdown_fixture() -> Callable[..., list[tuple[str, int, float]] | None]:
    return kernel_breakdown


@pytest.fixture(scope="session", name="extra_peak_bytes")
def extra_peak_bytes_fixture() -> Callable[..., int | None]:
    return extra_peak_bytes


@pytest.fixture(scope="session", name="device_description")
def device_description_fixture() -> Callable[[torch.device], str]:
    return device_description


@pytest.fixture(scope="session")
def ratio_table() -> Callable[[str, torch.device], RatioTable]:
    """``ratio_table(title, device)`` returns the session's table of that title (created on first use)."""

    def get(title: str, device: torch.device) -> RatioTable:
        if title not in _TABLES:
            _TABLES[title] = RatioTable(title, device_description(device))
        return _TABLES[title]

    return get


def pytest_terminal_summary(terminalreporter):
    tables = [t for t in _TABLES.values() if t.rows]
    if not tables:
        return
    text = "\n\n".join(t.markdown() for t in tables)
    terminalreporter.write_sep("=", "baseline vs fast")
    terminalreporter.write_line(text)
    out = os.environ.get("BENCH_TABLE_OUT")
    if out:
        with open(out, "a") as f:
            f.write(text + "\n\n")
