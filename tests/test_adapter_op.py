"""The fused adapter op: Triton kernels (interpreted on the CPU, compiled on a GPU) against the float64
PyTorch reference, output and every gradient, on awkward shapes; mixed-task batches; argument checks;
backend selection; the torch.library registration.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import AtenLog, RecordLaunch, assert_no_worse_than_baseline

from famevil_fast.ops import AdapterParams, fused_adapter
from famevil_fast.ops.adapter import adapter_reference

pytest.importorskip("triton")

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
    threadpool_limits = None

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """The interpreter multiplies small tiles; extra BLAS threads only contend on a busy machine."""
    with threadpool_limits(1) if threadpool_limits else contextlib.nullcontext():
        yield


def random_params(d: int, r: int, tasks: int | None = None, device: str = "cpu") -> AdapterParams:
    """float64 parameters with every term non-zero (a zero up-projection would hide most of the math)."""
    lead = () if tasks is None else (tasks,)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*lead, *shape, dtype=torch.float64, device=device)

    ln = (1 + 0.2 * rnd(d), 0.2 * rnd(d))
    down = (rnd(r, d) / d**0.5, 0.2 * rnd(r))
    up = (rnd(d, r) / r**0.5, 0.2 * rnd(d))
    return AdapterParams(*ln, *down, *up, 1 + 0.2 * rnd(1))


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to max(1, max |expected|)."""
    diff = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    return diff / max(1.0, expected.abs().max().item() if expected.numel() else 0.0)


def residual_arg(leaves: list[torch.Tensor], n_residuals: int | None):
    """The residual argument from the leaves after x and the 7 parameters: None, one tensor, or a list."""
    if n_residuals is None:
        return None
    return leaves[8] if n_residuals == 1 else leaves[8:]


def compare(
    x: torch.Tensor,
    params: AdapterParams,
    n_residuals: int | None,
    task_ids: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    tol: float = 1e-4,
    param_dtype: torch.dtype | None = None,
    against_torch: bool = False,
) -> dict[str, torch.Tensor]:
    """Run the Triton op in ``dtype`` and the float64 reference on the same values (inputs rounded to the
    op's dtypes first), forward and backward; assert every output and gradient agrees; return the Triton
    gradients by name. ``against_torch``: instead of the fixed ``tol``, every error must be within 1.5x that
    of the PyTorch path run in the same dtype (for bf16, see ``assert_no_worse_than_baseline``)."""
    pdt = param_dtype or dtype
    residuals = [torch.randn_like(x) for _ in range(n_residuals or 0)]
    kinds = [dtype] + [pdt] * 7 + [dtype] * len(residuals)
    values = [t.to(kind).double() for kind, t in zip(kinds, (x, *params, *residuals))]
    ref_leaves = [t.requires_grad_() for t in values]
    ref = adapter_reference(
        ref_leaves[0], AdapterParams(*ref_leaves[1:8]), residual_arg(ref_leaves, n_residuals), task_ids
    )
    grad = torch.randn_like(ref).to(dtype).double()
    ref.backward(grad)

    leaves = [t.detach().to(kind).requires_grad_() for kind, t in zip(kinds, ref_leaves)]
    res = residual_arg(leaves, n_residuals)
    out = fused_adapter(leaves[0], *leaves[1:8], residual=res, task_ids=task_ids, backend="triton")
    assert out.dtype == dtype and out.shape == x.shape
    out.backward(grad.to(dtype))
    names = ["x", *AdapterParams._fields] + [f"residual{i}" for i in range(len(residuals))]
    if against_torch:
        base_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        base_res = residual_arg(base_leaves, n_residuals)
        base = fused_adapter(*base_leaves[:8], residual=base_res, task_ids=task_ids, backend="torch")
        base.backward(grad.to(dtype))
        assert_no_worse_than_baseline("output", out, base, ref)
        for name, mine, theirs, baseline in zip(names, leaves, ref_leaves, base_leaves):
            assert_no_worse_than_baseline(f"d{name}", mine.grad, baseline.grad, theirs.grad)
    else:
        assert scaled_error(out, ref) < tol, f"output error {scaled_error(out, ref):.2e}"
    grads = {}
    for name, mine, theirs in zip(names, leaves, ref_leaves):
        assert mine.grad is not None, name
        assert mine.grad.dtype == mine.dtype, name
        err = scaled_error(mine.grad, theirs.grad)
        assert against_torch or err < tol, f"d{name} error {err:.2e}"
        grads[name] = mine.grad
    return grads


@pytest.mark.parametrize(
    ("shape", "r", "n_residuals"),
    [
        ((1, 768), 512, 4),  # one row; bottleneck through memory; more residual terms than kernel slots
        ((7, 1, 512), 8, 3),  # the block's a + MLP + XAA residual sum
        ((1, 197, 768), 100, 1),  # r not a power of two, a single residual tensor
        ((1000, 512), 64, None),  # adapter output alone
    ],
)
def test_matches_float64_reference(shape: tuple[int, ...], r: int, n_residuals: int | None) -> None:
    x = torch.randn(*shape, dtype=torch.float64) * 1.5 + 0.3
    compare(x, random_params(shape[-1], r), n_residuals)


