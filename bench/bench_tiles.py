"""Tile sweep for the Triton kernels: the device time of each launch configuration a kernel could use.

``kernels.configs`` fixes one configuration (tile sizes, warps, pipeline stages) per kernel, and how many
programs per multiprocessor the split reductions aim at. This report runs each op with every candidate of
its setting in turn, checks that the result matches the current configuration's, and prints the device
time (CUDA-graph replays, so the host's launch cost is out of the figure) and the ratio to the current
choice. It is the measurement behind the choices in ``configs``;
rerun it on a new card before changing them:

    pytest -q -s bench/bench_tiles.py

On the CPU (TRITON_INTERPRET=1) it runs one or two candidates of each setting on small shapes: a check of the
sweep itself and of the candidates' masking, not a timing. ``TILE_SWEEP=split`` (any part of the family
names, comma-separated) narrows a run to some families.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from famevil_fast.ops._backend import triton_runs_on

if not triton_runs_on(torch.device("cuda" if torch.cuda.is_available() else "cpu")):
    pytest.skip("Triton needs a GPU, or TRITON_INTERPRET=1 on the CPU", allow_module_level=True)

from famevil_fast.kernels import configs, launch  # noqa: E402
from famevil_fast.kernels.configs import Tiles  # noqa: E402
from famevil_fast.kernels.contrastive_ops import (  # noqa: E402
    LossTargets,
    launch_lse_backward,
    launch_two_way_lse,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
WIDTH, BOTTLENECK, FEATURES = (768, 64, 512) if CUDA else (96, 24, 40)
SPLIT_BOTTLENECK = 512 if CUDA else 136  # r > 128: the adapter's split path (bottleneck through memory)
ADAPTER_ROWS = (12_608, 1 << 20) if CUDA else (37,)
SPLIT_ROWS = (1 << 20,) if CUDA else (37,)
CONTRASTIVE_ROWS = (4_096, 16_384) if CUDA else (45,)
REPS = 20

# Candidates: Tiles(block_m, block_n, block_k, num_warps, num_stages). The launcher's own choice is measured
# first, as "current"; where a choice was changed, the first candidate is the one it replaced.
FUSED_FORWARD = [
    Tiles(64, 64, 64, 4, 2),
    Tiles(32, 128, 128, 4, 2),
    Tiles(64, 128, 64, 8, 2),
    Tiles(32, 64, 64, 4, 2),
]
DP = [  # no candidate moved the whole backward by more than 4% on an H200 (12,608 and 2^20 rows)
    Tiles(128, 64, 64, 8, 3),
]
DX_WEIGHTS = [  # the current 64x64, 4 warps, spills 176 bytes a thread (ptxas, sm_90); 32x64 does not
    Tiles(64, 64, 1, 8, 2),
    Tiles(64, 128, 1, 8, 2),
    Tiles(128, 64, 1, 8, 2),
    Tiles(32, 128, 1, 4, 2),
    Tiles(32, 64, 1, 4, 2),
    Tiles(32, 64, 1, 4, 3),
    Tiles(32, 64, 1, 4, 2, maxnreg=168),  # three programs per multiprocessor instead of two; spills 136 B
    Tiles(32, 32, 1, 4, 2, maxnreg=128),  # four; spills 168 B
]
# the split path's four GEMM-shaped kernels (all 64 x 128 x 64, 4 warps, 3 stages, except dx's K chunk)
SPLIT_LN_DOWN = [Tiles(128, 128, 64, 8, 3), Tiles(128, 64, 64, 4, 3), Tiles(64, 256, 64, 8, 3)]
SPLIT_UP = [Tiles(128, 128, 64, 8, 3), Tiles(128, 256, 64, 8, 3), Tiles(64, 128, 64, 4, 4)]
SPLIT_DP = [Tiles(128, 128, 64, 8, 3), Tiles(128, 64, 64, 8, 3)]
SPLIT_DX = [Tiles(128, 128, 64, 8, 3), Tiles(64, 256, 64, 8, 3)]
REDUCTION_PROGRAMS = [4, 8]  # configs.REDUCTION_PROGRAMS_PER_SM is 2 (segments stay <= 64)
SPAN_PROGRAMS = [2, 8]  # configs.CONTRASTIVE_PROGRAMS_PER_SM is 4
LIBRARY_LOGITS = [True]  # configs.CONTRASTIVE_LIBRARY_LOGITS is False (dot products inside the sweep)
LOGITS_SWEEP = [Tiles(64, 64, 1, 4, 2), Tiles(32, 128, 1, 4, 2), Tiles(128, 64, 1, 8, 2)]
COLUMN_SCALE = [True]  # configs.CONTRASTIVE_SHARED_COLUMN_SCALE is False (each column its own maximum)
ONE_PASS_LN = [True]  # configs.ADAPTER_ONE_PASS_LN is False (a statistics pass before the down projection)
# a decoding step's few rows (configs.has_few_rows): the text tower's LN + QKV projection, 512 -> 1536,
# float32; the choice is 16x32x64, 4 warps, 2 stages; the last candidate is the tiles of many rows
DECODE_ROWS = (64, 192) if CUDA else (5,)
FEW_ROWS = [
    Tiles(16, 64, 64, 4, 2),
    Tiles(32, 32, 64, 4, 2),
    Tiles(16, 32, 128, 2, 2),
    Tiles(64, 128, 64, 4, 3),
]
# the decoding step's task adapter with the MLP's second layer (d = 512, r = 64, fc2 from 2048, float32):
# its columns spread over programs (configs.adapter_columns_tiles is 16x32x64, 4 warps, 2 stages), or, with
# ADAPTER_FEW_ROWS_COLUMNS off, the fused kernel after a separate fc2 product
DECODE_ADAPTER = [Tiles(16, 64, 64, 4, 2), Tiles(16, 16, 64, 2, 2), Tiles(32, 32, 64, 4, 2)]
FEW_ROWS_COLUMNS = [False]
# the decoding step's cross-attention query side (LN + query projection + attention over a ViT-B/16 memory
# of 197 positions, width 512, 8 heads, float32); the choice is 32 positions x 64 wide chunks, 4 warps
DECODE_CROSS = [Tiles(64, 64, 64, 4, 2), Tiles(32, 64, 32, 2, 2), Tiles(32, 64, 128, 8, 2)]
GRAD_BLOCK_BYTES = [512 * 2**20]  # configs.CONTRASTIVE_GRAD_CHUNK_BYTES is 256 MiB (two blocks at 16,384)
CONTRASTIVE = [
    Tiles(128, 128, 64, 8, 3),
    Tiles(64, 128, 64, 4, 4),
    Tiles(128, 256, 64, 8, 3),
]
LOSS_GRAD = [  # configs.contrastive_loss_grad_tiles: 128x128x64, 8 warps (4 warps spill 776 B a thread)
    Tiles(128, 128, 64, 4, 3),
    Tiles(128, 64, 64, 4, 3),
]
if not CUDA:  # the interpreter: any tile runs; two candidates check the sweep
    FUSED_FORWARD, DP, DX_WEIGHTS = FUSED_FORWARD[:1] + [Tiles(16, 32, 32)], DP[:1], DX_WEIGHTS[-1:]
    FEW_ROWS = [Tiles(16, 32, 32)]
    DECODE_ADAPTER = [Tiles(16, 16, 32)]
    DECODE_CROSS = [Tiles(16, 16, 16)]
    SPLIT_LN_DOWN, SPLIT_UP, SPLIT_DP, SPLIT_DX = ([Tiles(16, 32, 32)] for _ in range(4))
    CONTRASTIVE = [Tiles(16, 16, 16), Tiles(32, 16, 32)]
    LOSS_GRAD = [Tiles(16, 16, 16)]
    LOGITS_SWEEP = [Tiles(16, 32, 1)]
    REDUCTION_PROGRAMS, SPAN_PROGRAMS = [4], [2]
    GRAD_BLOCK_BYTES = [4 * 16 * 45]  # 32 x 32 blocks of G at 45 rows


def device_ms(fn: Callable[[], object]) -> float:
    """Milliseconds of device time per call: replays of a CUDA graph of ``fn`` (wall time on the CPU)."""
    import time

    fn()
    if not CUDA:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(REPS // 5):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (REPS // 5))
    del graph
    return statistics.median(times)


@dataclass
class Family:
    """One launch setting in ``configs`` (a kernel's tile function, or a count such as programs per
    multiprocessor), its candidates, and an op that uses it."""

    name: str
    config: str  # attribute of ``configs`` the launchers read
    candidates: list[Tiles] | list[int] | list[bool]
    make: Callable[[int], Callable[[], tuple[torch.Tensor, ...]]]  # rows -> op returning its outputs
    sizes: tuple[int, ...]


def _random(seed: int, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """rand(*shape, s=1.0): seeded normal values times s, on the device in ``dtype``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return lambda *shape, s=1.0: (s * torch.randn(*shape, generator=g)).to(DEVICE, dtype)


