"""FLOP formulas of the fused operators: what ``torch.utils.flop_counter.FlopCounterMode`` counts for a
forward and backward through the fast paths (the Triton kernels, interpreted on the CPU; the compiled
contrastive extension) equals what it counts for ``backend="torch"`` on the same computation, and the
explicit product count. Without the formulas, or with the eager paths' kernels out of the counter's sight,
the fast paths count less: at most the library products some of their backward passes make.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from famevil_fast.ops import (
    AdapterParams,
    CrossAttentionParams,
    context_key_values,
    contrastive_distill_loss,
    contrastive_loss,
    cross_attention_adapter,
    fused_adapter,
)
from famevil_fast.ops import contrastive as C
from famevil_fast.ops._backend import (
    active_flop_counters,
    counting_flops,
    register_flop_formulas,
    triton_runs_on,
)
from famevil_fast.ops.cross_attention import layer_norm_linear_reference, layer_norm_linear_triton

CPU = torch.device("cpu")
needs_triton = pytest.mark.skipif(
    not triton_runs_on(CPU), reason="Triton kernels run on the CPU only with triton and TRITON_INTERPRET=1"
)
needs_ext = pytest.mark.skipif(
    C.unavailable_reason("cpu", CPU) is not None, reason="compiled extension not built"
)


def counted(run, leaves: list[torch.Tensor], backward: bool = True) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs by operator) that FlopCounterMode counts for ``run(*leaves)`` and, with
    ``backward``, the gradient of every leaf."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
    with FlopCounterMode(display=False) as counter:
        out = run(*leaves)
        if backward:
            wanted = [t for t in leaves if t.requires_grad]
            torch.autograd.grad(out, wanted, torch.ones_like(out), allow_unused=True)
    by_op = {str(op): n for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op


def assert_same_count(
    fast, reference, leaves: list[torch.Tensor], expected: int, backward: bool = True
) -> None:
    """The fast path counts what the reference counts, which is ``expected`` (non-zero)."""
    fast_total, fast_ops = counted(fast, leaves, backward)
    ref_total, ref_ops = counted(reference, leaves, backward)
    assert expected > 0
    assert ref_total == expected, ref_ops
    assert fast_total == ref_total, (fast_ops, ref_ops)
    assert all(op.startswith("famevil_fast") for op in fast_ops), fast_ops  # nothing counted twice


# ---------------------------------------------------------------------------------------------------
# Bottleneck adapter


def adapter_params(d: int, r: int, tasks: int | None = None) -> list[torch.Tensor]:
    lead = () if tasks is None else (tasks,)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*lead, *shape).requires_grad_()

    return [rnd(d), rnd(d), rnd(r, d), rnd(r), rnd(d, r), rnd(d), rnd(1)]


ADAPTER_CASES = [
    # (x shape, r, tasks, residual terms, task ids (None: one adapter))
    ((7, 24), 8, None, 0, None),
    ((2, 5, 40), 12, None, 1, None),
    ((3, 3, 16), 40, None, 2, None),  # a bottleneck wider than the features
    ((3, 20), 136, None, 1, None),  # r > 128: the split backward with its library products
    ((13, 24), 8, 3, 2, [2, 0, 0, 2, 2, 0, 0, 0, 2, 2, 0, 2, 0]),  # task 1 has no rows
    ((2, 3, 16), 5, 2, 1, [1, 0, 1, 1, 0, 1]),
    ((1, 8), 3, 4, 0, [3]),
]


@needs_triton
@pytest.mark.parametrize("shape, r, tasks, n_residuals, ids", ADAPTER_CASES)
def test_adapter_counts_the_reference_flops(shape, r, tasks, n_residuals, ids) -> None:
    """Forward and backward: 2 products forward and 4 backward of (rows, d) x (d, r) each, single adapter
    or a mixed-task batch (the reference loops over the tasks present, the same total), with or without
    residual terms (additions, counted 0)."""
    d = shape[-1]
    rows = math.prod(shape[:-1])
    task_ids = None if ids is None else torch.tensor(ids)
    x = torch.randn(*shape, requires_grad=True)
    residuals = [torch.randn(*shape, requires_grad=True) for _ in range(n_residuals)]
    leaves = [x, *adapter_params(d, r, tasks), *residuals]

    def run(backend):
        def call(x, *rest):
            res = list(rest[7:]) or None
            if res is not None and len(res) == 1:
                res = res[0]
            return fused_adapter(x, *rest[:7], residual=res, task_ids=task_ids, backend=backend)

        return call

    assert_same_count(run("triton"), run("torch"), leaves, 6 * 2 * rows * d * r)


@needs_triton
@pytest.mark.parametrize("tasks, ids", [(None, None), (3, [1, 1, 0, 2, 1])])
def test_adapter_forward_alone_counts_the_forward_products(tasks, ids) -> None:
    """Under no_grad (evaluation) only the forward runs: 2 products."""
    task_ids = None if ids is None else torch.tensor(ids)
    leaves = [torch.randn(5, 24), *(p.detach() for p in adapter_params(24, 6, tasks))]

    def run(backend):
        def call(*args):
            with torch.no_grad():
                return fused_adapter(*args, task_ids=task_ids, backend=backend)

        return call

    assert_same_count(run("triton"), run("torch"), leaves, 2 * 2 * 5 * 24 * 6, backward=False)


@needs_triton
def test_bf16_adapter_under_autocast_counts_the_reference_flops() -> None:
    """As in a bf16 training step: a bf16 stream, float32 parameters, autocast on."""
    x = torch.randn(9, 32, dtype=torch.bfloat16, requires_grad=True)
    leaves = [x, *adapter_params(32, 8, 2), torch.randn(9, 32, dtype=torch.bfloat16)]
    task_ids = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1])

    def run(backend):
        def call(x, *rest):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = fused_adapter(x, *rest[:7], residual=rest[7], task_ids=task_ids, backend=backend)
            return y.float()

        return call

    assert_same_count(run("triton"), run("torch"), leaves, 6 * 2 * 9 * 32 * 8)


# ---------------------------------------------------------------------------------------------------
# LayerNorm + projection and the cross-attention adapter


def ln_linear_leaves(shape: tuple[int, ...], n_out: int) -> list[torch.Tensor]:
    d = shape[-1]
    tensors = (
        torch.randn(*shape),
        1 + torch.randn(d),
        torch.randn(d),
        torch.randn(n_out, d),
        torch.randn(n_out),
    )
    return [t.requires_grad_() for t in tensors]


@needs_triton
@pytest.mark.parametrize("shape, n_out", [((5, 24), 40), ((2, 3, 17), 9)])
def test_layer_norm_linear_counts_the_reference_flops(shape, n_out) -> None:
    """One product forward, the input and the weight gradient backward: 3 of (rows, d) x (d, n)."""
    rows, d = math.prod(shape[:-1]), shape[-1]
    assert_same_count(
        lambda *a: layer_norm_linear_triton(*a, 1e-5),
        lambda *a: layer_norm_linear_reference(*a, 1e-5),
        ln_linear_leaves(shape, n_out),
        3 * 2 * rows * d * n_out,
    )


def xaa_leaves(b: int, length: int, d: int, lc: int, c: int, r: int) -> list[torch.Tensor]:
    tensors = [
        torch.randn(b, length, d),
        torch.randn(b, lc, c),
        *(1 + torch.randn(d), torch.randn(d), 1 + torch.randn(c), torch.randn(c)),
        torch.randn(d, d) / d**0.5,
        torch.randn(d),
        torch.randn(2 * d, c) / c**0.5,
        torch.randn(2 * d),
        *adapter_params(d, r),
        torch.randn(b, length, d),  # a residual term
    ]
    return [t.detach().requires_grad_() for t in tensors]


@needs_triton
@pytest.mark.parametrize("fuse_projections", [True, False], ids=["fused_projections", "pytorch_projections"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "context_mask"])
def test_cross_attention_adapter_counts_the_reference_flops(fuse_projections, masked) -> None:
    """The whole block: both projections (fused with their LayerNorms or not), attention (the same
    PyTorch call on both paths) and the adapter with a residual term."""
    b, length, d, lc, c, r, heads = 2, 3, 16, 5, 12, 6, 2
    mask = torch.tensor([[True, True, False, True, True], [True] * 5]) if masked else None

    def run(backend):
        def call(x, context, *rest):
            attn, adapter, residual = CrossAttentionParams(*rest[:8]), AdapterParams(*rest[8:15]), rest[15]
            return cross_attention_adapter(
                x,
                attn,
                adapter,
                heads,
                context=context,
                context_mask=mask,
                residual=residual,
                backend=backend,
                fuse_projections=fuse_projections,
            )

        return call

    fast_total, fast_ops = counted(run("triton"), xaa_leaves(b, length, d, lc, c, r))
    ref_total, ref_ops = counted(run("torch"), xaa_leaves(b, length, d, lc, c, r))
    projections = 3 * 2 * (b * length * d * d + b * lc * c * 2 * d)  # forward + input and weight gradients
    adapter = 6 * 2 * b * length * d * r
    assert ref_total >= projections + adapter > 0, ref_ops
    assert fast_total == ref_total, (fast_ops, ref_ops)


@needs_triton
def test_context_key_values_counts_the_reference_flops() -> None:
    """Keys and values of a context (the projection a decoder computes once over a vision memory)."""
    b, lc, c, d, heads = 2, 7, 12, 8, 2
    leaves = [t.detach().requires_grad_() for t in xaa_leaves(b, 1, d, lc, c, 2)[1:10]]

    def run(backend):
        def call(context, *rest):
            k, v = context_key_values(context, CrossAttentionParams(*rest), heads, backend=backend)
            return torch.cat([k, v], dim=-1)

        return call

    assert_same_count(run("triton"), run("torch"), leaves, 3 * 2 * b * lc * c * 2 * d)


# ---------------------------------------------------------------------------------------------------
# Contrastive losses


def loss_leaves(m: int, n: int, d: int) -> list[torch.Tensor]:
    a = torch.nn.functional.normalize(torch.randn(m, d), dim=1)
    b = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    return [a.requires_grad_(), b.requires_grad_(), torch.tensor(4.0, requires_grad=True)]


def groups_of(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(m * 100 + n)
    rows, cols = torch.randint(0, 3, (m,), generator=g), torch.randint(0, 4, (n,), generator=g)
    cols[0] = rows[0]
    return rows, cols


LOSS_CASES = [
    # (M, N, D, variant, two_way, label smoothing)
    (5, 5, 3, "diagonal", True, 0.0),
    (6, 6, 7, "diagonal", False, 0.1),
    (7, 11, 6, "labels", True, 0.0),
    (9, 4, 5, "labels", False, 0.2),
    (9, 6, 5, "groups", True, 0.1),
]


def loss_call(m: int, n: int, variant: str, two_way: bool, smoothing: float, backend: str):
    labels = torch.arange(m) % n if variant == "labels" else None
    groups = groups_of(m, n) if variant == "groups" else None

    def call(a, b, s):
        return contrastive_loss(
            a, b, s, labels=labels, groups=groups, two_way=two_way, label_smoothing=smoothing, backend=backend
        )

    return call


@pytest.mark.parametrize(
    "backend",
    [pytest.param("triton", marks=needs_triton), pytest.param("cpu", marks=needs_ext)],
)
@pytest.mark.parametrize("m, n, d, variant, two_way, smoothing", LOSS_CASES)
def test_contrastive_loss_counts_the_reference_flops(backend, m, n, d, variant, two_way, smoothing) -> None:
    """The logits a @ b.T forward and the gradients of a and b backward: 3 products of (M, D) x (D, N),
    one-way or two-way (the reference's column direction reads the same logits). The fused backends'
    linear terms (positive and plain sums of logits) are products of vectors, which the counter counts 0
    as it counts the reference's sums over the logits."""
    assert_same_count(
        loss_call(m, n, variant, two_way, smoothing, backend),
        loss_call(m, n, variant, two_way, smoothing, "torch"),
        loss_leaves(m, n, d),
        3 * 2 * m * n * d,
    )


@needs_ext
@pytest.mark.parametrize("m, n, d, teacher_d, two_way", [(5, 7, 6, 4, True), (8, 3, 5, 5, False)])
def test_distill_loss_counts_the_reference_flops(m, n, d, teacher_d, two_way) -> None:
    """The student's and the teacher's logits forward, the student's gradients backward (the teacher
    takes none)."""
    teacher_a, teacher_b = torch.randn(m, teacher_d), torch.randn(n, teacher_d)

    def run(backend):
        def call(a, b, s):
            return contrastive_distill_loss(
                a, b, s, teacher_a, teacher_b, 3.0, two_way=two_way, backend=backend
            )

        return call

    expected = 2 * m * n * teacher_d + 3 * 2 * m * n * d
    assert_same_count(run("cpu"), run("torch"), loss_leaves(m, n, d), expected)


# ---------------------------------------------------------------------------------------------------
# Registration and the switch to the registered operators


@needs_triton
def test_a_counter_made_before_the_formulas_were_registered_counts_them() -> None:
    """A counter copies the registry when it is made; one made before the Triton operators existed (the
    kernels are imported on first use) still gets their formulas when the ops run under it."""
    leaves = [torch.randn(6, 24, requires_grad=True), *adapter_params(24, 8)]
    with FlopCounterMode(display=False) as counter:
        for op in [op for op in counter.flop_registry if str(op).startswith("famevil_fast")]:
            del counter.flop_registry[op]
        y = fused_adapter(*leaves, backend="triton")
        torch.autograd.grad(y, leaves, torch.ones_like(y))
    assert counter.get_total_flops() == 6 * 2 * 6 * 24 * 8


@needs_triton
def test_counting_switches_only_under_a_flop_counter() -> None:
    """Other dispatch modes (e.g. a test's op log) keep the eager launchers; a FLOP counter switches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from famevil_fast.ops.adapter import ADAPTER_FLOP_FORMULAS

    class PassThrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert not counting_flops(ADAPTER_FLOP_FORMULAS)
    with PassThrough():
        assert not counting_flops(ADAPTER_FLOP_FORMULAS)
        assert active_flop_counters() == []
    with FlopCounterMode(display=False) as counter:
        assert counting_flops(ADAPTER_FLOP_FORMULAS)
        assert active_flop_counters() == [counter]


def test_an_operator_missing_from_this_build_is_skipped() -> None:
    def formula(*args, out_shape=None, **kwargs) -> int:
        return 1

    assert register_flop_formulas({"no_such_operator": formula}) == []


@needs_triton
@pytest.mark.parametrize("ids", [None, [1, 0, 1, 1, 0]])
def test_counting_leaves_the_adapter_values_unchanged(ids) -> None:
    """Under the counter the registered operator runs the same kernels: the same output and gradients."""
    task_ids = None if ids is None else torch.tensor(ids)
    leaves = [torch.randn(5, 16, requires_grad=True), *adapter_params(16, 4, None if ids is None else 2)]
    residual = torch.randn(5, 16)
    results = []
    for counter in (None, FlopCounterMode(display=False)):
        with counter if counter is not None else torch.enable_grad():
            y = fused_adapter(*leaves, residual=residual, task_ids=task_ids, backend="triton")
            results.append((y, *torch.autograd.grad(y, leaves, torch.ones_like(y))))
    for eager, registered in zip(*results):
        torch.testing.assert_close(eager, registered, rtol=0, atol=0)


@needs_triton
def test_counting_leaves_the_triton_loss_unchanged() -> None:
    """Under the counter the Triton loss composes its log-sum-exp operator with autograd over the linear
    terms (as a compiled graph does) instead of its single eager node: the same loss and gradients."""
    call = loss_call(9, 6, "groups", True, 0.1, "triton")
    values = loss_leaves(9, 6, 5)
    results = []
    for counter in (None, FlopCounterMode(display=False)):
        leaves = [t.detach().clone().requires_grad_() for t in values]
        with counter if counter is not None else torch.enable_grad():
            loss = call(*leaves)
            results.append((loss, *torch.autograd.grad(loss, leaves)))
    for eager, registered in zip(*results):
        torch.testing.assert_close(eager, registered, rtol=1e-5, atol=1e-6)


def test_first_calls_on_several_threads_register_each_formula_once():
    """torch refuses a second registration of an operator's formula: threads making their first fused call
    at the same time must not both register it."""
    import sys
    import threading

    from famevil_fast.kernels import custom_ops  # noqa: F401  (registers the adapter operators)
    from torch.utils import flop_counter

    from famevil_fast.ops import _backend
    from famevil_fast.ops.adapter import ADAPTER_FLOP_FORMULAS

    packets = [getattr(torch.ops.famevil_fast, name) for name in ADAPTER_FLOP_FORMULAS]
    saved = {p: flop_counter.flop_registry.get(p) for p in packets}
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # thread switches as often as possible
    errors = []
    try:
        for _ in range(40):
            for p in packets:
                flop_counter.flop_registry.pop(p, None)
            _backend._FORMULA_REGISTERED.clear()
            start = threading.Barrier(4)

            def first_call(start=start):
                start.wait()
                try:
                    _backend.counting_flops(ADAPTER_FLOP_FORMULAS)
                except RuntimeError as e:
                    errors.append(e)

            threads = [threading.Thread(target=first_call) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(old_interval)
        for p, formula in saved.items():
            if formula is not None:
                flop_counter.flop_registry[p] = formula
    assert errors == []
    assert all(p in flop_counter.flop_registry for p in packets)


def test_the_compiled_cpu_loss_does_not_load_the_flop_counter_or_triton():
    """Formulas are registered only once torch.utils.flop_counter is loaded (it loads triton): a CPU loss
    on the compiled extension in a fresh process imports neither."""
    import subprocess
    import sys

    from famevil_fast import _ext

    if not _ext.cpu_ext_available():
        pytest.skip("needs the compiled extension")
    code = (
        "import sys, torch\n"
        "from famevil_fast.ops import contrastive_loss\n"
        "a, b = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4)\n"
        "contrastive_loss(a, b, 10.0, backend='cpu').backward()\n"
        "print(sorted(m for m in ('triton', 'torch.utils.flop_counter') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