@pytest.mark.parametrize(
    ("shape", "r", "dtype", "tol", "mean"),
    [
        ((1, 768), 64, torch.float32, 1e-4, 0.3),  # one row
        ((2, 197, 512), 100, torch.float32, 1e-4, 0.3),  # r not a power of two
        ((37, 200), 8, torch.float32, 1e-4, 30.0),  # rows whose mean is 60x their spread
        ((33, 512), 64, torch.float16, 5e-3, 0.3),
    ],
)
def test_one_pass_layer_norm_matches_reference(
    monkeypatch: pytest.MonkeyPatch,
    shape: tuple[int, ...],
    r: int,
    dtype: torch.dtype,
    tol: float,
    mean: float,
) -> None:
    """The fused forward's one-pass LayerNorm (statistics gathered during the down projection of the raw
    rows), forward and backward against float64, where ``configs.ADAPTER_ONE_PASS_LN`` switches it on."""
    from famevil_fast.kernels import configs

    monkeypatch.setattr(configs, "ADAPTER_ONE_PASS_LN", True)
    assert configs.one_pass_layer_norm(dtype)
    x = torch.randn(*shape, dtype=torch.float64) * 0.5 + mean
    compare(x, random_params(shape[-1], r), 2, dtype=dtype, tol=tol)


@pytest.mark.parametrize("mean", [0.3, 20.0])
def test_one_pass_layer_norm_in_bfloat16(monkeypatch: pytest.MonkeyPatch, mean: float) -> None:
    """In bf16 the one-pass form rounds W' = Wd diag(g) once (as autocast rounds Wd), where the interpreter's
    two-pass form keeps everything in float32, so the bottleneck activation is checked for what the kernel
    owes: exactly ``relu(rstd (x - mean) W'^T + c)`` for the stored W' (the subtraction of the mean is exact
    up to float32 accumulation, even for rows whose mean is 40x their spread), and an output within twice
    the error of PyTorch's own bf16 adapter."""
    from famevil_fast.kernels import configs, launch

    monkeypatch.setattr(configs, "ADAPTER_ONE_PASS_LN", True)
    x64 = torch.randn(33, 512, dtype=torch.float64) * 0.5 + mean
    params = tuple(t.to(torch.bfloat16) for t in random_params(512, 128))
    x = x64.to(torch.bfloat16)
    y, h, _, _ = launch.adapter_forward(x, params, [], launch.SINGLE_TASK, True, 1e-5)
    ws, v, c = launch._scaled_down_weights(params, torch.bfloat16, 1)
    torch.testing.assert_close(v[0], ws[0].float().sum(dim=1), rtol=1e-6, atol=1e-6)  # sums of the stored W'
    rows = F.layer_norm(x.double(), (512,), eps=1e-5)  # float64 statistics of the bf16 rows
    expected_h = torch.relu(rows @ ws[0].double().T + c[0].double())
    torch.testing.assert_close(h.double(), expected_h, rtol=1e-4, atol=1e-4)
    p64 = [t.double() for t in params]
    want = adapter_reference(x.double(), AdapterParams(*p64))
    torch_y = adapter_reference(x, AdapterParams(*params))
    assert scaled_error(y, want) <= 2 * scaled_error(torch_y, want) + 1e-3


def test_one_pass_layer_norm_with_mixed_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    from famevil_fast.kernels import configs

    monkeypatch.setattr(configs, "ADAPTER_ONE_PASS_LN", True)
    tasks, n, d = 3, 70, 256
    task_ids = torch.tensor([0, 2])[torch.randint(0, 2, (n,))]  # task 1 absent
    grads = compare(torch.randn(n, d, dtype=torch.float64), random_params(d, 24, tasks), 1, task_ids)
    assert all(torch.count_nonzero(grads[name][1]) == 0 for name in AdapterParams._fields)


@pytest.mark.parametrize(("n", "d", "r"), [(13, 200, 24), (5, 1024, 128), (9, 96, 129)])
def test_other_widths(n: int, d: int, r: int) -> None:
    """Widths that leave partial chunks, the widest on-chip bottleneck, the narrowest split one."""
    compare(torch.randn(n, d, dtype=torch.float64), random_params(d, r), 2)


@pytest.mark.parametrize("r", [64, 160])
def test_mixed_task_batch_with_an_absent_task(r: int) -> None:
    tasks, n, d = 3, 150, 512
    task_ids = torch.tensor([0, 2])[torch.randint(0, 2, (n,))]  # task 1 absent
    grads = compare(torch.randn(n, d, dtype=torch.float64), random_params(d, r, tasks), 2, task_ids)
    for name in AdapterParams._fields:
        assert torch.count_nonzero(grads[name][1]) == 0, f"absent task got a {name} gradient"
        assert torch.count_nonzero(grads[name][0]) > 0 and torch.count_nonzero(grads[name][2]) > 0


def test_mixed_task_batch_with_zero_length_groups() -> None:
    """Only the last of four tasks has rows: the three others form empty groups."""
    tasks, n, d, r = 4, 10, 512, 16
    x = torch.randn(n, d, dtype=torch.float64)
    grads = compare(x, random_params(d, r, tasks), 1, torch.full((n,), 3))
    for name in AdapterParams._fields:
        assert torch.count_nonzero(grads[name][:3]) == 0


