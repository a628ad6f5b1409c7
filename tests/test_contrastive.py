"""Contrastive losses: the compiled CPU backend against float64 references (values and gradients of a, b
and scale, every variant, awkward shapes), gradcheck, argument errors, non-finite inputs, backend choice,
and torch.compile."""

from __future__ import annotations

import pytest
import torch

from famevil_fast import _ext
from famevil_fast.ops import contrastive as C
from famevil_fast.ops.contrastive import (
    contrastive_distill_loss,
    contrastive_distill_loss_reference,
    contrastive_loss,
    contrastive_loss_reference,
)

needs_ext = pytest.mark.skipif(
    C.unavailable_reason("cpu", torch.device("cpu")) is not None, reason="compiled extension not built"
)

SQUARE = [(1, 1, 1), (37, 37, 19), (300, 300, 70)]
RECTANGULAR = [(1, 5, 3), (45, 300, 33), (300, 45, 17)]


def _grads(fn, tensors, **kw):
    """Loss and the gradients of every tensor in ``tensors`` (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves, **kw)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _assert_close_to_reference(fast_fn, ref_fn, tensors, rtol=1e-4, **kw):
    loss, grads = _grads(fast_fn, tensors, **kw)
    ref_loss, ref_grads = _grads(
        ref_fn, [t.double() for t in tensors], **{k: v for k, v in kw.items() if k != "backend"}
    )
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=rtol, atol=rtol)
    for g, r in zip(grads, ref_grads):
        scale = max(float(r.abs().max()), 1e-3)
        assert float((g.double() - r).abs().max()) <= rtol * scale * 10, (g, r)


def _inputs(m, n, d, s=4.0, normalize=True, dtype=torch.float32):
    a, b = torch.randn(m, d), torch.randn(n, d)
    if normalize:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    return a.to(dtype), b.to(dtype), torch.tensor(s)


def _groups(m, n, k=4):
    rg, cg = torch.randint(0, k, (m,)), torch.randint(0, k + 2, (n,))
    cg[0] = rg[0]  # at least one positive pair
    return rg, cg


# ---------------------------------------------------------------------------------------------------
# The reference's integer-target form against its soft-target form


def _soft_target_loss(a, b, s, labels=None, two_way=True, label_smoothing=0.0):
    """The general form: (M, N) positive mask and soft targets in both directions."""
    logits = s * (a @ b.T)
    pos = C.positive_mask(a.shape[0], b.shape[0], labels, None, a.device)
    loss = C._direction_reference(logits, pos, label_smoothing, False)
    if not two_way:
        return loss
    return 0.5 * (loss + C._direction_reference(logits.T, pos.T, label_smoothing, True))


@pytest.mark.parametrize("m,n,d", SQUARE + RECTANGULAR)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_one_positive_reference_equals_the_soft_target_form(m, n, d, smoothing):
    a, b, s = (t.double() for t in _inputs(m, n, d))
    s.requires_grad_(True)
    cases = [dict(labels=torch.randint(0, n, (m,)), two_way=False)]
    if m == n:
        cases += [dict(two_way=True), dict(two_way=False)]
    for kw in cases:
        loss, grads = _grads(contrastive_loss_reference, [a, b, s], label_smoothing=smoothing, **kw)
        want, want_grads = _grads(_soft_target_loss, [a, b, s], label_smoothing=smoothing, **kw)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# CPU backend against the float64 reference


@needs_ext
@pytest.mark.parametrize("m,n,d", SQUARE)
@pytest.mark.parametrize(
    "kw",
    [{}, {"two_way": False}, {"label_smoothing": 0.1}, {"label_smoothing": 0.2, "two_way": False}],
    ids=["two_way", "one_way", "smoothing", "smoothing_one_way"],
)
def test_diagonal_variants_match_reference(m, n, d, kw):
    a, b, s = _inputs(m, n, d)
    _assert_close_to_reference(contrastive_loss, contrastive_loss_reference, [a, b, s], backend="cpu", **kw)


@needs_ext
@pytest.mark.parametrize("m,n,d", RECTANGULAR + SQUARE[1:])
@pytest.mark.parametrize("two_way", [True, False])
def test_labels_match_reference(m, n, d, two_way):
    a, b, s = _inputs(m, n, d)
    labels = torch.randint(0, n, (m,))
    _assert_close_to_reference(
        contrastive_loss,
        contrastive_loss_reference,
        [a, b, s],
        backend="cpu",
        labels=labels,
        two_way=two_way,
        label_smoothing=0.05,
    )


@needs_ext
@pytest.mark.parametrize("m,n,d", RECTANGULAR + SQUARE[1:])
@pytest.mark.parametrize("two_way", [True, False])
def test_groups_match_reference(m, n, d, two_way):
    a, b, s = _inputs(m, n, d)
    _assert_close_to_reference(
        contrastive_loss,
        contrastive_loss_reference,
        [a, b, s],
        backend="cpu",
        groups=_groups(m, n),
        two_way=two_way,
        label_smoothing=0.1,
    )


@needs_ext
@pytest.mark.parametrize("m,n,d", RECTANGULAR + SQUARE)
@pytest.mark.parametrize("two_way", [True, False])
def test_distill_matches_reference(m, n, d, two_way):
    a, b, s = _inputs(m, n, d)
    ta, tb, _ = _inputs(m, n, d + 5)
    loss, grads = _grads(
        lambda a, b, s: contrastive_distill_loss(a, b, s, ta, tb, 7.0, two_way=two_way, backend="cpu"),
        [a, b, s],
    )
    ref, ref_grads = _grads(
        lambda a, b, s: contrastive_distill_loss_reference(
            a, b, s, ta.double(), tb.double(), 7.0, two_way=two_way
        ),
        [a.double(), b.double(), s.double()],
    )
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-3, atol=1e-5 * max(1.0, float(r.abs().max())))


@needs_ext
@pytest.mark.parametrize("scale", [0.0, -3.0, 100.0])
def test_extreme_scales_stay_finite_and_exact(scale):
    a, b, s = _inputs(70, 70, 24, s=scale, normalize=False)
    _assert_close_to_reference(contrastive_loss, contrastive_loss_reference, [a, b, s], backend="cpu")
    labels = torch.randint(0, 70, (70,))
    _assert_close_to_reference(
        contrastive_loss, contrastive_loss_reference, [a, b, s], backend="cpu", labels=labels
    )


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    a, b, s = _inputs(140, 140, 40, s=20.0, dtype=dtype)
    loss, grads = _grads(lambda a, b, s: contrastive_loss(a, b, s, backend="cpu"), [a, b, s])
    ref, ref_grads = _grads(contrastive_loss_reference, [a.double(), b.double(), s.double()])
    assert loss.dtype == torch.float32 and grads[0].dtype == dtype
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert float((g.double() - r).norm() / r.norm()) < 1e-2


@needs_ext
def test_float_scale_and_scale_without_grad():
    a, b, _ = _inputs(20, 20, 8)
    fast = contrastive_loss(a, b, 3.5, backend="cpu")
    torch.testing.assert_close(fast, contrastive_loss_reference(a, b, 3.5))


@needs_ext
def test_gradient_reaches_a_learnable_scale_through_a_function_of_it():
    a, b, _ = _inputs(30, 30, 8)
    log_s = torch.tensor(1.2, requires_grad=True)
    contrastive_loss(a, b, log_s.exp(), backend="cpu").backward()
    fast = log_s.grad.clone()
    log_s.grad = None
    contrastive_loss_reference(a.double(), b.double(), log_s.double().exp()).backward()
    torch.testing.assert_close(fast, log_s.grad.float(), rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# gradcheck (float64 runs the CPU kernel in float64)


@needs_ext
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"two_way": False, "label_smoothing": 0.3},
        {"labels": torch.tensor([2, 0, 0, 4, 1])},
        {"groups": (torch.tensor([0, 1, 1, 2, 0]), torch.tensor([1, 0, 3, 1, 2, 0]))},
    ],
    ids=["two_way", "one_way_smoothing", "labels", "groups"],
)
def test_gradcheck(kw):
    n = 6 if ("labels" in kw or "groups" in kw) else 5
    a = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, s: contrastive_loss(a, b, s, backend="cpu", **kw), (a, b, s))


@needs_ext
@pytest.mark.parametrize("two_way", [True, False])
def test_gradcheck_distill(two_way):
    a = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    ta, tb = torch.randn(4, 2, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    fn = lambda a, b, s: contrastive_distill_loss(a, b, s, ta, tb, 2.0, two_way=two_way, backend="cpu")
    assert torch.autograd.gradcheck(fn, (a, b, s))


# ---------------------------------------------------------------------------------------------------
# References


def test_reference_leaves_out_rows_without_positives():
    a, b, s = _inputs(4, 5, 3)
    groups = (torch.tensor([0, 1, 9, 9]), torch.tensor([0, 1, 1, 2, 3]))
    kept = contrastive_loss_reference(a[:2], b, s, groups=(groups[0][:2], groups[1]), two_way=False)
    torch.testing.assert_close(contrastive_loss_reference(a, b, s, groups=groups, two_way=False), kept)


def test_reference_single_positive_groups_equal_labels():
    a, b, s = _inputs(6, 6, 4)
    perm = torch.randperm(6)
    by_labels = contrastive_loss_reference(a, b, s, labels=perm)
    by_groups = contrastive_loss_reference(a, b, s, groups=(perm, torch.arange(6)))
    torch.testing.assert_close(by_labels, by_groups)


def test_reference_matches_open_clip_clip_loss():
    open_clip_loss = pytest.importorskip("open_clip.loss")
    a, b, _ = _inputs(16, 16, 8)
    expected = open_clip_loss.ClipLoss()(a, b, logit_scale=torch.tensor(10.0))
    torch.testing.assert_close(contrastive_loss_reference(a, b, 10.0), expected)


# ---------------------------------------------------------------------------------------------------
# Bad input


def _bad_cases():
    r, t = torch.randn, torch.tensor
    two = (t([0, 1]), t([2, 3]))
    return [
        (lambda: (r(4, 3), r(4, 5), {}), "feature sizes differ"),
        (lambda: (r(4, 3), r(4, 3, dtype=torch.float64), {}), "different dtypes"),
        (lambda: (r(0, 3), r(0, 3), {}), "empty input"),
        (lambda: (r(4), r(4), {}), "must be 2-D"),
        (lambda: (torch.randint(0, 3, (4, 3)), torch.randint(0, 3, (4, 3)), {}), "float16, bfloat16"),
        (lambda: (r(4, 3), r(5, 3), {}), "same number of rows"),
        (lambda: (r(4, 3), r(5, 3), {"labels": t([0, 1, 5, 2])}), r"\[0, 5\)"),
        (lambda: (r(4, 3), r(5, 3), {"labels": t([0, -1, 2, 2])}), r"\[0, 5\)"),
        (lambda: (r(4, 3), r(5, 3), {"labels": t([0.0, 1, 2, 2])}), "int32 or int64"),
        (lambda: (r(4, 3), r(5, 3), {"labels": t([0, 1])}), r"shape \(4,\)"),
        (lambda: (r(4, 3), r(5, 3), {"groups": (torch.arange(4), torch.arange(4))}), r"\(5,\)"),
        (lambda: (r(2, 3), r(2, 3), {"groups": two}), "no positive pair"),
        (lambda: (r(4, 3), r(4, 3), {"label_smoothing": 1.0}), "label_smoothing"),
        (
            lambda: (r(4, 3), r(4, 3), {"labels": torch.arange(4), "groups": (torch.arange(4),) * 2}),
            "not both",
        ),
        (lambda: (r(4, 3), r(4, 3, device="meta"), {}), "different devices"),
    ]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("make,match", _bad_cases())
def test_bad_input_raises_value_error(make, match, backend):
    a, b, kw = make()
    with pytest.raises(ValueError, match=match):
        contrastive_loss(a, b, 1.0, backend=backend, **kw)


@pytest.mark.parametrize(
    "scale,match",
    [(torch.ones(2), "one-element"), ("x", "float or a one-element"), (torch.tensor(1), "floating")],
)
def test_bad_scale(scale, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(torch.randn(3, 2), torch.randn(3, 2), scale, backend="torch")


def test_bad_distill_input():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="teacher and student batches differ"):
        contrastive_distill_loss(a, b, 1.0, torch.randn(3, 2), torch.randn(5, 2), 1.0, backend="torch")
    with pytest.raises(ValueError, match="teacher_a and teacher_b"):
        contrastive_distill_loss(a, b, 1.0, torch.randn(4, 2), torch.randn(5, 3), 1.0, backend="torch")


def test_unknown_and_unavailable_backends():
    a, b = torch.randn(3, 2), torch.randn(3, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        contrastive_loss(a, b, 1.0, backend="bogus")
    with pytest.raises(ValueError, match="cannot run"):
        contrastive_loss(a, b, 1.0, backend="cuda")


@needs_ext
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_give_non_finite_loss(backend, bad):
    a, b, s = _inputs(40, 40, 6)
    a[3, 2] = bad
    assert not torch.isfinite(contrastive_loss(a, b, s, backend=backend))
    assert not torch.isfinite(
        contrastive_loss(a, b, s, labels=torch.arange(40).flip(0), two_way=False, backend=backend)
    )
    assert not torch.isfinite(contrastive_distill_loss(b, b, s, a, b, 1.0, backend=backend))


# ---------------------------------------------------------------------------------------------------
# Backend choice


def test_automatic_backend_choice(monkeypatch):
    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    expected = "cpu" if _ext.cpu_ext_available() else "torch"
    assert C.resolve_backend("contrastive_loss", None, torch.device("cpu")) == expected
    monkeypatch.setenv("FAMEVIL_FAST_BACKEND", "torch")
    assert C.resolve_backend("contrastive_loss", None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("FAMEVIL_FAST_BACKEND", "blocked")  # names no contrastive backend: automatic choice
    assert C.resolve_backend("contrastive_loss", None, torch.device("cpu")) == expected
    monkeypatch.setenv("FAMEVIL_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FAMEVIL_FAST_BACKEND='cuda' cannot run"):
        C.resolve_backend("contrastive_loss", None, torch.device("cpu"))
    assert C.resolve_backend("contrastive_loss", "torch", torch.device("cpu")) == "torch"


def test_automatic_choice_on_the_cpu_keeps_small_problems_on_the_reference(monkeypatch):
    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    cpu, threshold = torch.device("cpu"), C.CPU_FUSED_MIN_LOGITS
    fused = "cpu" if C.unavailable_reason("cpu", cpu) is None else "torch"
    assert C.resolve_backend("contrastive_loss", None, cpu, threshold - 1, torch.float32) == "torch"
    assert C.resolve_backend("contrastive_loss", None, cpu, threshold, torch.float32) == fused
    assert C.resolve_backend("contrastive_distill_loss", None, cpu, threshold, torch.float64) == fused


def test_automatic_choice_on_a_gpu_keeps_small_problems_on_the_reference(monkeypatch):
    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    small = C.GPU_FUSED_MIN_LOGITS - 1
    assert C.resolve_backend("contrastive_loss", None, torch.device("cuda"), small) == "torch"
    assert C.resolve_backend("contrastive_loss", None, torch.device("cpu"), small) != "torch" or (
        C.unavailable_reason("cpu", torch.device("cpu")) is not None
    )


@pytest.mark.parametrize("available", [("triton", "cuda"), ("cuda",), ("triton",), ()])
def test_automatic_choice_on_a_gpu_for_large_problems(monkeypatch, available):
    """Triton where it runs and the op and dtype have a kernel, else the CUDA kernel, else the reference."""
    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    monkeypatch.setattr(C, "unavailable_reason", lambda name, device: None if name in available else "no")
    gpu, large = torch.device("cuda"), C.GPU_FUSED_MIN_LOGITS

    def choice(dtype=torch.bfloat16, triton=True):
        return C._automatic_backend(gpu, large, dtype, triton)

    fallback = "cuda" if "cuda" in available else "torch"
    assert choice() == ("triton" if "triton" in available else fallback)
    assert C.resolve_backend("contrastive_loss", None, gpu, large, torch.float32) == choice(torch.float32)
    assert choice(torch.float64) == fallback  # no float64 Triton kernel
    assert choice(triton=False) == fallback  # distillation has no Triton kernel
    assert C._automatic_backend(gpu, large - 1, torch.bfloat16) == "torch"


@pytest.mark.parametrize("available", [("triton", "cuda"), ("cuda",)])
def test_automatic_choice_inside_a_graphed_training_step(monkeypatch, available):
    """In a training step captured as a CUDA graph (static shapes, autograd on) the Triton loss starts at
    GPU_FUSED_MIN_LOGITS_IN_GRAPH logits; not under no_grad, not for an op or dtype without a Triton kernel,
    and not where Triton does not run."""
    from famevil_fast.capture import static_shapes

    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    monkeypatch.setattr(C, "unavailable_reason", lambda name, device: None if name in available else "no")
    gpu, mid = torch.device("cuda"), C.GPU_FUSED_MIN_LOGITS_IN_GRAPH
    assert mid < C.GPU_FUSED_MIN_LOGITS
    assert C._automatic_backend(gpu, mid, torch.bfloat16) == "torch"
    with static_shapes():
        fused = "triton" if "triton" in available else "torch"
        assert C._automatic_backend(gpu, mid, torch.bfloat16) == fused
        assert C._automatic_backend(gpu, mid - 1, torch.bfloat16) == "torch"
        assert C._automatic_backend(gpu, mid, torch.float64) == "torch"
        assert C._automatic_backend(gpu, mid, torch.bfloat16, triton=False) == "torch"
        with torch.no_grad():
            assert C._automatic_backend(gpu, mid, torch.bfloat16) == "torch"


def test_explicit_backend_needs_matching_device():
    reason = C.unavailable_reason("cpu", torch.device("meta"))
    assert reason is not None


# ---------------------------------------------------------------------------------------------------
# Operators: schema, fake kernels, torch.compile


@needs_ext
def test_operator_schema_and_fake_kernels():
    a, b, s = _inputs(9, 11, 5)
    rk, ck = torch.randint(0, 3, (9,), dtype=torch.int32), torch.randint(0, 3, (11,), dtype=torch.int32)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    torch.library.opcheck(
        torch.ops.famevil_fast.contrastive_stats.default, (a, b, s, rk, ck, True), test_utils=utils
    )
    torch.library.opcheck(
        torch.ops.famevil_fast.contrastive_stats.default, (a, b, s, rk, ck, False), test_utils=utils
    )
    ta, tb = torch.randn(9, 4), torch.randn(11, 4)
    torch.library.opcheck(
        torch.ops.famevil_fast.contrastive_distill_stats.default, (a, b, s, ta, tb, s, True), test_utils=utils
    )


@needs_ext
def test_statistics_definition():
    """Row statistics are (log-sum-exp, positive sum, plain sum) of the logits."""
    a, b, s = _inputs(33, 29, 7)
    rk, ck = torch.randint(0, 4, (33,), dtype=torch.int32), torch.randint(0, 4, (29,), dtype=torch.int32)
    rows, cols = torch.ops.famevil_fast.contrastive_stats(a, b, s, rk, ck, True)
    logits = s * (a.double() @ b.double().T)
    pos = rk[:, None] == ck[None, :]
    for stats, lg, p in ((rows, logits, pos), (cols, logits.T, pos.T)):
        torch.testing.assert_close(stats[0].double(), lg.logsumexp(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[1].double(), (lg * p).sum(1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats[2].double(), lg.sum(1), rtol=1e-5, atol=1e-5)


@needs_ext
def test_torch_compile_traces_the_fused_loss():
    a, b, s = _inputs(50, 50, 16)
    s.requires_grad_(True)

    def step(a, b, s):
        return contrastive_loss(a, b, s, backend="cpu") + 0.5 * contrastive_loss(
            a, b, s, two_way=False, backend="cpu"
        )

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, grads = _grads(compiled, [a, b, s])
    ref, ref_grads = _grads(step, [a, b, s])
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@needs_ext
@pytest.mark.slow
def test_backend_choice_traces_without_graph_breaks() -> None:
    """The availability checks run inside compiled graphs (fullgraph) without calling into _C."""

    def pick(x: torch.Tensor) -> torch.Tensor:
        cuda = _ext.cuda_ext_available() and C.unavailable_reason("cuda", torch.device("cuda")) is None
        return x + 1 if cuda else x - 1

    x = torch.zeros(3)
    torch.testing.assert_close(torch.compile(pick, backend="eager", fullgraph=True)(x), pick(x))


def test_torch_compile_with_inductor_on_cpu():
    a, b, s = _inputs(64, 64, 16)
    s.requires_grad_(True)

    def step(a, b, s):
        return contrastive_loss(a, b, s, label_smoothing=0.1, backend="cpu")

    loss, grads = _grads(torch.compile(step, fullgraph=True), [a, b, s])
    ref, ref_grads = _grads(step, [a, b, s])
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def _capture_inputs():
    a = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1).requires_grad_()
    groups = (torch.tensor([0, 0, 1, 2, 2, 3]), torch.tensor([0, 1, 1, 2, 3, 3]))
    return a, b, {"labels": torch.tensor([1, 0, 2, 3, 5, 4]), "groups": groups}


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=needs_ext)])
@pytest.mark.parametrize("kind", ["labels", "groups"])
def test_variants_with_several_or_no_positives_are_capture_safe(backend, kind):
    """No host read-back or data-sized tensor (boolean selection, torch.unique) under capture, and the
    same loss and gradients as outside it."""
    from famevil_fast.capture import simulated_capture

    a, b, kws = _capture_inputs()
    kw = {"scale": 3.0, kind: kws[kind], "two_way": True, "label_smoothing": 0.1, "backend": backend}
    outside, outside_grads = _grads(contrastive_loss, [a, b], **kw)
    with simulated_capture():
        inside, inside_grads = _grads(contrastive_loss, [a, b], **kw)
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    for got, want in zip(inside_grads, outside_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_positive_keys_number_groups_as_torch_unique_does():
    row = torch.tensor([7, -3, 7, 100, 2**40, -3], dtype=torch.int64)
    col = torch.tensor([2**40, 5, -3, 7])
    ids = torch.unique(torch.cat([row, col]), return_inverse=True)[1]
    torch.testing.assert_close(C.dense_ranks(torch.cat([row, col])), ids, rtol=0, atol=0)
    row_key, col_key, row_counts, col_counts = C.positive_keys(6, 4, None, (row, col), row.device)
    assert row_key.dtype == col_key.dtype == torch.int32
    assert torch.equal(row_key.long(), ids[:6]) and torch.equal(col_key.long(), ids[6:])
    pos = row[:, None] == col[None, :]
    assert torch.equal(row_counts, pos.sum(1)) and torch.equal(col_counts, pos.sum(0))


@pytest.mark.skipif(not _ext.cpu_ext_available(), reason="needs the compiled CPU extension")
def test_compiled_backward_ops_check_their_statistics_and_gradients():
    """Called directly, the backward operators refuse statistics or gradients of the wrong shape, dtype or
    size with a ValueError naming them, before any kernel reads past them."""
    ops = torch.ops.famevil_fast
    a, b, s = torch.randn(30, 8), torch.randn(20, 8), torch.tensor(3.0)
    rk, ck = torch.arange(30, dtype=torch.int32), torch.arange(20, dtype=torch.int32)
    rows, cols = ops.contrastive_stats(a, b, s, rk, ck, True)
    good = (torch.ones(3, 30), torch.ones(3, 20), a, b, s, rk, ck, rows, cols, True)
    ops.contrastive_stats_backward(*good)
    cases = [
        ({0: torch.randn(0)}, "grad_rows must have shape \\(3, 30\\)"),
        ({1: torch.empty(3, 0)}, "grad_cols must have shape \\(3, 20\\)"),
        ({8: torch.empty(3, 0)}, "col_stats must have shape \\(3, 20\\)"),
        ({7: rows[:1]}, "rows must have shape \\(3, 30\\)"),
        ({7: rows.double()}, "rows must be Float"),
    ]
    for changed, message in cases:
        args = list(good)
        for index, value in changed.items():
            args[index] = value
        with pytest.raises(ValueError, match=message):
            ops.contrastive_stats_backward(*args)
    ta, tb, ts = torch.randn(30, 8), torch.randn(20, 8), torch.tensor(2.0)
    drows, dcols = ops.contrastive_distill_stats(a, b, s, ta, tb, ts, True)
    with pytest.raises(ValueError, match="grad_cols must have shape \\(3, 20\\)"):
        ops.contrastive_distill_stats_backward(
            torch.ones(3, 30), torch.ones(1, 1), a, b, s, ta, tb, ts, drows, dcols, True
        )


def test_a_missing_build_is_named_as_such():
    import subprocess
    import sys

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'famevil_fast._C':\n"
        "            raise ModuleNotFoundError(\"No module named 'famevil_fast._C'\", name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import warnings; warnings.simplefilter('ignore')\n"
        "from famevil_fast import _ext\n"
        "print(_ext.import_error())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "not built"


@pytest.mark.parametrize("distill", [False, True])
def test_the_torch_reference_keeps_float32_logits_under_autocast(distill):
    """The trainer computes its losses under bf16 autocast: the reference's logits, loss and gradients stay
    those of float32 (autocast would run its products in bf16, about 1% off in the gradients at s^2 = 100)."""
    gen = torch.Generator().manual_seed(0)
    a, b, ta, tb = (
        torch.nn.functional.normalize(torch.randn(33, 64, generator=gen), dim=1) for _ in range(4)
    )

    def loss_and_grads(autocast):
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        scale = torch.tensor(100.0, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # the forward, as the trainer's
            if distill:
                loss = contrastive_distill_loss(x, y, scale, ta, tb, 100.0, backend="torch")
            else:
                loss = contrastive_loss(x, y, scale, backend="torch")
        loss.backward()
        return loss.detach(), x.grad, y.grad, scale.grad

    plain, mixed = loss_and_grads(False), loss_and_grads(True)
    assert mixed[0].dtype == torch.float32
    for got, want in zip(mixed, plain):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
