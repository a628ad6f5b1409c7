"""The QuickGELU op: Triton kernels (interpreted on the CPU, compiled on a GPU) against the float64
PyTorch reference, forward and backward, on awkward sizes; argument checks; backend selection; the
torch.library registration; the model's MLPs on it.
"""

from __future__ import annotations

import pytest
import torch
from helpers import AtenLog, RecordLaunch

from famevil_fast.capture import static_shapes
from famevil_fast.ops import quick_gelu
from famevil_fast.ops.activation import quick_gelu_backend, quick_gelu_reference

pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def block() -> int:
    from famevil_fast.kernels import configs

    return configs.elementwise_tiles().block_m


def float64_result(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x64 = x.detach().double().requires_grad_()
    y = quick_gelu_reference(x64)
    (dx,) = torch.autograd.grad(y, x64, grad.double())
    return y.detach(), dx


def triton_result(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    y = quick_gelu(x, backend="triton")
    (dx,) = torch.autograd.grad(y, x, grad)
    return y.detach(), dx


def within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: float, atol: float = 0.0) -> None:
    """``got`` within ``ulps`` units in the last place of its dtype of the float64 ``want`` (subnormal
    spacing near zero), or within ``atol`` of it: the float32 arithmetic's own error where the result
    cancels to near zero (the gradient crosses zero at x = -0.75)."""
    info = torch.finfo(got.dtype)
    bound = ulps * info.eps * (want.abs() + info.smallest_normal) + atol
    worst = ((got.double() - want).abs() / bound).max().item()
    assert worst <= 1.0, f"{got.dtype}: off by {worst:.2f} of the bound"


def awkward_shapes() -> list[tuple[int, ...]]:
    """One element, a few, a 3-D activation, and sizes just past one and several kernel blocks."""
    n = block()
    return [(1,), (7,), (2, 3, 5), (197, 13), (n + 1,), (3, n + 5)]


@pytest.mark.parametrize("shape", awkward_shapes())
def test_float32_matches_float64_reference(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(shape, generator=g)
    grad = torch.randn(shape, generator=g)
    y, dx = triton_result(x, grad)
    want_y, want_dx = float64_result(x, grad)
    assert y.dtype == dx.dtype == torch.float32 and y.shape == dx.shape == x.shape
    torch.testing.assert_close(y.double(), want_y, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), want_dx, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_rounded_once(dtype: torch.dtype) -> None:
    """16-bit inputs: float32 arithmetic and one rounding on the store, so within an ulp of the exact value
    of the rounded inputs (the interpreter rounds bfloat16 toward zero, a GPU to nearest)."""
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(3, block() + 9, generator=g)).to(dtype)
    grad = torch.randn(x.shape, generator=g).to(dtype)
    y, dx = triton_result(x, grad)
    want_y, want_dx = float64_result(x, grad)
    assert y.dtype == dx.dtype == dtype
    within_ulps(y, want_y, 1)
    within_ulps(dx, want_dx, 1, atol=1e-6)


def test_empty_input() -> None:
    x = torch.empty(0, 5, requires_grad=True)
    y = quick_gelu(x, backend="triton")
    assert y.shape == (0, 5)
    (dx,) = torch.autograd.grad(y, x, torch.empty(0, 5))
    assert dx.shape == (0, 5)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_values_match_the_reference() -> None:
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 200.0, -200.0])
    torch.testing.assert_close(quick_gelu(x, backend="triton"), quick_gelu_reference(x), equal_nan=True)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_gradients_match_the_reference() -> None:
    """Non-finite inputs or incoming gradients give the reference's gradients, except an infinite incoming
    gradient at a large finite x, where the kernel gives the exact infinite product and the reference NaN
    (its second term multiplies the infinity by sigmoid's derivative, which rounds to zero there)."""
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, 200.0, -200.0, 3.0, 60.0])
    x.requires_grad_()
    grad = torch.tensor([1.0, 1.0, 1.0, float("nan"), 3.0, 2.0, float("inf"), float("inf")])
    (got,) = torch.autograd.grad(quick_gelu(x, backend="triton"), x, grad)
    (want,) = torch.autograd.grad(quick_gelu_reference(x), x, grad)
    torch.testing.assert_close(got[:-1], want[:-1], equal_nan=True)
    assert got[-1] == float("inf") and want[-1].isnan()  # at x = 3 both are infinite


