"""The Triton contrastive backend (log-sum-exp kernels interpreted on the CPU, compiled on a GPU) against
float64 references: every variant, awkward shapes, a backward split into several blocks of G, 16-bit
inputs, large scales, non-finite inputs, argument errors, the operator registration and torch.compile."""

from __future__ import annotations

import pytest
import torch

from famevil_fast.capture import simulated_capture
from famevil_fast.ops.contrastive import (
    contrastive_distill_loss,
    contrastive_loss,
    contrastive_loss_reference,
)

pytest.importorskip("triton")

from famevil_fast.kernels import configs, contrastive_ops  # noqa: E402

from famevil_fast.ops import contrastive_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# 32 x 32 tiles with 32-wide feature chunks in the interpreter: every size below leaves partial tiles
SHAPES = [(1, 1, 1), (1, 5, 3), (37, 37, 19), (45, 70, 33), (70, 45, 40)]
if DEV == "cuda":  # 128 x 128 tiles there
    SHAPES += [(300, 517, 64), (1000, 1000, 512)]


@pytest.fixture(params=[False, True], ids=["exact_columns", "shared_column_scale"])
def column_scale(request, monkeypatch):
    """Both forms of the two-way sweep's column statistics (``configs.CONTRASTIVE_SHARED_COLUMN_SCALE``)."""
    monkeypatch.setattr(configs, "CONTRASTIVE_SHARED_COLUMN_SCALE", request.param)
    return request.param


