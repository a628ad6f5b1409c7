"""Edge cases of the public ops across backends: integer label dtypes, 0-d scales, zero feature widths,
Python-number scales in the decoding adapter, and double backward through the fused backwards."""

from __future__ import annotations

import pytest
import torch

from famevil_fast.ops import (
    AdapterParams,
    CrossAttentionParams,
    context_key_values,
    contrastive_distill_loss,
    contrastive_loss,
    cross_attention_adapter,
    decoding,
    fused_adapter,
)
from famevil_fast.ops.contrastive import unavailable_reason

pytest.importorskip("triton")


def adapter_params(d: int, r: int, dtype: torch.dtype = torch.float32) -> AdapterParams:
    g = torch.Generator().manual_seed(1)

    def t(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    return AdapterParams(
        1 + t(d, scale=0.2), t(d, scale=0.2), t(r, d, scale=0.3), t(r), t(d, r, scale=0.3), t(d), t(1)
    )


def contrastive_backends() -> list[str]:
    return [b for b in ("torch", "cpu", "triton") if unavailable_reason(b, torch.device("cpu")) is None]


@pytest.mark.parametrize("backend", contrastive_backends())
def test_int32_labels_one_way(backend: str) -> None:
    a, b = torch.randn(5, 7), torch.randn(4, 7)
    labels = torch.tensor([0, 3, 3, 1, 0])
    for eps in (0.0, 0.1):
        want = contrastive_loss(
            a.double(), b.double(), 2.0, labels=labels, two_way=False, label_smoothing=eps
        )
        got = contrastive_loss(
            a, b, 2.0, labels=labels.int(), two_way=False, label_smoothing=eps, backend=backend
        )
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_dim_scale_matches_one_element_scale(backend: str) -> None:
    p = adapter_params(12, 5)
    x = torch.randn(2, 3, 12)
    grads = []
    for shape in ((), (1,)):
        scale = p.scale.reshape(shape).clone().requires_grad_()
        y = fused_adapter(x, *p[:6], scale, backend=backend)
        y.backward(torch.ones_like(y))
        grads.append((y.detach(), scale.grad))
    (y0, g0), (y1, g1) = grads
    torch.testing.assert_close(y0, y1)
    assert g0.shape == ()
    torch.testing.assert_close(g0.reshape(1), g1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adapter_with_linear_takes_a_python_number_scale(backend: str) -> None:
    p = adapter_params(12, 4)
    x, hidden = torch.randn(2, 1, 12), torch.randn(2, 1, 9)
    w, b = torch.randn(12, 9), torch.randn(12)
    with torch.no_grad():
        got = decoding.adapter_with_linear(x, p._replace(scale=0.5), hidden, w, b, [x], backend=backend)
        want = decoding.adapter_with_linear(
            x, p._replace(scale=torch.tensor([0.5])), hidden, w, b, [x], backend="torch"
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_feature_width_raises_value_error(backend: str) -> None:
    p0 = adapter_params(0, 4)
    with pytest.raises(ValueError, match="no features"):
        fused_adapter(torch.randn(3, 0), *p0, backend=backend)
    with pytest.raises(ValueError, match="no features"):
        decoding.layer_norm_linear_act(
            torch.randn(3, 0),
            torch.ones(0),
            torch.zeros(0),
            torch.randn(4, 0),
            torch.randn(4),
            backend=backend,
        )
    ln = (torch.ones(8), torch.zeros(8))
    attn = CrossAttentionParams(
        *ln, torch.ones(0), torch.zeros(0), torch.randn(8, 8), *ln[1:], torch.randn(16, 0), torch.zeros(16)
    )
    with pytest.raises(ValueError, match="no features"):
        context_key_values(torch.randn(2, 4, 0), attn, 2, backend=backend)
    with pytest.raises(ValueError, match="no features"):
        cross_attention_adapter(
            torch.randn(2, 3, 8), attn, adapter_params(8, 4), 2, context=torch.randn(2, 4, 0), backend=backend
        )


def test_linear_residual_with_zero_input_width() -> None:
    x, w, b, res = torch.randn(3, 1, 0), torch.randn(12, 0), torch.randn(12), torch.randn(3, 1, 12)
    got = decoding.linear_residual(x, w, b, res, backend="triton")
    torch.testing.assert_close(got, res + b)


def _second_order(loss_fn, inputs: list[torch.Tensor]) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss_fn(*inputs), inputs[0], create_graph=True)
    penalty = (g**2).sum() + (inputs[-1] ** 2).sum()
    return torch.autograd.grad(penalty, inputs[-1])[0]


@pytest.mark.parametrize("backend", [b for b in contrastive_backends() if b != "torch"])
def test_contrastive_double_backward_refused(backend: str) -> None:
    a, b = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        _second_order(lambda a, b: contrastive_loss(a, b, 2.0, backend=backend), [a, b])
    if backend == "cpu":  # distillation has no Triton kernel
        ta, tb = torch.randn(5, 3), torch.randn(5, 3)
        with pytest.raises(RuntimeError, match="double backward"):
            _second_order(
                lambda a, b: contrastive_distill_loss(a, b, 2.0, ta, tb, 3.0, backend=backend), [a, b]
            )
    torch.testing.assert_close(  # the plain backward is untouched
        torch.autograd.grad(contrastive_loss(a, b, 2.0, backend=backend), a)[0],
        torch.autograd.grad(contrastive_loss(a, b, 2.0, backend="torch"), a)[0],
    )


@pytest.mark.parametrize("backend", [b for b in contrastive_backends() if b != "torch"])
def test_create_graph_backward_not_differentiated_again_works(backend: str) -> None:
    """Only a second derivative through the fused gradients fails: a create_graph backward whose result is
    used as a value (or differentiated where it does not depend on them) gives the first derivative."""
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    w = torch.randn(7, requires_grad=True)
    grads = {}
    for name in (backend, "torch"):
        loss = contrastive_loss(a * w, b, 2.0, backend=name) + (w**2).sum()
        (grads[name],) = torch.autograd.grad(loss, w, create_graph=True)
    torch.testing.assert_close(grads[backend].detach(), grads["torch"].detach())
    x, p = torch.randn(3, 8, requires_grad=True), adapter_params(8, 4)
    (g,) = torch.autograd.grad(fused_adapter(x, *p, backend="triton").sum(), x, create_graph=True)
    torch.testing.assert_close(
        g.detach(), torch.autograd.grad(fused_adapter(x, *p, backend="torch").sum(), x)[0]
    )


def test_adapter_double_backward_refused() -> None:
    p = adapter_params(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        _second_order(lambda x: fused_adapter(x, *p, backend="triton").sum(), [x])


def test_frozen_adapter_under_create_graph_passes_the_residual_gradient() -> None:
    """A frozen adapter (nothing of it needs a gradient) stays usable inside a create_graph backward: its
    residual gradient is the identity, exact to any order."""
    p = adapter_params(8, 4)
    x = torch.randn(3, 8)
    res = torch.randn(3, 8, requires_grad=True)
    for backend in ("triton", "torch"):
        y = fused_adapter(x, *p, residual=res, backend=backend)
        (g,) = torch.autograd.grad((y**2).sum(), res, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), res)
        torch.testing.assert_close(h, torch.full_like(res, 2.0))


def test_triton_loss_with_targets_outside_the_kernel_is_first_order_only(monkeypatch) -> None:
    from famevil_fast.ops import contrastive_triton

    monkeypatch.setattr(contrastive_triton, "TARGETS_IN_KERNEL", False)
    a, b = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    (g,) = torch.autograd.grad(contrastive_loss(a, b, 2.0, backend="triton"), a, create_graph=True)
    torch.testing.assert_close(
        g.detach(), torch.autograd.grad(contrastive_loss(a, b, 2.0, backend="torch"), a)[0]
    )
    with pytest.raises(RuntimeError, match="double backward"):
        _second_order(lambda a, b: contrastive_loss(a, b, 2.0, backend="triton"), [a, b])