def _adapter_params(
    rand: Callable[..., torch.Tensor], width: int, bottleneck: int
) -> tuple[torch.Tensor, ...]:
    return (
        1 + rand(width, s=0.1),
        rand(width, s=0.1),
        rand(bottleneck, width, s=width**-0.5),
        rand(bottleneck, s=0.1),
        rand(width, bottleneck, s=bottleneck**-0.5),
        rand(width, s=0.1),
        1 + rand(1, s=0.1),
    )


def _adapter_inputs(rows: int, bottleneck: int = BOTTLENECK):
    rand = _random(rows, DTYPE)
    x, params = rand(rows, WIDTH), _adapter_params(rand, WIDTH, bottleneck)
    residuals = [rand(rows, WIDTH), rand(rows, WIDTH)]
    return x, params, residuals, rand(rows, WIDTH)


def adapter_forward_op(rows: int, bottleneck: int = BOTTLENECK):
    x, params, residuals, _ = _adapter_inputs(rows, bottleneck)
    return lambda: launch.adapter_forward(x, params, residuals, launch.SINGLE_TASK, True, 1e-5)


def adapter_backward_op(rows: int, bottleneck: int = BOTTLENECK):
    x, params, residuals, dy = _adapter_inputs(rows, bottleneck)
    _, h, mean, rstd = launch.adapter_forward(x, params, residuals, launch.SINGLE_TASK, True, 1e-5)
    return lambda: launch.adapter_backward(dy, x, params, h, mean, rstd, launch.SINGLE_TASK)