def test_non_contiguous_input() -> None:
    x = torch.randn(40, 30).t().requires_grad_()
    grad = torch.randn(30, 40)
    y, dx = triton_result(x, grad)
    assert y.is_contiguous() and y.shape == (30, 40)
    want_y, want_dx = float64_result(x, grad)
    torch.testing.assert_close(y.double(), want_y, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(dx.double(), want_dx, rtol=2e-6, atol=1e-6)


def test_inference_launches_the_forward_kernel_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """No gradient wanted: one kernel and no autograd node, with grad mode on or off."""
    from famevil_fast.kernels import activation

    launches = RecordLaunch.patch(monkeypatch, activation)
    y = quick_gelu(torch.randn(4, 9), backend="triton")
    with torch.no_grad():
        z = quick_gelu(torch.randn(4, 9, requires_grad=True), backend="triton")
    assert launches == ["quick_gelu_fwd_kernel"] * 2 and y.grad_fn is None and z.grad_fn is None


def test_training_launches_one_kernel_each_way(monkeypatch: pytest.MonkeyPatch) -> None:
    from famevil_fast.kernels import activation

    launches = RecordLaunch.patch(monkeypatch, activation)
    x = torch.randn(4, 9, requires_grad=True)
    y = quick_gelu(x, backend="triton")
    torch.autograd.grad(y, x, torch.ones_like(y))
    assert launches == ["quick_gelu_fwd_kernel", "quick_gelu_bwd_kernel"]


def test_second_derivative_is_refused() -> None:
    x = torch.randn(5, requires_grad=True)
    (dx,) = torch.autograd.grad(quick_gelu(x, backend="triton").sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="quick_gelu: the fused backward cannot be differentiated again"):
        dx.sum().backward()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="quick_gelu: x must be a floating-point tensor, got torch.int64"):
        quick_gelu(torch.arange(3))
    with pytest.raises(TypeError, match="quick_gelu: x must be a tensor, got list"):
        quick_gelu([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quick_gelu: unknown backend 'cuda'"):
        quick_gelu(torch.randn(3), backend="cuda")
    with pytest.raises(ValueError, match="quick_gelu: backend 'triton' supports float32, float16 and"):
        quick_gelu(torch.randn(3, dtype=torch.float64), backend="triton")


def test_reference_backend_is_the_plain_expression() -> None:
    x = torch.randn(6, 7, dtype=torch.float64)
    assert torch.equal(quick_gelu(x, backend="torch"), x * torch.sigmoid(1.702 * x))


def test_registered_ops_pass_opcheck() -> None:
    from famevil_fast.kernels import custom_ops  # noqa: F401

    x = torch.randn(3, 11, requires_grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.famevil_fast.quick_gelu.default, (x,), test_utils=tests)
    grad = torch.randn(3, 11)
    backward = torch.ops.famevil_fast.quick_gelu_backward.default
    torch.library.opcheck(backward, (grad, x.detach()), test_utils=tests)


def test_registered_backward_refuses_a_gradient_of_another_shape() -> None:
    from famevil_fast.kernels import custom_ops  # noqa: F401

    with pytest.raises(ValueError, match=r"backward: grad \(\(3, 4\), torch.float32, cpu\) must match x"):
        torch.ops.famevil_fast.quick_gelu_backward(torch.randn(3, 4), torch.randn(4, 3))


def test_torch_compile_graph_holds_the_op() -> None:
    x = torch.randn(5, 33, requires_grad=True)

    def mlp_act(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(quick_gelu(2 * x, backend="triton"))

    compiled = torch.compile(mlp_act, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    (got,) = torch.autograd.grad(out.sum(), x)
    (want,) = torch.autograd.grad(mlp_act(x).sum(), x)
    torch.testing.assert_close(out, mlp_act(x))
    torch.testing.assert_close(got, want)


def test_a_dispatch_mode_sees_the_operator() -> None:
    """Under a dispatch mode (fake tensors, counters) the op is the registered operator, one call a way."""
    x = torch.randn(4, 4, requires_grad=True)
    with AtenLog() as log:
        y = quick_gelu(x, backend="triton")
        torch.autograd.grad(y, x, torch.ones_like(y))
    assert log.ops.count("quick_gelu") == 1 and log.ops.count("quick_gelu_backward") == 1, log.ops


def test_automatic_choice_on_a_gpu_is_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU (simulated: Triton runs and the tensor is taken for a CUDA one) the automatic choice keeps
    the reference, also for training activations in a graphed step, until a card has timed the kernels."""
    from famevil_fast.ops import _backend

    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_runs_on", lambda device: True)
    x = torch.randn(1 << 10, requires_grad=True)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda", 0)))
    with static_shapes():
        assert quick_gelu_backend(x) == "torch"
        assert quick_gelu_backend(x, "triton") == "triton"


def test_backend_selection_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(3)
    monkeypatch.setenv("FAMEVIL_FAST_BACKEND", "torch")  # as the tests' automatic choices are pinned
    assert quick_gelu_backend(x) == "torch"
    assert quick_gelu_backend(x, "triton") == "triton"
    monkeypatch.delenv("FAMEVIL_FAST_BACKEND")
    assert quick_gelu_backend(x) == "triton"  # the interpreter is on in the tests
    assert quick_gelu_backend(x, "torch") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert quick_gelu_backend(x) == "torch"


def test_model_mlps_take_the_runtime_backend() -> None:
    """``set_runtime(backend=...)`` reaches every QuickGELU, and the model's losses agree across backends."""
    from helpers import token_batch

    from famevil_fast.model import FameViL, FameViLConfig, clip_preset
    from famevil_fast.model.clip import QuickGELU

    torch.manual_seed(0)
    model = FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8))
    activations = [m for m in model.modules() if isinstance(m, QuickGELU)]
    assert activations
    size = model.config.clip.vision.image_size
    batch = {"pixels": torch.randn(3, 3, size, size), "input_ids": token_batch(3)}
    losses = {}
    for backend in ("torch", "triton"):
        model.set_runtime(backend=backend)
        assert {m.backend for m in activations} == {backend}
        losses[backend] = model(batch, "itc").loss
    torch.testing.assert_close(losses["triton"], losses["torch"], rtol=1e-5, atol=1e-5)
    model.set_runtime(
        backend="cuda"
    )  # the contrastive losses' kernels: the activations choose for themselves
    assert {m.backend for m in activations} == {None}


# ---------------------------------------------------------------- GPU: compiled kernels


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (12608, 3072), (4928, 2048), (3, 4099)])
def test_gpu_matches_float64_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (3 * torch.randn(shape, device="cuda", generator=g)).to(dtype)
    grad = torch.randn(shape, device="cuda", generator=g).to(dtype)
    y, dx = triton_result(x, grad)
    want_y, want_dx = float64_result(x, grad)
    if dtype == torch.float32:  # exp(-1.702 x) of a rounded product: about |1.702 x| ulp of y
        torch.testing.assert_close(y.double(), want_y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dx.double(), want_dx, rtol=1e-5, atol=1e-6)
    else:
        within_ulps(y, want_y, 1)
        within_ulps(dx, want_dx, 1, atol=1e-6)