@pytest.mark.parametrize("task_ids", [None, torch.zeros(0, dtype=torch.long)])
def test_empty_input(task_ids: torch.Tensor | None) -> None:
    tasks = None if task_ids is None else 2
    params = [p.float().requires_grad_() for p in random_params(512, 64, tasks)]
    x = torch.zeros(0, 512, requires_grad=True)
    res = torch.zeros(0, 512)
    out = fused_adapter(x, *params, residual=res, task_ids=task_ids, backend="triton")
    assert out.shape == (0, 512)
    out.sum().backward()
    assert x.grad.shape == (0, 512)
    for p in params:
        assert torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("r", [64, 136])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_inputs(dtype: torch.dtype, tol: float, r: int) -> None:
    """fp16/bf16 storage with fp32 accumulation (bf16 products run in fp32 under the interpreter); r = 136
    takes the split path, whose weight-gradient products read h and xhat stored in the input dtype."""
    compare(torch.randn(33, 512, dtype=torch.float64), random_params(512, r), 1, dtype=dtype, tol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_split_backward_with_h_in_the_activation_dtype(monkeypatch: pytest.MonkeyPatch, dtype) -> None:
    """The GPU's split backward: the dp kernel also writes h in the activation dtype, which the up
    projection's weight-gradient product reads (forced here on the CPU). Rounding h there makes the scale's
    gradient, a sum of many cancelling terms, the least accurate: float16 is checked at its tolerance, and
    bfloat16 gradients must stay close to those of the float32 h."""
    from famevil_fast.kernels import launch

    x = torch.randn(33, 512, dtype=torch.float64)
    if dtype == torch.float16:
        monkeypatch.setattr(launch, "rounds_h_for_products", lambda x: True)
        compare(x, random_params(512, 136), 1, dtype=dtype, tol=5e-3)
        return
    torch.manual_seed(1)
    exact = compare(x, random_params(512, 136), 1, dtype=dtype, tol=3e-2)
    monkeypatch.setattr(launch, "rounds_h_for_products", lambda x: True)
    torch.manual_seed(1)
    rounded = compare(x, random_params(512, 136), 1, dtype=dtype, tol=3e-2)
    for name, grad in rounded.items():
        if name in ("up_weight", "scale"):  # the gradients that read the rounded h
            assert scaled_error(grad, exact[name]) < 2e-2, name
        else:
            assert torch.equal(grad, exact[name]), name


@pytest.mark.parametrize("r", [48, 144])
def test_float32_parameters_with_bfloat16_activations(r: int) -> None:
    grads = compare(
        torch.randn(9, 512, dtype=torch.float64),
        random_params(512, r),
        1,
        dtype=torch.bfloat16,
        param_dtype=torch.float32,
        tol=3e-2,
    )
    assert grads["down_weight"].dtype == torch.float32


def test_non_contiguous_inputs_match_contiguous() -> None:
    d, r = 512, 32
    p = [t.float() for t in random_params(d, r)]
    x = torch.randn(d, 11).t()  # (11, d), column-major
    down_t = p[2].t().contiguous().t()  # same values, transposed strides
    res = torch.randn(11, 2 * d)[:, ::2]
    out = fused_adapter(x, p[0], p[1], down_t, *p[3:], residual=res, backend="triton")
    want = fused_adapter(x.contiguous(), *p, residual=res.contiguous(), backend="triton")
    torch.testing.assert_close(out, want)


def test_inference_saves_nothing_and_matches() -> None:
    p = [t.float() for t in random_params(512, 64)]
    x = torch.randn(5, 512)
    with torch.no_grad():
        out = fused_adapter(x, *p, backend="triton")
    torch.testing.assert_close(out, fused_adapter(x, *p, backend="torch"))


def test_residual_gradient_alone() -> None:
    """Only a residual term requires a gradient: it receives the output gradient unchanged."""
    p = [t.float() for t in random_params(512, 16)]
    x = torch.randn(4, 512)
    res = torch.randn(4, 512, requires_grad=True)
    grad = torch.randn(4, 512)
    fused_adapter(x, *p, residual=[res], backend="triton").backward(grad)
    torch.testing.assert_close(res.grad, grad)


def bad_call(**overrides) -> None:
    p = {k: v.float() for k, v in random_params(64, 8)._asdict().items()}
    args = {"x": torch.randn(3, 64), **p, "backend": "triton"}
    args.update(overrides)
    fused_adapter(**args)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"residual": torch.randn(3, 64, dtype=torch.float64)}, "residual\\[0\\] has dtype"),
        ({"residual": [torch.randn(3, 64), torch.randn(3, 65)]}, "residual\\[1\\] has shape"),
        ({"up_bias": torch.randn(64, device="meta")}, "up_bias is on meta"),
        ({"scale": torch.ones(1, dtype=torch.float64)}, "mix dtypes"),
        ({"x": torch.randn(3, 64, dtype=torch.float64)}, "supports float32, float16 and bfloat16"),
        ({"down_weight": torch.randn(8, 63)}, "down_weight has shape"),
        ({"task_ids": torch.tensor([0, 1, 0])}, "ln_weight has shape"),
        ({"backend": "cuda"}, "unknown backend"),
    ],
)
def test_bad_arguments_raise_value_error(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bad_call(**overrides)


def test_non_tensor_arguments_raise_type_error() -> None:
    with pytest.raises(TypeError, match="ln_weight must be a tensor, got list"):
        bad_call(ln_weight=[1.0] * 64)
    with pytest.raises(TypeError, match="x must be a tensor"):
        bad_call(x=None)


@pytest.mark.parametrize("task_ids", [None, torch.tensor([1, 0, 1])])
def test_python_number_scale_is_a_constant(task_ids: torch.Tensor | None) -> None:
    p = random_params(64, 8, tasks=None if task_ids is None else 2)
    x = torch.randn(3, 64, dtype=torch.float64)
    expected = adapter_reference(x, p._replace(scale=torch.full_like(p.scale, 0.5)), None, task_ids)
    for backend in ("torch", "triton"):
        params = [t.float() for t in p[:6]]
        out = fused_adapter(x.float(), *params, 0.5, task_ids=task_ids, backend=backend)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("rows", "r"), [(7, 8), (300, 8), (7, 160)])
