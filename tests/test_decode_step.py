"""The fused one-token decoding step: its two inference ops (Triton, under the interpreter on the CPU, against
the PyTorch reference), the layer against the plain decoder's, the tokens against re-encoding, and the
number of kernels a step launches."""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import AtenLog, RecordLaunch, perturb_

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.decode_step import fused_step_applies
from famevil_fast.model.generation import SOT_ID, TextDecoder, generate, generate_by_reencoding
from famevil_fast.ops.decoding import cached_self_attention, layer_norm_linear_act, linear_residual

pytest.importorskip("triton")


def _ln_params(d: int, n: int) -> tuple[torch.Tensor, ...]:
    return 1 + 0.2 * torch.randn(d), 0.2 * torch.randn(d), torch.randn(n, d) / d**0.5, torch.randn(n)


@pytest.mark.parametrize("activation", [None, "relu", "quick_gelu", "gelu"])
@pytest.mark.parametrize(("shape", "n"), [((1, 40), 70), ((3, 1, 96), 200), ((0, 40), 7), ((7, 2, 24), 1)])
def test_layer_norm_linear_act_matches_reference(
    shape: tuple[int, ...], n: int, activation: str | None
) -> None:
    x = torch.randn(*shape) * 1.5 + 0.3
    params = _ln_params(shape[-1], n)
    with torch.no_grad():
        got = layer_norm_linear_act(x, *params, activation, 1e-5, backend="triton")
    want = layer_norm_linear_act(x.double(), *(p.double() for p in params), activation, 1e-5, backend="torch")
    assert got.shape == (*shape[:-1], n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rows", "k", "d"), [(1, 24, 33), (9, 130, 64), (0, 8, 8)])
def test_linear_residual_matches_reference(rows: int, k: int, d: int) -> None:
    x, w, b, res = (
        torch.randn(rows, 1, k),
        torch.randn(d, k) / k**0.5,
        torch.randn(d),
        torch.randn(rows, 1, d),
    )
    with torch.no_grad():
        got = linear_residual(x, w, b, res, backend="triton")
    want = res.double() + F.linear(x.double(), w.double(), b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("batch", "heads", "head_dim", "position"), [(1, 2, 24, 0), (3, 2, 24, 5), (2, 4, 16, 7)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cached_self_attention_matches_reference(
    batch: int, heads: int, head_dim: int, position: int, dtype: torch.dtype
) -> None:
    """The new token's key and value land at ``position`` of the cache and the output is the attention
    over positions 0..position, as the PyTorch reference computes them (first position, a middle one, the
    last one of an 8-position cache; a head width that is not a power of two)."""
    width = heads * head_dim
    qkv = torch.randn(batch, 1, 3 * width).to(dtype)
    filled = torch.randn(batch, 2, heads, 8, head_dim).to(dtype)
    caches = {name: filled.clone() for name in ("torch", "triton")}
    with torch.no_grad():
        out = {
            name: cached_self_attention(qkv, caches[name], position, heads, backend=name) for name in caches
        }
    assert torch.equal(caches["triton"], caches["torch"])  # the same positions written, the rest kept
    assert out["triton"].shape == (batch, 1, width) and out["triton"].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out["triton"].float(), out["torch"].float(), rtol=tol, atol=tol)


def test_cached_self_attention_bad_arguments() -> None:
    qkv, cache = torch.randn(2, 1, 48), torch.randn(2, 2, 2, 4, 8)
    with pytest.raises(ValueError, match="outside the cache's 4 positions"):
        cached_self_attention(qkv, cache, 4, 2)
    with pytest.raises(ValueError, match="cache must be"):
        cached_self_attention(qkv, cache, 0, 4)
    with pytest.raises(ValueError, match=r"qkv must be \(B, 1, 3d\)"):
        cached_self_attention(qkv[:, :, :47], cache, 0, 2)


def test_bad_arguments_raise_value_error() -> None:
    x = torch.randn(2, 16)
    ln_w, ln_b, w, b = _ln_params(16, 8)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        layer_norm_linear_act(x, ln_w, ln_b, w, b, "tanh")
    with pytest.raises(ValueError, match="does not take inputs of width 16"):
        layer_norm_linear_act(x, ln_w, ln_b, w.t(), b)
    with pytest.raises(ValueError, match="LayerNorm parameters"):
        layer_norm_linear_act(x, ln_w[:8], ln_b, w, b)
    with pytest.raises(ValueError, match="bias has dtype torch.float64"):
        layer_norm_linear_act(x, ln_w, ln_b, w, b.double(), backend="triton")
    with pytest.raises(ValueError, match="inference-only"):
        layer_norm_linear_act(x.requires_grad_(), ln_w, ln_b, w, b, backend="triton")
    with pytest.raises(ValueError, match="residual of shape"):
        linear_residual(torch.randn(2, 8), torch.randn(16, 8), torch.randn(16), torch.randn(2, 15))
    with pytest.raises(ValueError, match="unknown backend"):
        linear_residual(
            torch.randn(2, 8), torch.randn(16, 8), torch.randn(16), torch.randn(2, 16), backend="cuda"
        )


@pytest.fixture(scope="module")
def model() -> FameViL:
    torch.manual_seed(0)
    m = perturb_(
        FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa="text")), std=0.05
    )
    return m.eval()