def _inputs(m, n, d, s=5.0, dtype=torch.float32):
    a = torch.nn.functional.normalize(torch.randn(m, d, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    return a.to(DEV, dtype), b.to(DEV, dtype), torch.tensor(s, device=DEV)


def _grads(fn, tensors, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves, **kw)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


def _check(tensors, tol=2e-5, **kw):
    loss, grads = _grads(contrastive_loss, tensors, backend="triton", **kw)
    ref, ref_grads = _grads(contrastive_loss_reference, [t.double() for t in tensors], **kw)
    assert torch.isfinite(loss)
    assert abs(float(loss) - float(ref)) <= tol * max(1.0, abs(float(ref)))
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        err = float((g.double() - r).norm() / r.norm().clamp_min(1e-2))
        assert err <= tol * 10, f"gradient of input {i}: relative error {err:.2e}"


def _variants(m, n):
    labels = torch.randint(0, n, (m,), device=DEV)
    row_groups, col_groups = torch.randint(0, 4, (m,), device=DEV), torch.randint(0, 6, (n,), device=DEV)
    col_groups[0] = row_groups[0]  # at least one positive pair
    out = [
        ("labels", dict(labels=labels, label_smoothing=0.05)),
        ("labels_one_way", dict(labels=labels, two_way=False)),
        ("groups", dict(groups=(row_groups, col_groups), label_smoothing=0.1)),
        ("groups_one_way", dict(groups=(row_groups, col_groups), two_way=False)),
    ]
    if m == n:
        out += [
            ("diagonal", {}),
            ("diagonal_one_way", dict(two_way=False)),
            ("diagonal_smoothing", dict(label_smoothing=0.1)),
        ]
    return out


def _check_every_variant(m: int, n: int, d: int) -> None:
    tensors = _inputs(m, n, d)
    for name, kw in _variants(m, n):
        try:
            _check(tensors, **kw)
        except AssertionError as exc:
            raise AssertionError(f"variant {name}: {exc}") from exc


@pytest.mark.parametrize("m,n,d", SHAPES)
def test_every_variant_matches_the_float64_reference(m, n, d, column_scale):
    _check_every_variant(m, n, d)


@pytest.mark.parametrize(
    "budget, blocks",
    [(4 * 4500, (96, 45)), (4 * 2048, (64, 32))],
    ids=["row_blocks", "square_blocks"],
)
def test_backward_in_several_blocks_of_g(monkeypatch, budget, blocks):
    """A small budget for G splits the backward: into row blocks spanning every column (the last one
    partial), or, when that would leave too few rows per block, into a grid of blocks."""
    if DEV != "cpu":
        pytest.skip("block sizes here assume the interpreter's 32 x 32 tiles")
    monkeypatch.setattr(configs, "CONTRASTIVE_GRAD_CHUNK_BYTES", budget)
    assert contrastive_ops.gradient_blocks(100, 45, torch.float32, 32, 32) == blocks
    tensors = _inputs(100, 45, 24)
    _check(tensors, labels=torch.randint(0, 45, (100,), device=DEV))
    _check(tensors, groups=(torch.randint(0, 3, (100,), device=DEV), torch.randint(0, 3, (45,), device=DEV)))
    a = tensors[0]
    _check((a, a.flip(0), tensors[2]), label_smoothing=0.1)  # square, two-way


@pytest.mark.parametrize("spans", [1, 2, 3, 50])
def test_log_sum_exps_do_not_depend_on_the_column_spans(monkeypatch, spans, column_scale):
    """The sweep splits Y's rows into spans (programs) and combines their partial log-sum-exps: any count,
    one span per column tile at most, gives the same statistics; the last span is partial."""
    m, n = (70, 100) if DEV == "cpu" else (300, 1100)
    a, b, s = _inputs(m, n, 20)
    monkeypatch.setattr(configs, "contrastive_column_spans", lambda rows, cols, device: min(spans, cols))
    rows_lse, cols_lse = torch.ops.famevil_fast.contrastive_lse(a, b, s, True)
    logits = 5.0 * (a.double() @ b.double().T)
    torch.testing.assert_close(rows_lse.double(), logits.logsumexp(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cols_lse.double(), logits.logsumexp(0), rtol=1e-6, atol=1e-6)


def test_column_statistics_in_two_sweeps_when_partials_exceed_their_budget(monkeypatch):
    a, b, s = _inputs(70, 45, 20)
    one_sweep = torch.ops.famevil_fast.contrastive_lse(a, b, s, True)
    monkeypatch.setattr(configs, "CONTRASTIVE_COL_PARTIAL_BYTES", 0)
    two_sweeps = torch.ops.famevil_fast.contrastive_lse(a, b, s, True)
    logits = 5.0 * (a.double() @ b.double().T)
    for got in (one_sweep, two_sweeps):
        torch.testing.assert_close(got[0].double(), logits.logsumexp(1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got[1].double(), logits.logsumexp(0), rtol=1e-6, atol=1e-6)
    _check((a, b, s), labels=torch.randint(0, 45, (70,), device=DEV))


@pytest.fixture(params=[None, 4 * 45 * 40], ids=["one_chunk", "chunks"])
def library_logits(request, monkeypatch):
    """The forward with its dot products from the library GEMM (``configs.CONTRASTIVE_LIBRARY_LOGITS``), in
    one chunk of rows, or in chunks of 32 rows (the interpreter's row block) at 45 columns."""
    monkeypatch.setattr(configs, "CONTRASTIVE_LIBRARY_LOGITS", True)
    if request.param is not None:
        monkeypatch.setattr(configs, "CONTRASTIVE_LOGITS_CHUNK_BYTES", request.param)
    return request.param


@pytest.mark.parametrize("m,n,d", [(1, 1, 1), (70, 45, 33), (37, 37, 19)])
def test_library_logits_forward_matches_the_float64_reference(m, n, d, library_logits, column_scale):
    """Every variant, forward and backward (which reads the forward's statistics)."""
    _check_every_variant(m, n, d)


@pytest.mark.parametrize("col_partial_bytes", [None, 0])
def test_library_logits_statistics(monkeypatch, library_logits, col_partial_bytes):
    """Row and column log-sum-exps from chunks of library-GEMM products, with the column partials of one
    sweep or, past their budget, a second sweep over Y; also at a scale of 100 and in bf16."""
    if DEV == "cpu" and library_logits is not None:
        assert contrastive_ops._logits_chunk_rows(45, 32) == 32  # 70 rows: three chunks, the last partial
    if col_partial_bytes is not None:
        monkeypatch.setattr(configs, "CONTRASTIVE_COL_PARTIAL_BYTES", col_partial_bytes)
    for scale, dtype in ((5.0, torch.float32), (100.0, torch.float32), (5.0, torch.bfloat16)):
        a, b, s = _inputs(70, 45, 20, s=scale, dtype=dtype)
        rows_lse, cols_lse = torch.ops.famevil_fast.contrastive_lse(a, b, s, True)
        logits = scale * (a.double() @ b.double().T)
        torch.testing.assert_close(rows_lse.double(), logits.logsumexp(1), rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(cols_lse.double(), logits.logsumexp(0), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("scale", [0.0, -3.0, 100.0])
def test_extreme_scales(scale, column_scale):
    _check(_inputs(40, 40, 16, s=scale), tol=5e-5)


def test_column_far_below_the_tile_maximum(column_scale):
    """Rows all close to one direction u, column 0 equal to u and column 3 to -u, at scale 100: column 3's
    logits lie about 200 below the tile's largest. Stabilised by that maximum its exponentials vanish in
    float32, so the shared column scale must fall back to the column's own maximum there."""
    d = 24
    u = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    a = torch.nn.functional.normalize(u + 0.05 * torch.randn(40, d, dtype=torch.float64), dim=1)
    b = torch.nn.functional.normalize(torch.randn(40, d, dtype=torch.float64), dim=1)
    b[0], b[3] = u, -u
    a, b, s = a.to(DEV, torch.float32), b.to(DEV, torch.float32), torch.tensor(100.0, device=DEV)
    rows_lse, cols_lse = torch.ops.famevil_fast.contrastive_lse(a, b, s, True)
    logits = 100.0 * (a.double() @ b.double().T)
    assert float(logits[:, 0].min() - logits[:, 3].max()) > 150  # the far column, below every row block
    torch.testing.assert_close(rows_lse.double(), logits.logsumexp(1), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(cols_lse.double(), logits.logsumexp(0), rtol=1e-6, atol=1e-5)
    _check((a, b, s), tol=5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    a, b, s = _inputs(50, 50, 24, dtype=dtype)
    loss, grads = _grads(contrastive_loss, [a, b, s], backend="triton")
    ref, ref_grads = _grads(contrastive_loss_reference, [a.double(), b.double(), s.double()])
    assert grads[0].dtype == dtype and grads[1].dtype == dtype
    assert abs(float(loss) - float(ref)) < 1e-3
    for g, r in zip(grads, ref_grads):
        assert float((g.double() - r).norm() / r.norm()) < 2e-2


def test_gradient_reaches_a_scale_through_a_function_of_it():
    a, b, _ = _inputs(20, 20, 8)
    log_scale = torch.tensor(1.5, device=DEV, requires_grad=True)
    contrastive_loss(a, b, log_scale.exp(), backend="triton").backward()
    ref_log_scale = log_scale.detach().double().requires_grad_(True)
    contrastive_loss_reference(a.double(), b.double(), ref_log_scale.exp()).backward()
    torch.testing.assert_close(log_scale.grad.double(), ref_log_scale.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("m,n,d", [(0, 3, 5), (1, 1, 1), (37, 50, 19), (70, 45, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_dots_match_float64(m, n, d, dtype):
    """The forward's positive dots: float32 sums of 16-bit or float32 products, with and without an index
    into the other matrix (empty and single rows included; feature widths not multiples of the chunk)."""
    x = torch.randn(m, d, device=DEV).to(dtype)
    y = torch.randn(max(m, n), d, device=DEV).to(dtype)
    index = torch.randint(0, y.shape[0], (m,), device=DEV, dtype=torch.int32)
    x64, y64 = x.double(), y.double()
    tol = dict(rtol=1e-5, atol=1e-5)
    got = contrastive_ops.launch_row_dots(x, y[:m])
    assert got.dtype == torch.float32 and got.shape == (m,)
    torch.testing.assert_close(got.double(), (x64 * y64[:m]).sum(1), **tol)
    got = contrastive_ops.launch_row_dots(x, y, index)
    torch.testing.assert_close(got.double(), (x64 * y64[index.long()]).sum(1), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float32_group_sums_convert_in_chunks(monkeypatch, dtype):
    """The forward's group sums (labels, groups): float32 sums of the rows sharing a key, a 16-bit input
    converted a few rows at a time (a chunk that does not divide the rows; keys absent from the input)."""
    monkeypatch.setattr(contrastive_triton, "GROUP_SUM_CHUNK_ROWS", 3)
    x = torch.randn(10, 7, device=DEV).to(dtype)
    keys = torch.tensor([4, 0, 4, 2, 2, 2, 0, 4, 5, 0], device=DEV, dtype=torch.int32)
    got = contrastive_triton._group_sums(x, keys, 8)
    want = torch.zeros(8, 7, dtype=torch.float64, device=DEV).index_add_(0, keys.long(), x.double())
    assert got.dtype == torch.float32 and got.shape == (8, 7)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("p,n", [(1, 1), (2, 33), (9, 70), (13, 0)])
def test_combined_partial_log_sum_exps_match_torch(p, n):
    """The sweep's partials combined in one kernel: torch.logsumexp over dim 0, for awkward shapes, values
    far apart, and columns of -inf, +inf and NaN partials."""
    parts = (30 * torch.randn(p, n, dtype=torch.float64)).float().to(DEV)
    if n >= 4:
        parts[:, 0] = float("-inf")  # an empty column
        parts[p // 2, 1] = float("inf")
        parts[p // 2, 2] = float("nan")
        parts[0, 3] = float("-inf")  # one empty partial among finite ones
    got = contrastive_ops.launch_combine_lse(parts)
    want = torch.logsumexp(parts.double(), dim=0)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5, equal_nan=True)


def test_loss_composed_through_autograd_matches_the_reference(monkeypatch):
    """TARGETS_IN_KERNEL=False: the log-sum-exp node plus autograd over the linear terms (the torch.compile
    composition, run eagerly), every variant."""
    monkeypatch.setattr(contrastive_triton, "TARGETS_IN_KERNEL", False)
    tensors = _inputs(45, 45, 33)
    for name, kw in _variants(45, 45):
        try:
            _check(tensors, **kw)
        except AssertionError as exc:
            raise AssertionError(f"variant {name}: {exc}") from exc
    loss = contrastive_loss(*(t.detach().requires_grad_(True) for t in tensors[:2]), 5.0, backend="triton")
    assert "InfoNceFunctionBackward" not in _graph_nodes(loss)


def _graph_nodes(loss: torch.Tensor) -> list[str]:
    """Names of the autograd nodes behind a loss, leaves' gradient accumulators left out."""
    seen, stack, names = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ != "AccumulateGrad":
            names.append(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "two_way": False}, {"groups": "random"}])
def test_eager_loss_is_one_autograd_node(kw):
    """Outside torch.compile the Triton loss is a single autograd node: the target terms' gradients come
    out of the gradient tiles, not out of an elementwise chain."""
    a, b, _ = _inputs(40, 40, 16)
    if kw.get("groups") == "random":
        kw = {"groups": (torch.randint(0, 5, (40,), device=DEV), torch.randint(0, 5, (40,), device=DEV))}
    a.requires_grad_(True)
    b.requires_grad_(True)
    loss = contrastive_loss(a, b, 5.0, backend="triton", **kw)
    assert _graph_nodes(loss) == ["InfoNceFunctionBackward"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_give_a_non_finite_loss(bad, column_scale):
    a, b, s = _inputs(33, 33, 8)
    a[3, 2] = bad
    assert not torch.isfinite(contrastive_loss(a, b, s, backend="triton"))
    assert not torch.isfinite(contrastive_loss(a, b, s, two_way=False, backend="triton"))
    if bad != bad:  # NaN reaches every column (an infinite logit of -inf rightly leaves its column finite)
        _, cols_lse = torch.ops.famevil_fast.contrastive_lse(a, b, s, True)
        assert torch.isnan(cols_lse).all()


def test_bad_input_raises_value_error():
    a, b, s = _inputs(4, 4, 3)
    with pytest.raises(ValueError, match="float64"):
        contrastive_loss(a.double(), b.double(), s, backend="triton")
    with pytest.raises(ValueError, match="feature sizes differ"):
        contrastive_loss(a, b[:, :2], s, backend="triton")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        contrastive_loss(a, b, s, labels=torch.tensor([0, 1, 2, 4], device=DEV), backend="triton")


@pytest.mark.skipif(DEV != "cpu", reason="the interpreter switch only matters on the CPU")
def test_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a, b, s = _inputs(4, 4, 3)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        contrastive_loss(a, b, s, backend="triton")


def test_distillation_takes_the_automatic_backend():
    a, b, s = _inputs(12, 12, 5)
    expected = contrastive_distill_loss(a, b, s, b, a, 2.0)
    torch.testing.assert_close(contrastive_distill_loss(a, b, s, b, a, 2.0, backend="triton"), expected)


def test_lse_operator_definition_schema_and_fake_kernels():
    a, b, s = _inputs(33, 29, 7, s=3.0)
    rows, cols = torch.ops.famevil_fast.contrastive_lse(a, b, s, True)
    logits = 3.0 * (a.double() @ b.double().T)
    torch.testing.assert_close(rows.double(), logits.logsumexp(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cols.double(), logits.logsumexp(0), rtol=1e-6, atol=1e-6)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    for two_way in (True, False):
        torch.library.opcheck(
            torch.ops.famevil_fast.contrastive_lse.default, (a, b, s, two_way), test_utils=utils
        )


@pytest.mark.parametrize("two_way", [True, False])
def test_eager_function_equals_the_registered_operator(two_way):
    """The eager autograd function and the torch.library operator run the same launchers: equal values
    and gradients (the operator is what torch.compile graphs hold)."""
    a, b, s = _inputs(45, 38, 21, s=4.0)
    s = s.requires_grad_(True)

    def via(lse):
        leaves = [a.clone().requires_grad_(True), b.clone().requires_grad_(True), s.detach().clone()]
        leaves[2].requires_grad_(True)
        rows, cols = lse(*leaves, two_way)
        weights = torch.linspace(0.5, 1.5, rows.numel(), device=DEV)
        loss = (rows * weights).sum() + cols.square().sum()
        loss.backward()
        return [rows, cols, *(t.grad for t in leaves)]

    eager = via(contrastive_ops.contrastive_lse_eager)
    registered = via(torch.ops.famevil_fast.contrastive_lse)
    for got, want in zip(eager, registered):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():  # the launchers alone, no autograd node
        rows, cols = contrastive_ops.contrastive_lse_eager(a, b, s, two_way)
    assert rows.grad_fn is None and torch.equal(rows, eager[0].detach())


def test_torch_compile_traces_the_triton_loss():
    a, b, s = _inputs(40, 40, 16)

    def step(a, b, s):
        return contrastive_loss(a, b, s, backend="triton") + contrastive_loss(
            a, b, s, labels=torch.arange(40, device=a.device).flip(0), two_way=False, backend="triton"
        )

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, grads = _grads(compiled, [a, b, s])
    ref, ref_grads = _grads(step, [a, b, s])
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("library", [False, True], ids=["sweep_products", "library_logits"])
def test_no_host_read_back_under_capture(monkeypatch, library):
    """Diagonal and label positives run without a device-to-host read (CUDA graph capture), with the dot
    products in the sweep or from the library GEMM."""
    monkeypatch.setattr(configs, "CONTRASTIVE_LIBRARY_LOGITS", library)
    a, b, s = _inputs(24, 24, 8)
    a.requires_grad_(True)
    labels = torch.randint(0, 24, (24,), device=DEV)
    with simulated_capture():
        loss = contrastive_loss(a, b, s, backend="triton")
        loss = loss + contrastive_loss(a, b, s, labels=labels, two_way=False, backend="triton")
        loss.backward()


def test_lse_operator_takes_a_one_element_scale_of_any_shape():
    """A (1,) scale passes opcheck with dynamic shapes, and its gradient has its shape, eagerly too."""
    a, b, s = _inputs(9, 7, 5, s=3.0)
    s1 = s.reshape(1).clone().requires_grad_(True)
    a, b = a.requires_grad_(True), b.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.famevil_fast.contrastive_lse.default,
        (a, b, s1, True),
        test_utils=("test_faketensor", "test_aot_dispatch_dynamic"),
    )
    rows, cols = torch.ops.famevil_fast.contrastive_lse(a, b, s1, True)
    (rows.sum() + cols.sum()).backward()
    assert s1.grad.shape == (1,)
    s0 = s.clone().requires_grad_(True)
    rows, cols = torch.ops.famevil_fast.contrastive_lse(a.detach(), b.detach(), s0, True)
    (rows.sum() + cols.sum()).backward()
    torch.testing.assert_close(s1.grad, s0.grad.reshape(1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one-element"):
        torch.ops.famevil_fast.contrastive_lse(a, b, torch.ones(2), True)


def test_lse_operator_takes_non_contiguous_inputs():
    a, b, s = _inputs(12, 9, 16)
    strided = torch.randn(12, 32, device=DEV)[:, ::2]
    for x, y in ((strided, b), (a, b.T.contiguous().T), (b.T.contiguous().T, strided)):
        leaves = [x.detach().requires_grad_(True), y.detach().requires_grad_(True)]  # views: same strides
        assert not (leaves[0].is_contiguous() and leaves[1].is_contiguous())
        dense = [x.contiguous().requires_grad_(True), y.contiguous().requires_grad_(True)]
        got = torch.ops.famevil_fast.contrastive_lse(*leaves, s, True)
        want = torch.ops.famevil_fast.contrastive_lse(*dense, s, True)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        (got[0].sum() + got[1].square().sum()).backward()
        (want[0].sum() + want[1].square().sum()).backward()
        for got, want in zip(leaves, dense):
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


def test_groups_and_two_way_labels_run_without_host_read_back_under_capture():
    a, b, s = _inputs(12, 10, 8)
    groups = (
        torch.tensor([0, 0, 1, 2, 2, 3, 9, 9, 4, 4, 5, 6]),
        torch.tensor([0, 1, 1, 2, 3, 3, 7, 4, 5, 8]),
    )
    groups = tuple(g.to(a.device) for g in groups)
    labels = torch.tensor([1, 0, 2, 3, 5, 4, 9, 9, 0, 1, 2, 3], device=a.device)
    for kw in ({"groups": groups}, {"labels": labels}):
        outside, outside_grads = _grads(contrastive_loss, [a, b, s], backend="triton", **kw)
        with simulated_capture():
            inside, inside_grads = _grads(contrastive_loss, [a, b, s], backend="triton", **kw)
        torch.testing.assert_close(inside, outside, rtol=0, atol=0)
        for got, want in zip(inside_grads, outside_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
