"""CUDA contrastive kernels against float64 references: every variant and dtype, awkward shapes, large
scales, multi-panel backward, gradcheck, memory. Skipped unless a GPU and the CUDA build are present."""

from __future__ import annotations

import pytest
import torch

from famevil_fast.ops import contrastive as C
from famevil_fast.ops.contrastive import (
    contrastive_distill_loss,
    contrastive_distill_loss_reference,
    contrastive_loss,
    contrastive_loss_reference,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or C.unavailable_reason("cuda", torch.device("cuda")) is not None,
        reason="needs a CUDA device and the extension built with CUDA",
    ),
]

DEV = "cuda"
SHAPES = [(1, 1, 8), (129, 129, 72), (300, 517, 64), (517, 300, 33), (1000, 1000, 512)]
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _inputs(m, n, d, dtype, s=5.0, normalize=True):
    a, b = torch.randn(m, d, device=DEV), torch.randn(n, d, device=DEV)
    if normalize:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return a.to(dtype), b.to(dtype), torch.tensor(s, device=DEV, dtype=scale_dtype)


def _compare(fast, ref, tensors, dtype):
    loss, grads = _grads(fast, tensors)
    ref_loss, ref_grads = _grads(ref, [t.double() for t in tensors])
    assert torch.isfinite(loss)
    torch.testing.assert_close(
        loss.double(), ref_loss, rtol=1e-4 if dtype != torch.float64 else 1e-10, atol=1e-5
    )
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        # Relative to the reference gradient, with a floor far below the usual norms (0.1-1): a batch of
        # one (or label smoothing over one class) has an exactly zero gradient that rounding leaves at 1e-7.
        err = float((g.double() - r).norm() / r.norm().clamp_min(1e-2))
        assert err < GRAD_TOL[g.dtype], f"gradient of input {i} ({g.dtype}): error {err:.2e}"