def test_non_finite_rows_stay_non_finite(rows: int, r: int) -> None:
    """A NaN or infinity in a row gives NaN in that row's output, as in PyTorch (the kernels' ReLU must not
    turn a NaN bottleneck unit into 0), on the few-row, many-row and split-bottleneck paths."""
    p = [t.float() for t in random_params(64, r)]
    x = torch.randn(rows, 64)
    x[1, 3], x[rows - 1, 0] = float("nan"), float("inf")
    expected = fused_adapter(x, *p, backend="torch")
    out = fused_adapter(x, *p, backend="triton")
    assert out.isnan().any(1).tolist() == expected.isnan().any(1).tolist()
    assert out.isnan().any(1)[[1, rows - 1]].all()
    finite = ~expected.isnan().any(1)
    torch.testing.assert_close(out[finite], expected[finite], atol=1e-4, rtol=1e-4)
    p[2] = p[2].clone()
    p[2][0, 5] = float("nan")  # a NaN weight reaches every row through bottleneck unit 0
    assert fused_adapter(x[:3], *p, backend="triton").isnan().all(1).all()


def test_task_ids_out_of_range() -> None:
    p = [t.float() for t in random_params(64, 8, tasks=2)]
    with pytest.raises(ValueError, match="task_ids must lie in"):
        fused_adapter(torch.randn(3, 64), *p, task_ids=torch.tensor([0, 2, 1]), backend="triton")


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    import famevil_fast.ops.adapter as adapter_module

    calls = []
    real = adapter_module._triton_adapter
    monkeypatch.setattr(adapter_module, "_triton_adapter", lambda *a: calls.append(1) or real(*a))
    p = [t.float() for t in random_params(64, 8)]
    x = torch.randn(2, 64)
    monkeypatch.setenv("FAMEVIL_FAST_BACKEND", "torch")
    fused_adapter(x, *p)
    assert calls == []
    monkeypatch.setenv("FAMEVIL_FAST_BACKEND", "triton")
    fused_adapter(x, *p)
    assert calls == [1]
    monkeypatch.setenv("FAMEVIL_FAST_BACKEND", "cuda")  # a contrastive backend: automatic choice here
    fused_adapter(x, *p)
    assert calls == [1, 1]
    monkeypatch.setenv("FAMEVIL_FAST_BACKEND", "trition")
    with pytest.raises(ValueError, match="FAMEVIL_FAST_BACKEND='trition' names no backend"):
        fused_adapter(x, *p)
    monkeypatch.delenv("FAMEVIL_FAST_BACKEND")
    fused_adapter(x, *p)  # automatic: the interpreter is on
    assert calls == [1, 1, 1]
    fused_adapter(x, *p, backend="torch")
    assert calls == [1, 1, 1]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fused_adapter(x, *p)  # automatic on the CPU without the interpreter: the reference
    assert calls == [1, 1, 1]
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        fused_adapter(x, *p, backend="triton")


def bf16_params(d: int, r: int) -> AdapterParams:
    """Parameters of the dtype the automatic rule was measured with (bf16, as the activations)."""
    return AdapterParams(*(t.to(torch.bfloat16) for t in random_params(d, r)))