def decode_projection_op(rows: int):
    """LN + QKV projection of a decoding step's rows, float32 (the precision of identical-token decoding)."""
    width = 512 if CUDA else 40
    g = torch.Generator(device="cpu").manual_seed(rows)
    x, lnw, lnb = (
        torch.randn(*shape, generator=g).to(DEVICE) for shape in ((rows, width), (width,), (width,))
    )
    w = (torch.randn(3 * width, width, generator=g) * width**-0.5).to(DEVICE)
    b = torch.randn(3 * width, generator=g).to(DEVICE)
    return lambda: (launch.ln_linear_output(x, lnw, lnb, w, b, 1e-5),)


def decode_adapter_op(rows: int):
    """The decoding step's task adapter adding fc2 and two residual terms, float32 (as identical-token
    decoding runs)."""
    width, hidden_width, r = (512, 2048, 64) if CUDA else (40, 72, 8)
    rand = _random(rows, torch.float32)
    x, hidden = rand(rows, width), rand(rows, hidden_width)
    params = _adapter_params(rand, width, r)
    linear = (hidden, rand(width, hidden_width, s=hidden_width**-0.5), rand(width, s=0.1))
    residuals = [x, rand(rows, width)]
    return lambda: (launch.adapter_output(x, params, residuals, launch.SINGLE_TASK, 1e-5, linear),)


