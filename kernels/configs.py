"""Tile sizes, warp counts and operand types for every kernel launch.

GPU tiles target Hopper-class cards (64-row blocks feed one warpgroup's wgmma, 64-128 wide K chunks keep
two or three pipeline stages in shared memory). Triton's interpreter spends its time per program and per
tile operation, not per element, so there tiles are as large as the shapes allow (512-wide chunks still
leave d = 768 two chunks, one of them partial, so the loops and masks stay exercised).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton.language as tl

FUSED_MAX_R = 128  # widest bottleneck kept on chip by the fused adapter kernels

# The fused adapter forward's LayerNorm: a statistics pass over the rows before the down projection (False),
# or the statistics gathered while the down projection multiplies the raw rows (True; ``adapter_forward``'s
# one-pass form). The two-pass form is the one measured on a card; bench/bench_tiles.py times both.
ADAPTER_ONE_PASS_LN = False


# What ``torch.backends.cuda.matmul.allow_tf32`` reads, called without the module's Python ``__getattr__``
# in front of it (read on every launch of a product kernel); the attribute where a torch lacks the getter.
_CUBLAS_ALLOWS_TF32 = getattr(torch._C, "_get_cublas_allow_tf32", None)


def tf32_allowed() -> bool:
    """``torch.backends.cuda.matmul.allow_tf32``, read afresh on every call (tests and users switch it)."""
    if _CUBLAS_ALLOWS_TF32 is None:
        return torch.backends.cuda.matmul.allow_tf32
    return _CUBLAS_ALLOWS_TF32()


def one_pass_layer_norm(dtype: torch.dtype) -> bool:
    """Whether the fused adapter forward takes the one-pass LayerNorm for activations of ``dtype``: where
    ``ADAPTER_ONE_PASS_LN`` is on, for 16-bit activations and for float32 without TF32."""
    if not ADAPTER_ONE_PASS_LN:
        return False
    return dtype != torch.float32 or not tf32_allowed()


# Single-task adapter calls on few rows (``has_few_rows``: a decoding step) spread the columns of the output
# over programs (``adapter_fwd_columns_kernel``, which also takes the MLP's second layer as a linear branch)
# instead of one program per 16 rows (False: the fused kernel, with that branch as a separate product).
# bench/bench_tiles.py times both.
ADAPTER_FEW_ROWS_COLUMNS = True

MAX_RESIDUALS = 3  # residual pointers taken by the forward kernels; more are pre-summed


# Triton decides between its compiler and its interpreter when a kernel is decorated, at import; the tile
# choices follow the same reading of the environment, made once, so that no launch pays for it.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return INTERPRETING


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python integers (host side; cheaper than a call into triton's helpers)."""
    return -(-a // b)


def padded(n: int, at_least: int = 16) -> int:
    """The next power of two >= n, at least ``at_least``."""
    return max(at_least, 1 << max(0, n - 1).bit_length())


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand type of tl.dot. The interpreter lacks bf16 arithmetic, so there bf16 tiles multiply in fp32."""
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    if dtype == torch.float16:
        return tl.float16
    return tl.float32


_DOT_ARGS: dict[tuple[torch.dtype, bool], dict] = {}


def dot_args(dtype: torch.dtype) -> dict:
    """``DOT`` and ``PRECISION`` launch arguments for activations of ``dtype`` (a shared dict: do not
    modify). float32 products use TF32 exactly when PyTorch's matmuls may
    (``torch.backends.cuda.matmul.allow_tf32``); 16-bit products ignore the precision."""
    tf32 = dtype == torch.float32 and tf32_allowed()
    key = (dtype, tf32)
    args = _DOT_ARGS.get(key)
    if args is None:
        args = _DOT_ARGS[key] = {"DOT": dot_dtype(dtype), "PRECISION": "tf32" if tf32 else "ieee"}
    return args


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    maxnreg: int | None = None  # cap on registers per thread (more programs per multiprocessor); None = free

    def __post_init__(self) -> None:
        options = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            options["maxnreg"] = self.maxnreg
        object.__setattr__(self, "_options", options)  # not a field: equality and hashing ignore it

    def launch(self) -> dict[str, int]:
        """The launch options (``num_warps``, ``num_stages``, ``maxnreg`` when set): a dict made once per
        tile choice and shared, to be unpacked into a launch, not modified."""
        return self._options


# Calls on at most this many rows (a decoding step: one token per sequence) take tiles with 16-row blocks and
# narrower column tiles, so that the few rows still spread over many programs: with 64-row blocks a 64-row
# product runs on as many programs as it has column tiles (a dozen for the text tower's QKV projection, one
# for an adapter), each one multiplying its whole share, which in float32 (no tensor cores) takes tens of
# microseconds on a single multiprocessor.
SMALL_ROWS = 256


def has_few_rows(n_rows: int) -> bool:
    """Whether a call on ``n_rows`` rows takes the tiles of few rows (``SMALL_ROWS``)."""
    return n_rows <= SMALL_ROWS


@functools.cache
def adapter_fused_tiles(block_r: int, itemsize: int = 2, few_rows: bool = False) -> Tiles:
    """adapter_fwd_fused_kernel: BLOCK_N and BLOCK_K are the d chunks. 16-bit activations with r <= 64 take
    128-wide chunks over three stages: on an H200 (bf16, d = 768, bench/bench_tiles.py) 1.35x the 64-wide
    two-stage kernel at 12,608 rows and 1.05x at 2^20. Wider bottlenecks and float32 keep the 64-wide
    chunks, whose buffers fit beside the larger accumulators. ``few_rows`` (``has_few_rows``): 16-row
    blocks."""
    if interpreting():
        return Tiles(block_m=128, block_n=512, block_k=512)
    if few_rows:
        return Tiles(block_m=16, block_n=64, block_k=64, num_warps=4, num_stages=2)
    if block_r <= 64 and itemsize <= 2:
        return Tiles(block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)
    return Tiles(block_m=64, block_n=64, block_k=64, num_warps=4 if block_r <= 64 else 8, num_stages=2)


@functools.cache
def adapter_columns_tiles(block_r: int, few_rows: bool = True) -> Tiles:
    """adapter_fwd_columns_kernel: BLOCK_N columns of y a program, BLOCK_K chunks of d (and of the linear
    branch's inputs). Few rows: 16 x 32 tiles, so that a decoding step's adapter of width 512 or 768 runs on
    16 or 24 programs a row block."""
    if interpreting():
        return Tiles(block_m=128, block_n=256, block_k=512)
    if few_rows:
        return Tiles(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
    return Tiles(block_m=64, block_n=64, block_k=64, num_warps=4 if block_r <= 64 else 8, num_stages=2)


@functools.cache
def dx_weight_tiles(block_r: int) -> Tiles:
    """adapter_bwd_dx_weights_kernel: BLOCK_M rows per step, BLOCK_N the d tile (block_k unused). Four warps:
    on an H200 (bf16, r = 64) 1.26x eight at 12,608 rows and 1.37x at 2^20."""
    if interpreting():
        return Tiles(block_m=128, block_n=512, block_k=1)
    return Tiles(block_m=64, block_n=64, block_k=1, num_warps=4 if block_r <= 64 else 8, num_stages=2)


@functools.cache
def ln_linear_tiles(n_out: int, few_rows: bool = False) -> Tiles:
    """ln_linear_fwd_kernel: BLOCK_N output columns, BLOCK_K chunks of d; ``few_rows``: 16 x 32 tiles."""
    if interpreting():
        return Tiles(block_m=128, block_n=min(padded(n_out), 512), block_k=512)
    if few_rows:
        return Tiles(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
    return Tiles(block_m=64, block_n=min(padded(n_out), 128), block_k=64, num_warps=4, num_stages=3)


@functools.cache
def up_residual_tiles(few_rows: bool = False) -> Tiles:
    """adapter_up_residual_kernel: BLOCK_N output columns of d, BLOCK_K chunks of r; ``few_rows``: 16 x 32
    tiles."""
    if interpreting():
        return Tiles(block_m=128, block_n=512, block_k=512)
    if few_rows:
        return Tiles(block_m=16, block_n=32, block_k=64, num_warps=4, num_stages=2)
    return Tiles(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)


@functools.cache
def dp_tiles(r: int) -> Tiles:
    """adapter_dp_kernel: BLOCK_N r columns (the tile), BLOCK_K chunks of d."""
    if interpreting():
        return Tiles(block_m=128, block_n=min(padded(r), 512), block_k=512)
    return Tiles(block_m=64, block_n=min(padded(r), 128), block_k=64, num_warps=4, num_stages=3)


@functools.cache
def dx_tiles(n_out: int) -> Tiles:
    """ln_linear_dx_kernel: BLOCK_N d columns, BLOCK_K chunks of the linear output."""
    if interpreting():
        return Tiles(block_m=128, block_n=512, block_k=min(padded(n_out), 512))
    return Tiles(block_m=64, block_n=128, block_k=min(padded(n_out), 64), num_warps=4, num_stages=3)


@functools.cache
def weight_tiles(n_out: int) -> Tiles:
    """weight_grad_partials_kernel: BLOCK_M rows per step (the reduction), BLOCK_N d tile, BLOCK_K r tile."""
    if interpreting():
        return Tiles(block_m=128, block_n=512, block_k=min(padded(n_out), 512))
    return Tiles(block_m=64, block_n=64, block_k=min(padded(n_out), 128), num_warps=8, num_stages=2)


@functools.cache
def epilogue_tiles(n_out: int) -> Tiles:
    """weight_grad_epilogue_kernel: BLOCK_N d tile, BLOCK_K r chunk (no products; block_m unused)."""
    if interpreting():
        return Tiles(block_m=1, block_n=512, block_k=min(padded(n_out), 512))
    return Tiles(block_m=1, block_n=16, block_k=min(padded(n_out), 128), num_warps=4, num_stages=1)


@functools.cache
def decode_attention_tiles(head_dim: int) -> Tiles:
    """decode_self_attention_kernel: BLOCK_M cached positions per step, BLOCK_N >= the head width."""
    if interpreting():
        return Tiles(block_m=128, block_n=padded(head_dim), block_k=1)
    return Tiles(block_m=32, block_n=padded(head_dim), block_k=1, num_warps=2, num_stages=2)


@functools.cache
def decode_cross_attention_tiles(head_dim: int) -> Tiles:
    """decode_cross_attention_kernel: BLOCK_M context positions a step, BLOCK_N >= the head width, BLOCK_K
    chunks of the row for its LayerNorm and query projection."""
    if interpreting():
        return Tiles(block_m=128, block_n=padded(head_dim), block_k=512)
    return Tiles(block_m=32, block_n=padded(head_dim), block_k=64, num_warps=4, num_stages=2)


@functools.cache
def greedy_pick_tiles(width: int) -> Tiles:
    """greedy_pick_kernel: BLOCK_M logits a chunk of the argmax walk, BLOCK_N embedding columns a chunk."""
    if interpreting():
        return Tiles(block_m=4096, block_n=padded(min(width, 1024)), block_k=1)
    return Tiles(block_m=1024, block_n=padded(min(width, 1024)), block_k=1, num_warps=4, num_stages=1)


@functools.cache
def elementwise_tiles() -> Tiles:
    """Elementwise kernels over a flat array (the QuickGELU activation): BLOCK_M elements per program, eight
    a thread of 8 warps, so that a thread loads 16 contiguous bytes at once in 16-bit types (sm_90 build:
    24-32 registers, no spill)."""
    if interpreting():
        return Tiles(block_m=1024, block_n=1, block_k=1)
    return Tiles(block_m=2048, block_n=1, block_k=1, num_warps=8, num_stages=1)


@functools.cache
def multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.cache
def row_constants_tiles() -> Tiles:
    """ln_linear_row_constants_kernel: BLOCK_M outputs per program (the rows of W), BLOCK_K chunks of d."""
    if interpreting():
        return Tiles(block_m=512, block_n=1, block_k=512)
    return Tiles(block_m=32, block_n=1, block_k=128, num_warps=4, num_stages=2)


REDUCTION_PROGRAMS_PER_SM = 2  # programs of a weight-gradient reduction per multiprocessor
MAX_REDUCTION_SEGMENTS = 64


def reduction_segments(
    n_rows: int, n_tasks: int, tiles_per_segment: int, block_m: int, device: torch.device
) -> int:
    """Row segments per task for the weight-gradient reduction: enough programs to fill the device
    (REDUCTION_PROGRAMS_PER_SM per multiprocessor), never more segments than row blocks or
    MAX_REDUCTION_SEGMENTS. The interpreter uses two when there are rows for two, so the multi-segment
    reduction is exercised on the CPU."""
    rows_per_task = cdiv(max(n_rows, 1), n_tasks)
    blocks = max(1, cdiv(rows_per_task, block_m))
    if device.type != "cuda":
        return min(2, blocks)
    sms = multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    wanted = cdiv(REDUCTION_PROGRAMS_PER_SM * sms, max(1, tiles_per_segment * n_tasks))
    return max(1, min(wanted, blocks, MAX_REDUCTION_SEGMENTS))


@functools.cache
def contrastive_lse_tiles(dtype: torch.dtype) -> Tiles:
    """contrastive_lse_kernel: BLOCK_M rows of X, BLOCK_N rows of Y, BLOCK_K chunks of the feature dimension.
    16-bit: 128 x 128 tiles in one warpgroup; float32 tiles are smaller (four times the registers per
    product). H200, bf16, D = 512, 16,384 rows (bench/bench_tiles.py): four warps made the sweep (over
    column spans) 1.15x and the gradient tile 1.12x faster than eight."""
    if interpreting():
        return Tiles(block_m=32, block_n=32, block_k=32)
    if dtype in (torch.bfloat16, torch.float16):
        return Tiles(block_m=128, block_n=128, block_k=64, num_warps=4, num_stages=3)
    return Tiles(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=3)


@functools.cache
def contrastive_grad_tiles(dtype: torch.dtype) -> Tiles:
    """contrastive_lse_grad_kernel: the log-sum-exp sweep's tile of dot products, one tile per program."""
    return contrastive_lse_tiles(dtype)


@functools.cache
def contrastive_loss_grad_tiles(dtype: torch.dtype) -> Tiles:
    """contrastive_lse_grad_kernel with the loss's target terms (TARGETS): in 16-bit, eight warps, since
    with four the 128 x 128 tile spills 776 bytes a thread (ptxas, sm_90) and with eight it does not."""
    t = contrastive_grad_tiles(dtype)
    if interpreting() or dtype not in (torch.bfloat16, torch.float16):
        return t
    return Tiles(t.block_m, t.block_n, t.block_k, num_warps=8, num_stages=t.num_stages)


# The two-way sweep's column statistics: each column stabilised by its own maximum (False), or by the tile's
# largest logit, reusing the row pass's exponentials (True; ``contrastive.column_lse_shared``). The exact
# form is the one measured on a card (1.04 ms at 16,384 rows, bf16, H200); bench/bench_tiles.py times both.
CONTRASTIVE_SHARED_COLUMN_SCALE = False


@functools.cache
def row_dots_tiles() -> Tiles:
    """row_dots_kernel: BLOCK_M rows, BLOCK_N-wide chunks of the features; a read of both inputs, bound by
    memory bandwidth."""
    if interpreting():
        return Tiles(block_m=16, block_n=32, block_k=1)
    return Tiles(block_m=32, block_n=128, block_k=1, num_warps=4, num_stages=1)


@functools.cache
def combine_lse_tiles() -> Tiles:
    """combine_lse_kernel: BLOCK_M partials (rows) at a time for BLOCK_N columns."""
    if interpreting():
        return Tiles(block_m=4, block_n=32, block_k=1)
    return Tiles(block_m=8, block_n=256, block_k=1, num_warps=4, num_stages=1)


CONTRASTIVE_PROGRAMS_PER_SM = 4  # programs of the log-sum-exp sweep per multiprocessor the spans aim at


def contrastive_column_spans(row_blocks: int, col_tiles: int, device: torch.device) -> int:
    """Spans of Y's rows the log-sum-exp sweep splits the columns into: enough (row block, span) programs
    for CONTRASTIVE_PROGRAMS_PER_SM per multiprocessor, at most one per column tile. The interpreter uses
    two where there are two tiles, so the combination of spans is exercised on the CPU."""
    if device.type != "cuda":
        return max(1, min(2, col_tiles))
    sms = multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    wanted = cdiv(CONTRASTIVE_PROGRAMS_PER_SM * sms, max(1, row_blocks))
    return max(1, min(wanted, col_tiles))


# The log-sum-exp forward: dot products inside the sweep (False), or by the library GEMM into float32 chunks
# of at most CONTRASTIVE_LOGITS_CHUNK_BYTES that the sweep then reads (True). The first is the one measured
# on a card; bench/bench_tiles.py times both.
CONTRASTIVE_LIBRARY_LOGITS = False
CONTRASTIVE_LOGITS_CHUNK_BYTES = 256 * 2**20


@functools.cache
def contrastive_logits_lse_tiles() -> Tiles:
    """contrastive_lse_kernel reading float32 dot products (FROM_LOGITS): a load and the exponentials per
    tile, no product. Eight warps: with four the 64 x 128 tile spills 832 bytes a thread (ptxas, sm_90)."""
    if interpreting():
        return Tiles(block_m=32, block_n=64, block_k=1)
    return Tiles(block_m=64, block_n=128, block_k=1, num_warps=8, num_stages=2)


CONTRASTIVE_GRAD_CHUNK_BYTES = 256 * 2**20  # the largest block of G the contrastive backward holds
CONTRASTIVE_COL_PARTIAL_BYTES = 256 * 2**20  # per-row-block column statistics of the one-sweep forward
