"""Cross-attention adapter (XAA) speed, one fusion at a time, forward and backward separately, bf16 on a GPU.

Both XAA directions of a FAME-ViL layer at batch 64: text side (77 queries of width 512, 8 heads, over
197 vision tokens of width 768) and vision side (197 queries of width 768, 12 heads, over 77 text tokens
of width 512 with their key-padding mask). Each fusion is timed against the PyTorch calls it replaces:

* ``q_proj`` / ``kv_proj``: LayerNorm fused into the projection (one Triton kernel) vs ``F.layer_norm``
  + ``F.linear`` (cuBLAS);
* ``adapter``: the bottleneck adapter with the block's residual sum (a + MLP + XAA) written in one pass vs
  the eager adapter followed by the additions;
* ``block``: the whole op, reference vs Triton with and without the projection fusion, and
  torch.compile of the reference.

(The head merge costs nothing on either path: attention returns the heads already in (B, L, H * Dh)
order.) On the CPU the batch is 1, torch.compile is skipped and Triton runs only under
TRITON_INTERPRET=1, so ``pytest bench/bench_cross_attention.py --benchmark-disable`` finishes quickly.
"""

from __future__ import annotations

import datetime
import functools
import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from famevil_fast.ops import AdapterParams, CrossAttentionParams, cross_attention_adapter, fused_adapter
from famevil_fast.ops._backend import triton_runs_on
from famevil_fast.ops.cross_attention import layer_norm_linear_reference, layer_norm_linear_triton

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH = 64 if CUDA else 1
ROUNDS = 20 if CUDA else 1
SIDES = {  # name: (query length, query width, heads, context length, context width, masked)
    "text": (77, 512, 8, 197, 768, False),
    "vision": (197, 768, 12, 77, 512, True),
}
BOTTLENECK = 64
DIRECTIONS = ("forward", "backward")
FUSIONS = {  # name: (baseline, fused variants)
    "q_proj": ("eager", ("triton",)),
    "kv_proj": ("eager", ("triton",)),
    "adapter": ("eager", ("triton",)),
    "block": ("eager", ("compile", "triton_unfused_proj", "triton")),
}


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _param(*shape: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    t = offset + scale * torch.randn(*shape, device=DEVICE, dtype=torch.float32)
    return t.to(DTYPE).requires_grad_()


@functools.cache
def side_inputs(side: str) -> dict:
    torch.manual_seed(0)
    length, d, heads, ctx_len, c, masked = SIDES[side]
    q_ln = (_param(d, scale=0.1, offset=1), _param(d, scale=0.1))
    ctx_ln = (_param(c, scale=0.1, offset=1), _param(c, scale=0.1))
    q = (_param(d, d, scale=d**-0.5), _param(d, scale=0.1))
    kv = (_param(2 * d, c, scale=c**-0.5), _param(2 * d, scale=0.1))
    attn = CrossAttentionParams(*q_ln, *ctx_ln, *q, *kv)
    ln = (_param(d, scale=0.1, offset=1), _param(d, scale=0.1))
    down = (_param(BOTTLENECK, d, scale=d**-0.5), _param(BOTTLENECK, scale=0.1))
    up = (_param(d, BOTTLENECK, scale=0.1), _param(d, scale=0.1))
    adapter = AdapterParams(*ln, *down, *up, _param(1, offset=1))
    mask = None
    if masked:
        mask = torch.rand(BATCH, ctx_len, device=DEVICE) > 0.3
        mask[:, 0] = True
    return {
        "x": torch.randn(BATCH, length, d, device=DEVICE, dtype=DTYPE, requires_grad=True),
        "context": torch.randn(BATCH, ctx_len, c, device=DEVICE, dtype=DTYPE, requires_grad=True),
        "residual": tuple(torch.randn(BATCH, length, d, device=DEVICE, dtype=DTYPE) for _ in range(2)),
        "mask": mask,
        "attn": attn,
        "adapter": adapter,
        "heads": heads,
    }


def _eager_adapter(o: torch.Tensor, p: AdapterParams, residual: tuple[torch.Tensor, ...]) -> torch.Tensor:
    h = torch.relu(
        F.linear(F.layer_norm(o, o.shape[-1:], p.ln_weight, p.ln_bias), p.down_weight, p.down_bias)
    )
    y = F.linear(h, p.up_weight, p.up_bias) * p.scale
    for term in residual:
        y = y + term
    return y


@functools.cache
def compiled_block() -> Callable:
    return torch.compile(functools.partial(cross_attention_adapter, backend="torch"))


def work(fusion: str, impl: str, side: str) -> Callable[[], torch.Tensor]:
    """The forward computation of ``fusion`` by ``impl`` on ``side``'s inputs."""
    s = side_inputs(side)
    x, ctx, attn, ad, res = s["x"], s["context"], s["attn"], s["adapter"], s["residual"]
    if fusion in ("q_proj", "kv_proj"):
        inp, ln_w, ln_b, w, b = (
            (x, attn.q_ln_weight, attn.q_ln_bias, attn.q_weight, attn.q_bias)
            if fusion == "q_proj"
            else (ctx, attn.ctx_ln_weight, attn.ctx_ln_bias, attn.kv_weight, attn.kv_bias)
        )
        fn = layer_norm_linear_triton if impl == "triton" else layer_norm_linear_reference
        return lambda: fn(inp, ln_w, ln_b, w, b, 1e-5)
    if fusion == "adapter":
        if impl == "triton":
            return lambda: fused_adapter(x, *ad, residual=res, backend="triton")
        return lambda: _eager_adapter(x, ad, res)
    kwargs = {"context": ctx, "context_mask": s["mask"], "residual": res}
    args = (x, attn, ad, s["heads"])
    if impl == "compile":
        block = compiled_block()
        return lambda: block(*args, **kwargs)
    if impl == "eager":
        return lambda: cross_attention_adapter(*args, **kwargs, backend="torch")
    fuse = impl == "triton"
    return lambda: cross_attention_adapter(*args, **kwargs, backend="triton", fuse_projections=fuse)


def available(impl: str) -> str | None:
    if impl == "compile" and not CUDA:
        return "torch.compile is timed on a GPU only (CPU compilation takes minutes)"
    if impl.startswith("triton") and not triton_runs_on(DEVICE):
        return "Triton needs a GPU, or TRITON_INTERPRET=1 on the CPU"
    return None


def step(forward: Callable[[], torch.Tensor], direction: str) -> tuple[Callable, Callable]:
    state = {}

    def setup() -> None:
        if direction == "backward":
            out = forward()
            state["out"], state["grad"] = out, torch.randn_like(out)
        _sync()

    def timed() -> None:
        if direction == "forward":
            state["out"] = forward()
        else:
            state["out"].backward(state["grad"])

    return setup, timed


def median_seconds(setup: Callable, timed: Callable, rounds: int = ROUNDS) -> float:
    for _ in range(3 if CUDA else 1):
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


CASES = [
    (side, fusion, impl)
    for side in SIDES
    for fusion, (base, fused) in FUSIONS.items()
    for impl in (base, *fused)
]


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize(("side", "fusion", "impl"), CASES)
def test_cross_attention(benchmark, side: str, fusion: str, impl: str, direction: str) -> None:
    reason = available(impl)
    if reason:
        pytest.skip(reason)
    if CUDA is False and side == "vision" and fusion == "block" and impl.startswith("triton"):
        pytest.skip("one interpreted block per side is enough on the CPU")
    setup, timed = step(work(fusion, impl, side), direction)
    for _ in range(3 if CUDA else 0):
        setup()
        timed()
    benchmark.extra_info.update({"side": side, "fusion": fusion, "impl": impl, "direction": direction})
    benchmark.pedantic(lambda: (timed(), _sync()), setup=setup, rounds=ROUNDS, iterations=1)


def describe() -> str:
    import triton

    card = torch.cuda.get_device_name() if CUDA else "CPU"
    return f"{card}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}"


def test_cross_attention_report() -> None:
    """Every fusion against its baseline in one process: milliseconds and speed-ups."""
    lines = [
        f"XAA fusions, batch {BATCH}, {DTYPE}, {describe()}",
        "side    fusion   direction  impl: ms (x baseline)",
    ]
    for side in SIDES:
        for fusion, (base, fused) in FUSIONS.items():
            for direction in DIRECTIONS:
                ms = {}
                for impl in (base, *fused):
                    if available(impl) is None:
                        ms[impl] = 1e3 * median_seconds(*step(work(fusion, impl, side), direction))
                cells = [f"{base} {ms[base]:.3f}"]
                cells += [
                    f"{impl} {ms[impl]:.3f} ({ms[base] / ms[impl]:.2f}x)" for impl in fused if impl in ms
                ]
                lines.append(f"{side:<7} {fusion:<8} {direction:<10} " + ", ".join(cells))
    print("\n" + "\n".join(lines))