def _variant(name, m, n):
    if name == "labels":
        return {"labels": torch.randint(0, n, (m,), device=DEV)}
    if name == "groups":
        rg, cg = torch.randint(0, 7, (m,), device=DEV), torch.randint(0, 9, (n,), device=DEV)
        cg[0] = rg[0]
        return {"groups": (rg, cg), "label_smoothing": 0.1}
    if m != n:
        return None
    return {"smoothing": {"label_smoothing": 0.1}, "diagonal": {}}[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("m,n,d", SHAPES)
@pytest.mark.parametrize("variant", ["diagonal", "smoothing", "labels", "groups"])
@pytest.mark.parametrize("two_way", [True, False])
def test_contrastive_matches_reference(dtype, m, n, d, variant, two_way):
    kw = _variant(variant, m, n)
    if kw is None:
        pytest.skip("the diagonal needs M == N")
    a, b, s = _inputs(m, n, d, dtype)
    _compare(
        lambda a, b, s: contrastive_loss(a, b, s, two_way=two_way, backend="cuda", **kw),
        lambda a, b, s: contrastive_loss_reference(a, b, s, two_way=two_way, **kw),
        [a, b, s],
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("m,n,d", SHAPES)
@pytest.mark.parametrize("two_way", [True, False])
def test_distill_matches_reference(dtype, m, n, d, two_way):
    a, b, s = _inputs(m, n, d, dtype)
    ta, tb, _ = _inputs(m, n, d + 8, dtype)
    _compare(
        lambda a, b, s: contrastive_distill_loss(a, b, s, ta, tb, 6.0, two_way=two_way, backend="cuda"),
        lambda a, b, s: contrastive_distill_loss_reference(
            a, b, s, ta.double(), tb.double(), 6.0, two_way=two_way
        ),
        [a, b, s],
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [100.0, -20.0, 0.0])
def test_large_scales_without_overflow(dtype, scale):
    a, b, s = _inputs(300, 300, 64, dtype, s=scale, normalize=False)
    _compare(
        lambda a, b, s: contrastive_loss(a, b, s, backend="cuda"),
        contrastive_loss_reference,
        [a, b, s],
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_panel_backward(dtype, monkeypatch):
    monkeypatch.setenv("FAMEVIL_FAST_CONTRASTIVE_PANEL_ROWS", "128")
    a, b, s = _inputs(700, 650, 48, dtype)
    labels = torch.randint(0, 650, (700,), device=DEV)
    _compare(
        lambda a, b, s: contrastive_loss(a, b, s, labels=labels, backend="cuda"),
        lambda a, b, s: contrastive_loss_reference(a, b, s, labels=labels),
        [a, b, s],
        dtype,
    )


def test_cuda_agrees_with_cpu_backend():
    a, b, s = _inputs(333, 333, 40, torch.float32)
    gpu, gpu_grads = _grads(lambda a, b, s: contrastive_loss(a, b, s, backend="cuda"), [a, b, s])
    cpu, cpu_grads = _grads(
        lambda a, b, s: contrastive_loss(a, b, s, backend="cpu"), [a.cpu(), b.cpu(), s.cpu()]
    )
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    for g, c in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-6)


def test_non_contiguous_inputs():
    x, y, s = _inputs(200, 200, 96, torch.bfloat16)
    a, b = x[:, :80], y[:, 8:88]  # strided views: the operator takes contiguous copies
    _compare(
        lambda a, b, s: contrastive_loss(a, b, s, backend="cuda"),
        contrastive_loss_reference,
        [a, b, s],
        torch.bfloat16,
    )


def test_gradcheck_on_gpu():
    a = torch.randn(6, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    b = torch.randn(7, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    s = torch.tensor(2.0, dtype=torch.float64, device=DEV, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 6, 1, 2], device=DEV)
    assert torch.autograd.gradcheck(
        lambda a, b, s: contrastive_loss(a, b, s, labels=labels, backend="cuda"), (a, b, s)
    )
    ta, tb = (
        torch.randn(6, 3, dtype=torch.float64, device=DEV),
        torch.randn(7, 3, dtype=torch.float64, device=DEV),
    )
    fn = lambda a, b, s: contrastive_distill_loss(a, b, s, ta, tb, 1.5, backend="cuda")
    assert torch.autograd.gradcheck(fn, (a, b, s))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_non_finite_loss(bad):
    a, b, s = _inputs(300, 300, 32, torch.bfloat16)
    a[17, 3] = bad
    assert not torch.isfinite(contrastive_loss(a, b, s, backend="cuda"))


def test_automatic_backend_is_fused_for_large_problems(monkeypatch):
    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    large = C.GPU_FUSED_MIN_LOGITS
    fused = "triton" if C.unavailable_reason("triton", torch.device(DEV)) is None else "cuda"
    assert C.resolve_backend("contrastive_loss", None, torch.device(DEV), large, torch.bfloat16) == fused
    assert C.resolve_backend("contrastive_loss", None, torch.device(DEV), large, torch.float64) == "cuda"
    assert C.resolve_backend("contrastive_loss", None, torch.device(DEV), large - 1) == "torch"


def test_extra_memory_at_65536_rows_under_one_gib():
    torch.cuda.synchronize()
    a, b, s = _inputs(65536, 65536, 512, torch.bfloat16, s=10.0)
    a.requires_grad_(True)
    b.requires_grad_(True)
    s.requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    contrastive_loss(a, b, s, backend="cuda").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < (1 << 30), f"extra {extra / 2**20:.0f} MiB"
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all() and torch.isfinite(s.grad)


def test_torch_compile_with_inductor_on_gpu():
    a, b, s = _inputs(256, 256, 64, torch.bfloat16)

    def step(a, b, s):
        return contrastive_loss(a, b, s, backend="cuda")

    compiled = torch.compile(step, fullgraph=True)
    loss, grads = _grads(compiled, [a, b, s])
    ref, ref_grads = _grads(step, [a, b, s])
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