def test_automatic_choice_on_a_gpu_follows_the_measured_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from famevil_fast.ops._backend import select_backend
    from famevil_fast.ops.adapter import TRITON_ADAPTER_MIN_ROWS, triton_adapter_pays

    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    gpu_x = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert select_backend("op", None, ("triton", "torch"), gpu_x, triton_pays=False) == "torch"
    assert select_backend("op", None, ("triton", "torch"), gpu_x, triton_pays=True) == "triton"
    assert select_backend("op", "triton", ("triton", "torch"), gpu_x, triton_pays=False) == "triton"
    narrow, wide = bf16_params(768, 64), bf16_params(768, 512)
    many = torch.empty(TRITON_ADAPTER_MIN_ROWS // 4, 4, 768, device="meta", dtype=torch.bfloat16)
    few = torch.empty(TRITON_ADAPTER_MIN_ROWS - 1, 768, device="meta", dtype=torch.bfloat16)
    assert triton_adapter_pays(many, narrow)
    assert not triton_adapter_pays(few, narrow)
    assert not triton_adapter_pays(many, wide)


def test_automatic_choice_inside_a_graphed_training_step() -> None:
    """Inside a training step captured as a CUDA graph (static shapes, autograd on) host time no longer
    counts, and the rule takes the kernels (bf16 activations and parameters) from a ViT-B/16 batch of 64
    up; not under no_grad (graphed caption decoding), and never for a bottleneck too wide for the chip."""
    from famevil_fast.capture import static_shapes
    from famevil_fast.ops.adapter import TRITON_ADAPTER_MIN_ROWS_IN_GRAPH, triton_adapter_pays

    narrow, wide = bf16_params(768, 64), bf16_params(768, 512)
    batch = torch.empty(64, 197, 768, device="meta", dtype=torch.bfloat16)
    assert batch.numel() // 768 == TRITON_ADAPTER_MIN_ROWS_IN_GRAPH
    fewer = torch.empty(TRITON_ADAPTER_MIN_ROWS_IN_GRAPH - 1, 768, device="meta", dtype=torch.bfloat16)
    assert not triton_adapter_pays(batch, narrow)
    with static_shapes():
        assert triton_adapter_pays(batch, narrow)
        assert not triton_adapter_pays(fewer, narrow)
        assert not triton_adapter_pays(batch, wide)
        with torch.no_grad():
            assert not triton_adapter_pays(batch, narrow)


def test_automatic_rule_traces_with_a_symbolic_row_count() -> None:
    """Under torch.compile with a dynamic batch (a second batch size of compiled decoding) the row count is
    symbolic: the rule still decides, for each range of rows, as eagerly."""
    from famevil_fast.ops.adapter import (
        TRITON_ADAPTER_MIN_ROWS,
        TRITON_ADAPTER_MIN_ROWS_IN_GRAPH,
        triton_adapter_pays,
    )

    params = bf16_params(16, 8)

    def decide(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if triton_adapter_pays(x, params) else x

    compiled = torch.compile(decide, backend="eager", dynamic=True, fullgraph=True)
    for rows in (3, TRITON_ADAPTER_MIN_ROWS_IN_GRAPH, TRITON_ADAPTER_MIN_ROWS):
        x = torch.zeros(rows, 16, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(compiled(x), decide(x)), rows
    assert bool(compiled(x)[0, 0] == 1)  # the largest count took the kernels' branch


class _CudaRows:
    """Shape, dtype and device of a CUDA activation, without a GPU (what the automatic choice reads)."""

    def __init__(self, *shape: int) -> None:
        self.shape, self.dtype, self.device, self.is_cuda = (
            torch.Size(shape),
            torch.bfloat16,
            torch.device("cuda"),
            True,
        )

    def numel(self) -> int:
        return self.shape.numel()


def test_mixed_task_calls_keep_the_pytorch_path_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows of several tasks' adapters in one call were measured slower than one PyTorch adapter per task's
    rows inside the graphed four-task step, so the automatic choice never takes the kernels for them, eager
    or graphed, however many rows; an explicit backend still does."""
    pytest.importorskip("triton")
    from famevil_fast.capture import static_shapes
    from famevil_fast.ops.adapter import TRITON_ADAPTER_MIN_ROWS, adapter_backend, triton_adapter_pays

    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    narrow = bf16_params(768, 64)
    step, many = _CudaRows(320, 197, 768), _CudaRows(TRITON_ADAPTER_MIN_ROWS, 768)
    assert triton_adapter_pays(many, narrow) and not triton_adapter_pays(many, narrow, mixed=True)
    with static_shapes():
        assert triton_adapter_pays(step, narrow) and not triton_adapter_pays(step, narrow, mixed=True)
        assert adapter_backend(step, narrow) == "triton"
        assert adapter_backend(step, narrow, mixed=True) == "torch"
        assert adapter_backend(step, narrow, "triton", mixed=True) == "triton"


def test_unmeasured_dtypes_keep_the_pytorch_path_on_a_gpu() -> None:
    """The rule holds where it was measured, bf16 activations with bf16 parameters: float32 or float16
    activations, or float32 parameters (a model training under autocast), keep the reference."""
    from famevil_fast.capture import static_shapes
    from famevil_fast.ops.adapter import TRITON_ADAPTER_MIN_ROWS, triton_adapter_pays

    bf16, fp32 = bf16_params(768, 64), AdapterParams(*(t.float() for t in random_params(768, 64)))
    many = torch.empty(TRITON_ADAPTER_MIN_ROWS, 768, device="meta", dtype=torch.bfloat16)
    assert triton_adapter_pays(many, bf16)
    assert not triton_adapter_pays(many, fp32)
    assert not triton_adapter_pays(many.float(), fp32)
    assert not triton_adapter_pays(many.float(), bf16)
    assert not triton_adapter_pays(many.half(), AdapterParams(*(t.half() for t in bf16)))  # not measured
    step = torch.empty(64, 197, 768, device="meta", dtype=torch.bfloat16)
    with static_shapes():
        assert triton_adapter_pays(step, bf16) and not triton_adapter_pays(step, fp32)


def test_mixed_task_reference_runs_under_capture() -> None:
    """The reference's mixed-task path reads no value back under graph capture (every task's adapter over
    every row, each row keeping its own): the same output and gradients as its eager form."""
    from famevil_fast.capture import simulated_capture

    torch.manual_seed(8)
    results = []
    for captured in (False, True):
        params = [p.clone().requires_grad_() for p in random_params(24, 6, tasks=3)]
        x = torch.randn(2, 11, 24, dtype=torch.float64, requires_grad=True)
        ids = torch.tensor([2, 0, 2, 2, 1, 0, 0, 2, 1, 1, 0] * 2)
        with simulated_capture() if captured else contextlib.nullcontext():
            y = fused_adapter(x, *params, residual=x, task_ids=ids, backend="torch")
            y.square().sum().backward()
        results.append([y.detach(), x.grad, *(p.grad for p in params)])
        torch.manual_seed(8)
    for eager, captured in zip(*results):
        torch.testing.assert_close(captured, eager, rtol=1e-12, atol=1e-12)


def _asked_product_dtypes(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """Records the dtype every kernel launch asks ``configs.dot_args`` for."""
    from famevil_fast.kernels import configs

    asked, dot_args = [], configs.dot_args
    monkeypatch.setattr(configs, "dot_args", lambda dtype: asked.append(dtype) or dot_args(dtype))
    return asked


def _adapter_under(
    autocast: bool, x_dtype: torch.dtype, r: int, tasks: int | None, backend: str, graph: bool
):
    """(output, gradients of x, the parameters and the residual) of one adapter call under bf16 autocast
    or not, the FLOP counter's registered operator instead of the eager path when ``graph``."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(11)
    params = [p.float().requires_grad_() for p in random_params(40, r, tasks)]
    x = (torch.randn(53, 40) + 3.0).to(x_dtype).requires_grad_()
    residual = torch.randn(53, 40, dtype=x_dtype, requires_grad=True)
    ids = None if tasks is None else torch.randint(0, tasks, (53,))
    counting = FlopCounterMode(display=False) if graph else contextlib.nullcontext()
    with counting, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fused_adapter(x, *params, residual=residual, task_ids=ids, backend=backend)
    y.float().square().sum().backward()
    return [y.detach(), x.grad, *(p.grad for p in params), residual.grad]


@pytest.mark.parametrize("tasks", [None, 3])
@pytest.mark.parametrize("operator", [False, True])
def test_autocast_gives_a_float32_x_products_in_its_dtype(
    tasks: int | None, operator: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under autocast the kernels multiply a float32 x's normalised rows in the autocast dtype, forward and
    backward, as the reference's linear layers do, through the eager path and the registered operator;
    the output stays float32. The interpreter widens 16-bit products again, so here the values equal those
    of the float32 kernels without autocast (on a card, the GPU test below checks the bf16 products)."""
    asked = _asked_product_dtypes(monkeypatch)
    got = _adapter_under(True, torch.float32, 12, tasks, "triton", operator)
    assert asked and set(asked) == {torch.bfloat16}, asked
    assert got[0].dtype == torch.float32
    asked.clear()
    plain = _adapter_under(False, torch.float32, 12, tasks, "triton", operator)
    assert set(asked) == {torch.float32}
    for name, a, b in zip(("y", "x", *AdapterParams._fields, "residual"), got, plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_autocast_leaves_16_bit_x_and_the_split_path_in_their_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _asked_product_dtypes(monkeypatch)
    _adapter_under(True, torch.bfloat16, 12, None, "triton", False)
    assert set(asked) == {torch.bfloat16}
    asked.clear()
    _adapter_under(True, torch.float32, 200, None, "triton", False)  # r > FUSED_MAX_R: library products
    assert set(asked) == {torch.float32}


def test_one_pass_layer_norm_is_not_taken_with_16_bit_products_of_float32_rows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The one-pass form multiplies x before normalising it: with a float32 x's products in bf16 that would
    round the raw rows (large means lose everything), so it is left out there."""
    from famevil_fast.kernels import configs, launch

    monkeypatch.setattr(configs, "ADAPTER_ONE_PASS_LN", True)
    monkeypatch.setattr(configs, "ADAPTER_FEW_ROWS_COLUMNS", False)
    scaled, original = [], launch._scaled_down_weights
    monkeypatch.setattr(launch, "_scaled_down_weights", lambda *a: scaled.append(a[1]) or original(*a))
    _adapter_under(False, torch.float32, 12, None, "triton", False)
    assert scaled == [torch.float32]
    scaled.clear()
    _adapter_under(True, torch.float32, 12, None, "triton", False)
    assert scaled == []


def test_custom_op_passes_opcheck() -> None:
    from famevil_fast.kernels import custom_ops  # noqa: F401

    p = [t.float().requires_grad_() for t in random_params(64, 8, tasks=2)]
    x = torch.randn(6, 64, requires_grad=True)
    res = [torch.randn(6, 64, requires_grad=True)]
    ids = torch.tensor([1, 0, 1, 1, 0, 1])
    torch.library.opcheck(
        torch.ops.famevil_fast.adapter_forward.default,
        (x, *p, res, ids, True, 1e-5),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.parametrize("r", [8, 136])
def test_torch_compile_graph_holds_the_op(r: int) -> None:
    p = [t.float().requires_grad_() for t in random_params(64, r)]
    x = torch.randn(2, 3, 64, requires_grad=True)
    res = torch.randn(2, 3, 64)

    def block(x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        return torch.tanh(fused_adapter(x, *p, residual=(res, 2 * res), backend="triton"))

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x, res)
    out.sum().backward()
    got = [x.grad.clone(), *(t.grad.clone() for t in p)]
    for t in (x, *p):
        t.grad = None
    block(x, res).sum().backward()
    torch.testing.assert_close(out, block(x, res))
    for a, b in zip(got, [x.grad, *(t.grad for t in p)]):
        torch.testing.assert_close(a, b)


HOST_OPS = {"view", "empty_like", "new_empty", "empty", "sum"}  # allocations, views, the scale's sum
PRODUCT_OPS = {"t", "unsqueeze", "mm"}  # r > 128, one task: the weight-gradient products are library GEMMs


FUSED_BACKWARD = ["adapter_dp_kernel", "adapter_bwd_dx_weights_kernel", "weight_grad_epilogue_kernel"]


@pytest.mark.parametrize(
    "rows, r, forward, backward, backward_ops",
    [
        (300, 8, ["adapter_fwd_fused_kernel"], FUSED_BACKWARD, HOST_OPS),
        (5, 8, ["adapter_fwd_columns_kernel"], FUSED_BACKWARD, HOST_OPS),  # few rows: columns spread
        (
            5,
            200,
            ["ln_linear_fwd_kernel", "adapter_up_residual_kernel"],
            ["adapter_dp_kernel", "ln_linear_dx_kernel", "weight_grad_epilogue_kernel"],
            HOST_OPS | PRODUCT_OPS,
        ),
    ],
)
def test_eager_path_runs_its_kernels_and_no_pytorch_compute(
    monkeypatch: pytest.MonkeyPatch,
    rows: int,
    r: int,
    forward: list[str],
    backward: list[str],
    backward_ops: set[str],
) -> None:
    """At a ViT batch the adapter's time is mostly the host's: the Triton path's forward and backward
    launch exactly their kernels, and dispatch nothing else but allocations, views, sums and (for the
    split adapter) the two weight-gradient products."""
    from famevil_fast.kernels import launch

    launches = RecordLaunch.patch(monkeypatch, launch)
    p = [t.float().requires_grad_() for t in random_params(64, r)]
    x = torch.randn(rows, 64, requires_grad=True)
    res = torch.randn(rows, 64)
    with AtenLog() as log:
        y = fused_adapter(x, *p, residual=res, backend="triton")
    assert launches == forward
    assert set(log.ops) <= HOST_OPS, log.ops
    launches.clear()
    grad = torch.ones_like(y)
    with AtenLog() as log:
        torch.autograd.grad(y, [x, *p], grad)
    assert launches == backward
    assert set(log.ops) <= backward_ops, log.ops
    if r > 128:
        assert log.ops.count("mm") == 2, log.ops


def test_mixed_task_rows_are_grouped_once_per_forward_and_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Grouping rows by task sorts the task ids on the device: the forward does it, the backward reuses it
    (and still gives the reference's gradients)."""
    from famevil_fast.kernels import launch

    calls = []
    real = launch.group_rows
    monkeypatch.setattr(launch, "group_rows", lambda *a: calls.append(1) or real(*a))
    p = [t.float().requires_grad_() for t in random_params(64, 16, tasks=3)]
    x = torch.randn(7, 64, requires_grad=True)
    ids = torch.tensor([2, 0, 0, 1, 2, 1, 0])
    grad = torch.randn(7, 64)
    y = fused_adapter(x, *p, task_ids=ids, backend="triton")
    assert len(calls) == 1
    grads = torch.autograd.grad(y, [x, *p], grad)
    assert len(calls) == 1
    ref = fused_adapter(x, *p, task_ids=ids, backend="torch")
    for got, want in zip(grads, torch.autograd.grad(ref, [x, *p], grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- GPU: compiled kernels, bf16 numerics


@gpu
@pytest.mark.parametrize(("n", "r"), [(1, 64), (197, 8), (12608, 64), (12608, 512), (1000, 100)])
def test_gpu_bfloat16_matches_float64_reference(n: int, r: int) -> None:
    d = 768
    x = torch.randn(n, d, dtype=torch.float64, device="cuda")
    compare(x, random_params(d, r, device="cuda"), 3, dtype=torch.bfloat16, against_torch=True)


@gpu
@pytest.mark.parametrize("r", [64, 512])
def test_gpu_float32_matches_float64_reference(r: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    x = torch.randn(3000, 512, dtype=torch.float64, device="cuda")
    compare(x, random_params(512, r, device="cuda"), 2, tol=1e-4)


@gpu
@pytest.mark.parametrize("r", [64, 512])
def test_gpu_mixed_task_bfloat16(r: int) -> None:
    tasks, n, d = 4, 4096, 768
    task_ids = torch.tensor([0, 1, 3], device="cuda")[torch.randint(0, 3, (n,), device="cuda")]
    x = torch.randn(n, d, dtype=torch.float64, device="cuda")
    params = random_params(d, r, tasks, device="cuda")
    grads = compare(x, params, 1, task_ids, dtype=torch.bfloat16, against_torch=True)
    assert all(torch.count_nonzero(grads[name][2]) == 0 for name in AdapterParams._fields)


@gpu
@pytest.mark.parametrize("tasks", [None, 3])
def test_gpu_autocast_float32_rows_match_float64_reference(tasks: int | None) -> None:
    """A float32 stream under bf16 autocast (bf16 products, float32 LayerNorm, accumulations and output):
    within 1.5x of the error of PyTorch's own autocast path, output and every gradient."""
    n, d, r = 4096, 768, 64
    torch.manual_seed(0)
    x64 = torch.randn(n, d, dtype=torch.float64, device="cuda") + 2.0  # a mean, as a residual stream has
    res64 = torch.randn(n, d, dtype=torch.float64, device="cuda")
    params64 = random_params(d, r, tasks, device="cuda")
    ids = None if tasks is None else torch.randint(0, tasks, (n,), device="cuda")
    grad = torch.randn(n, d, dtype=torch.float64, device="cuda")

    def run(dtype: torch.dtype, backend: str) -> list[torch.Tensor]:
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x64, *params64, res64)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            y = fused_adapter(leaves[0], *leaves[1:8], residual=leaves[8], task_ids=ids, backend=backend)
        y.backward(grad.to(y.dtype))
        return [y.detach(), *(t.grad for t in leaves)]

    mine, base, ref = run(torch.float32, "triton"), run(torch.float32, "torch"), run(torch.float64, "torch")
    assert mine[0].dtype == torch.float32
    # the scale's one-number gradient sums millions of bf16-rounded products on either side, with errors of
    # about 1e-3 that are independent draws: it is held to bf16 rounding, not to a ratio of the two
    bf16_rounding = 2 * torch.finfo(torch.bfloat16).eps
    for name, got, baseline, want in zip(("y", "x", *AdapterParams._fields, "residual"), mine, base, ref):
        floor = bf16_rounding if got.numel() == 1 else None
        assert_no_worse_than_baseline(name, got, baseline, want, floor=floor)


def _op_call(x, params, residuals):
    """The registered operator called directly: output and the gradients of x, the parameters and the
    residuals."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, *params, *residuals)]
    y = torch.ops.famevil_fast.adapter_forward(leaves[0], *leaves[1:8], leaves[8:], None, True, 1e-5)[0]
    y.backward(torch.linspace(-1, 1, y.numel()).view(y.shape))
    return [y.detach(), *(t.grad for t in leaves)]


def test_registered_op_takes_non_contiguous_inputs() -> None:
    """Transposed x, up-projection weight and residual give what their contiguous copies give."""
    from famevil_fast.kernels import custom_ops  # noqa: F401

    d, r = 32, 8
    p = [t.float() for t in random_params(d, r)]
    x = torch.randn(d, 6).T
    p[4] = p[4].T.contiguous().T  # up_weight (d, r) with transposed strides
    res = [torch.randn(d, 6).T]
    assert not (x.is_contiguous() or p[4].is_contiguous() or res[0].is_contiguous())
    strided = _op_call(x, p, res)
    dense = _op_call(x.contiguous(), [t.contiguous() for t in p], [res[0].contiguous()])
    for got, want in zip(strided, dense):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["x_width", "residual", "task_dim"])
def test_registered_op_refuses_mismatched_shapes(bad: str) -> None:
    from famevil_fast.kernels import custom_ops  # noqa: F401

    d, r = 16, 4
    p = list(random_params(d, r))
    x, res, ids = torch.randn(4, d, dtype=torch.float64), [], None
    if bad == "x_width":
        x = torch.randn(4, d + 1, dtype=torch.float64)
    elif bad == "residual":
        res = [torch.randn(4, d + 1, dtype=torch.float64)]
    else:  # task ids need parameters with a task dimension
        ids = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="famevil_fast::adapter_forward: .* has shape"):
        torch.ops.famevil_fast.adapter_forward(x, *p, res, ids, False, 1e-5)


def test_registered_op_without_saved_activations_refuses_a_gradient_it_cannot_give() -> None:
    from famevil_fast.kernels import custom_ops  # noqa: F401

    p = [t.float() for t in random_params(16, 4)]
    x = torch.randn(3, 16, requires_grad=True)
    res = torch.randn(3, 16, requires_grad=True)
    y = torch.ops.famevil_fast.adapter_forward(x, *p, [res], None, False, 1e-5)[0]
    with pytest.raises(ValueError, match="did not save its activations"):
        y.sum().backward()
    x.requires_grad_(False)  # only the residual needs a gradient: that one passes through
    torch.ops.famevil_fast.adapter_forward(x, *p, [res], None, False, 1e-5)[0].sum().backward()
    torch.testing.assert_close(res.grad, torch.ones(3, 16))


class _LargeMuls(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the multiplications whose output has at least ``numel`` elements."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "mul" and out.numel() >= self.numel:
            self.count += 1
        return out


@pytest.mark.parametrize("tasks", [None, 3])
def test_reference_scales_the_up_projection_not_the_activations(tasks):
    """``s * (W h + b)`` computed as ``(s W) h + s b``: no multiplication as large as the activations,
    forward or backward, and every gradient (the scale's included) that of the written-out formula."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 16, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in random_params(16, 8, tasks)]
    task_ids = None if tasks is None else torch.tensor([2, 0] * 10)
    grad = torch.randn_like(x)
    with _LargeMuls(10 * 16) as muls:  # as large as one task's 10 rows of activations; weights are 8 x 16
        y = adapter_reference(x, AdapterParams(*params), task_ids=task_ids)
        grads = torch.autograd.grad(y, [x, *params], grad)
    assert muls.count == 0
    ids = torch.zeros(20, dtype=torch.long) if task_ids is None else task_ids
    p = [q[ids] if tasks is not None else q.expand(20, *q.shape) for q in params]  # per row
    h = F.layer_norm(x.reshape(20, 16), (16,)) * p[0] + p[1]
    h = torch.relu(torch.einsum("nd,nrd->nr", h, p[2]) + p[3])
    want = (p[6] * (torch.einsum("nr,ndr->nd", h, p[4]) + p[5])).reshape(x.shape)
    torch.testing.assert_close(y, want)
    for got, expected in zip(grads, torch.autograd.grad(want, [x, *params], grad)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("chunks", "shape"), [(1, (1, 16)), (3, (3, 16)), (4, (8, 5, 16)), (2, (6, 7, 16))])
def test_grouped_reference_equals_each_chunk_through_its_adapter(chunks, shape):
    """Chunk c of x through adapter c: values and every gradient as ``adapter_reference`` chunk by chunk,
    float64, with the LayerNorm's affine part and the scale folded into the projections."""
    from famevil_fast.ops.adapter import grouped_adapter_reference

    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    params = [p.requires_grad_() for p in random_params(16, 8, chunks)]
    got = grouped_adapter_reference(x, AdapterParams(*params))
    parts = x.chunk(chunks)
    want = torch.cat(
        [adapter_reference(part, AdapterParams(*(p[c] for p in params))) for c, part in enumerate(parts)]
    )
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for g, w in zip(
        torch.autograd.grad(got, [x, *params], grad), torch.autograd.grad(want, [x, *params], grad)
    ):
        torch.testing.assert_close(g, w)


def test_grouped_reference_refuses_a_batch_that_does_not_split_into_its_chunks():
    from famevil_fast.ops.adapter import grouped_adapter_reference

    params = random_params(16, 8, 3)
    with pytest.raises(ValueError, match=r"shape \(4, 16\) does not split into 3 equal chunks"):
        grouped_adapter_reference(torch.randn(4, 16, dtype=torch.float64), params)


def test_reference_without_gradients_scales_the_output():
    """Inference (decoding) scales the output: one multiplication, where folding would take two."""
    x = torch.randn(3, 16, dtype=torch.float64)
    params = random_params(16, 8)
    with torch.no_grad(), AtenLog() as log:
        y = adapter_reference(x, params)
    assert log.ops.count("mul") == 1, log.ops
    torch.testing.assert_close(y, adapter_reference(x, params))  # the folded form, with autograd on