def decode_cross_op(rows: int):
    """The cross-attention adapter's query side in a decoding step, float32: one row a sequence."""
    width, heads, length = (512, 8, 197) if CUDA else (40, 5, 7)
    rand = _random(rows, torch.float32)
    x, lnw, lnb = rand(rows, width), 1 + rand(width, s=0.1), rand(width, s=0.1)
    wq, bq = rand(width, width, s=width**-0.5), rand(width, s=0.1)
    kv = rand(rows, length, 2 * width).view(rows, length, 2, heads, width // heads)
    keys, values = (t.transpose(1, 2) for t in kv.unbind(2))  # strided views, as context_key_values gives
    return lambda: (launch.decode_cross_attention(x, 1, lnw, lnb, wq, bq, keys, values, 1e-5),)


def split_forward_op(rows: int):
    return adapter_forward_op(rows, SPLIT_BOTTLENECK)


def split_backward_op(rows: int):
    return adapter_backward_op(rows, SPLIT_BOTTLENECK)


def _contrastive_inputs(rows: int):
    g = torch.Generator(device="cpu").manual_seed(rows)
    a, b = (torch.nn.functional.normalize(torch.randn(rows, FEATURES, generator=g), dim=-1) for _ in range(2))
    scale = torch.tensor(1 / 0.07, dtype=torch.float32, device=DEVICE)
    return a.to(DEVICE, DTYPE), b.to(DEVICE, DTYPE), scale


def contrastive_forward_op(rows: int):
    a, b, scale = _contrastive_inputs(rows)
    return lambda: launch_two_way_lse(a, b, scale)


def contrastive_library_forward_op(rows: int):
    """The two-way log-sum-exps with the dot products from the library GEMM (the sweep reading them)."""
    a, b, scale = _contrastive_inputs(rows)

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        previous = configs.CONTRASTIVE_LIBRARY_LOGITS
        configs.CONTRASTIVE_LIBRARY_LOGITS = True
        try:
            return launch_two_way_lse(a, b, scale)
        finally:
            configs.CONTRASTIVE_LIBRARY_LOGITS = previous

    return run


def contrastive_loss_backward_op(rows: int):
    """The backward of the whole diagonal loss: the gradient tiles with the target terms (TARGETS)."""
    a, b, scale = _contrastive_inputs(rows)
    lse_rows, lse_cols = launch_two_way_lse(a, b, scale)
    g = torch.full_like(lse_rows, 0.5 / rows)
    keys = torch.arange(rows, dtype=torch.int32, device=DEVICE)
    ones = torch.ones(rows, dtype=torch.float32, device=DEVICE)
    targets = LossTargets(keys, keys, ones, ones, 0.0, 1 / rows, 1 / rows)
    return lambda: launch_lse_backward(g, g, a, b, scale, lse_rows, lse_cols, True, targets)


def contrastive_backward_op(rows: int):
    a, b, scale = _contrastive_inputs(rows)
    lse_rows, lse_cols = launch_two_way_lse(a, b, scale)
    g_rows = torch.full_like(lse_rows, 1 / rows)
    g_cols = torch.full_like(lse_cols, 1 / rows)
    return lambda: launch_lse_backward(g_rows, g_cols, a, b, scale, lse_rows, lse_cols, True)


FAMILIES = [
    Family(
        "adapter forward (fused, r=64)",
        "adapter_fused_tiles",
        FUSED_FORWARD,
        adapter_forward_op,
        ADAPTER_ROWS,
    ),
    Family(
        "adapter forward: one-pass LayerNorm",
        "ADAPTER_ONE_PASS_LN",
        ONE_PASS_LN,
        adapter_forward_op,
        ADAPTER_ROWS,
    ),
    Family("adapter backward: dp kernel", "dp_tiles", DP, adapter_backward_op, ADAPTER_ROWS),
    Family(
        "adapter backward: dx + weights", "dx_weight_tiles", DX_WEIGHTS, adapter_backward_op, ADAPTER_ROWS
    ),
    Family(
        "adapter backward: segments",
        "REDUCTION_PROGRAMS_PER_SM",
        REDUCTION_PROGRAMS,
        adapter_backward_op,
        ADAPTER_ROWS,
    ),
    Family("decoding: LN + QKV, few rows", "ln_linear_tiles", FEW_ROWS, decode_projection_op, DECODE_ROWS),
    Family(
        "decoding: adapter + fc2, few rows",
        "adapter_columns_tiles",
        DECODE_ADAPTER,
        decode_adapter_op,
        DECODE_ROWS,
    ),
    Family(
        "decoding: cross-attention query",
        "decode_cross_attention_tiles",
        DECODE_CROSS,
        decode_cross_op,
        DECODE_ROWS,
    ),
    Family(
        "decoding: adapter, fused kernel",
        "ADAPTER_FEW_ROWS_COLUMNS",
        FEW_ROWS_COLUMNS,
        decode_adapter_op,
        DECODE_ROWS,
    ),
    Family("split forward: LN + down", "ln_linear_tiles", SPLIT_LN_DOWN, split_forward_op, SPLIT_ROWS),
    Family("split forward: up", "up_residual_tiles", SPLIT_UP, split_forward_op, SPLIT_ROWS),
    Family("split backward: dp", "dp_tiles", SPLIT_DP, split_backward_op, SPLIT_ROWS),
    Family("split backward: dx", "dx_tiles", SPLIT_DX, split_backward_op, SPLIT_ROWS),
    Family(
        "contrastive forward: spans",
        "CONTRASTIVE_PROGRAMS_PER_SM",
        SPAN_PROGRAMS,
        contrastive_forward_op,
        CONTRASTIVE_ROWS,
    ),
    Family(
        "contrastive forward: library logits",
        "CONTRASTIVE_LIBRARY_LOGITS",
        LIBRARY_LOGITS,
        contrastive_forward_op,
        CONTRASTIVE_ROWS,
    ),
    Family(
        "contrastive forward: library logits tiles",
        "contrastive_logits_lse_tiles",
        LOGITS_SWEEP,
        contrastive_library_forward_op,
        CONTRASTIVE_ROWS,
    ),
    Family(
        "contrastive forward: column scale",
        "CONTRASTIVE_SHARED_COLUMN_SCALE",
        COLUMN_SCALE,
        contrastive_forward_op,
        CONTRASTIVE_ROWS,
    ),
    Family(
        "contrastive forward (two-way)",
        "contrastive_lse_tiles",
        CONTRASTIVE,
        contrastive_forward_op,
        CONTRASTIVE_ROWS,
    ),
    Family(
        "contrastive backward: G budget",
        "CONTRASTIVE_GRAD_CHUNK_BYTES",
        GRAD_BLOCK_BYTES,
        contrastive_backward_op,
        CONTRASTIVE_ROWS,
    ),
    Family(
        "contrastive loss backward (targets)",
        "contrastive_loss_grad_tiles",
        LOSS_GRAD,
        contrastive_loss_backward_op,
        CONTRASTIVE_ROWS,
    ),
    Family(
        "contrastive backward",
        "contrastive_grad_tiles",
        CONTRASTIVE,
        contrastive_backward_op,
        CONTRASTIVE_ROWS,
    ),
]


def _agree(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> str | None:
    """None when every output matches the current configuration's, else what differs."""
    tol = 3e-2 if DTYPE == torch.bfloat16 else 1e-4
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            return f"output {i}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        err = (g.float() - w.float()).abs().max().item() if g.numel() else 0.0
        ref = w.float().abs().max().item() if w.numel() else 0.0
        if err > tol * max(ref, 1.0):
            return f"output {i}: max error {err:.3g} (scale {ref:.3g})"
    return None


def candidate_label(config: str, candidate: Tiles | int | bool) -> str:
    """How the report names a candidate: tiles, programs per multiprocessor, a byte budget or a switch."""
    if isinstance(candidate, Tiles):
        t = candidate
        label = f"{t.block_m}x{t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages}"
        return label + (f" r{t.maxnreg}" if t.maxnreg else "")
    if isinstance(candidate, bool):
        return "switched on" if candidate else "switched off"
    if config.endswith("_BYTES"):
        return f"{candidate / 2**20:g} MiB" if candidate >= 2**20 else f"{candidate} bytes"
    return f"{candidate} programs per SM"


def sweep(family: Family, rows: int, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, float | None, str]]:
    """(configuration, ms or None, note) for the current choice and each candidate."""
    op = family.make(rows)
    want = tuple(t.clone() for t in op())
    results = [("current", device_ms(op), "")]
    for candidate in family.candidates:
        label = candidate_label(family.config, candidate)
        with monkeypatch.context() as patch:
            if isinstance(candidate, Tiles):
                patch.setattr(configs, family.config, lambda *_, t=candidate: t)
            else:
                patch.setattr(configs, family.config, candidate)
            try:
                problem = _agree(op(), want)
                ms = None if problem else device_ms(op)
            except Exception as error:  # a configuration the compiler or the card rejects
                problem, ms = f"{type(error).__name__}: {str(error).splitlines()[0][:60]}", None
        results.append((label, ms, problem or ""))
        if CUDA:
            torch.cuda.synchronize()
    return results


def selected(families: list[Family], wanted: str) -> list[Family]:
    """The families whose name contains one of the comma-separated parts of ``wanted`` (all when empty)."""
    parts = [p.strip() for p in wanted.split(",") if p.strip()]
    return [f for f in families if not parts or any(p in f.name for p in parts)]


def test_selected_families_by_name_part() -> None:
    names = [f.name for f in selected(FAMILIES, "split, spans")]
    assert names and all("split" in n or "spans" in n for n in names)
    assert len(selected(FAMILIES, "")) == len(FAMILIES)


def test_tile_sweep_report(monkeypatch: pytest.MonkeyPatch, device_description) -> None:
    lines = [f"tile sweep ({device_description(DEVICE)}), {DTYPE}, device ms per call"]
    lines.append(f"{'kernel':34} {'rows':>8}  {'configuration':22} {'ms':>8} {'x current':>9}  note")
    wrong = []
    for family in selected(FAMILIES, os.environ.get("TILE_SWEEP", "")):
        for rows in family.sizes:
            results = sweep(family, rows, monkeypatch)
            base = results[0][1]
            for label, ms, note in results:
                ratio = f"{base / ms:9.2f}" if ms else f"{'-':>9}"
                shown = f"{ms:8.3f}" if ms is not None else f"{'-':>8}"
                lines.append(f"{family.name:34} {rows:>8}  {label:22} {shown} {ratio}  {note}")
                if note.startswith("output"):
                    wrong.append((family.name, rows, label, note))
    print("\n" + "\n".join(lines))
    assert not wrong, f"configurations that change the result: {wrong}"