def test_fused_layers_follow_the_plain_step(model) -> None:
    """Four steps of the fused decoder give the plain decoder's logits (float32 rounding apart)."""
    pixels = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(0, 1000, (4, 3))
    tokens[0] = SOT_ID
    with torch.no_grad():
        memory = model.vision_memory(pixels, "cap")
        fused = TextDecoder(model, memory, 8, fused=True)
        plain = TextDecoder(model, memory, 8, fused=False)
        for t in range(4):
            torch.testing.assert_close(fused.step(tokens[t]), plain.step(tokens[t]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["shortlist", "gelu"])
def test_fused_layers_follow_the_plain_step_in_other_model_forms(variant: str) -> None:
    """A caption shortlist (the fused head gathers its rows once per decode) and an MLP with GELU instead
    of QuickGELU."""
    torch.manual_seed(1)
    config = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa="text")
    if variant == "shortlist":
        config = config.replace(caption_vocab=(5, 17, 260, 1000, 49406, 49407))
    else:
        config = config.replace(clip=dataclasses.replace(config.clip, activation="gelu"))
    m = perturb_(FameViL(config), std=0.05).eval()
    tokens = torch.tensor([[SOT_ID, SOT_ID], [17, 260], [1000, 5]])
    with torch.no_grad():
        memory = m.vision_memory(torch.randn(2, 3, 32, 32), "cap")
        fused = TextDecoder(m, memory, 4, fused=True)
        plain = TextDecoder(m, memory, 4, fused=False)
        for t in range(3):
            torch.testing.assert_close(fused.step(tokens[t]), plain.step(tokens[t]), rtol=1e-4, atol=1e-4)


def fused_tokens_and_reference(model: FameViL, pixels: torch.Tensor, **options) -> tuple[torch.Tensor, ...]:
    """Tokens of ``generate`` with the fused step (the model's backend set to Triton), and of re-encoding
    with the plain PyTorch model."""
    reference = generate_by_reencoding(model, pixels, max_len=6, num_beams=options.get("num_beams", 1))
    model.set_runtime(backend="triton")
    try:
        assert fused_step_applies(model, "cap", pixels)
        with torch.no_grad():
            tokens = generate(model, pixels, max_len=6, **options)
    finally:
        model.set_runtime(backend=None)
    return tokens, reference


@pytest.mark.parametrize("options", [{}, {"num_beams": 2}, {"cuda_graph": True}])
def test_fused_decoding_gives_the_tokens_of_reencoding(model, options: dict) -> None:
    """Greedy, beam search (caches reordered) and the capture-safe loop of graphed decoding (simulated
    capture on the CPU: no read-back, no host-made tensor inside the step)."""
    tokens, reference = fused_tokens_and_reference(model, torch.randn(2, 3, 32, 32), **options)
    assert torch.equal(tokens, reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_gpu_fused_decoding_gives_the_tokens_of_reencoding(model, cuda_graph: bool) -> None:
    gpu_model = copy.deepcopy(model).cuda()
    pixels = torch.randn(6, 3, 32, 32, device="cuda")
    tokens, reference = fused_tokens_and_reference(gpu_model, pixels, cuda_graph=cuda_graph)
    assert torch.equal(tokens, reference)


def test_fused_step_needs_the_triton_backend_and_its_block_form(model) -> None:
    like = torch.zeros(1)
    assert not fused_step_applies(model, "cap", like)  # the tests pin automatic choices to PyTorch
    model.set_runtime(backend="triton")
    try:
        assert fused_step_applies(model, "cap", like)
        assert not fused_step_applies(model, "unknown task", like)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_step_applies(model, "cap", like)
        model.set_runtime(backend="cuda")  # names the contrastive losses' kernels: the step chooses itself
        assert not fused_step_applies(model, "cap", like)
    finally:
        model.set_runtime(backend=None)


VIEWS = {
    "view",
    "t",
    "transpose",
    "select",
    "slice",
    "split",
    "unsqueeze",
    "expand",
    "_unsafe_view",
    "detach",
}
ALLOCATIONS = {"empty", "empty_like", "new_empty"}


def test_a_fused_step_launches_nine_kernels_a_layer(model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Per layer: seven Triton kernels (LN + QKV, cache write + self-attention, output projection +
    residual, LN + query, the two adapters, LN2 + fc1 + activation), the cross-attention, fc2; per step the
    embedding, the position and one kernel for the final LayerNorm and the head. (The launches are
    recorded, not run.)"""
    from famevil_fast.kernels import launch

    layers = len(model.text.blocks)
    with torch.no_grad():
        decoder = TextDecoder(model, model.vision_memory(torch.randn(2, 3, 32, 32), "cap"), 4, fused=True)
        start = torch.full((2,), SOT_ID)
        decoder.step(start)  # the first step also makes the kernels' constants
        launches = RecordLaunch.patch(monkeypatch, launch)
        with AtenLog() as log:
            decoder.step(start)
    per_layer = [
        "ln_linear_fwd_kernel",  # LN1 + QKV
        "decode_self_attention_kernel",  # cache write + attention
        "adapter_up_residual_kernel",  # output projection + h
        "ln_linear_fwd_kernel",  # XAA: LN + query projection
        "adapter_fwd_fused_kernel",  # XAA: bottleneck adapter
        "ln_linear_fwd_kernel",  # LN2 + fc1 + QuickGELU
        "adapter_fwd_fused_kernel",  # task adapter + a + MLP + XAA
    ]
    assert launches == per_layer * layers + ["ln_linear_fwd_kernel"]
    compute = collections.Counter(op for op in log.ops if op not in VIEWS | ALLOCATIONS)
    attention_op = next(op for op in compute if "scaled_dot_product" in op)
    assert compute == {"embedding": 1, "add": 1, attention_op: layers, "addmm": layers}
