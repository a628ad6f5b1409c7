"""What the host-side shortcuts of the fused ops must keep: launch options and operand types that follow the
switches flipped at run time, the measured backend rule consulted only where it decides, the eager paths'
allocations, the scale gradient's shape and dtype, and the same results whichever way a launcher is entered.
No timings: these lock behaviour, not speed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import pytest
import torch
from helpers import AtenLog, RecordLaunch

from famevil_fast.ops import AdapterParams, fused_adapter

pytest.importorskip("triton")

from famevil_fast.kernels import configs, launch  # noqa: E402


def _params(d: int, r: int, tasks: int | None = None) -> list[torch.Tensor]:
    lead = () if tasks is None else (tasks,)
    shapes = [(d,), (d,), (r, d), (r,), (d, r), (d,), (1,)]
    return [torch.randn(*lead, *shape) for shape in shapes]


def test_tile_launch_options_follow_the_fields_and_are_made_once() -> None:
    tiles = configs.Tiles(64, 128, 32, num_warps=8, num_stages=3, maxnreg=128)
    assert tiles.launch() == {"num_warps": 8, "num_stages": 3, "maxnreg": 128}
    assert tiles.launch() is tiles.launch()
    assert configs.Tiles(16, 16, 16).launch() == {"num_warps": 4, "num_stages": 2}
    changed = dataclasses.replace(tiles, num_warps=4, maxnreg=None)
    assert changed.launch() == {"num_warps": 4, "num_stages": 3}
    assert tiles == configs.Tiles(64, 128, 32, 8, 3, 128)  # the options are no field: equality as before
    assert hash(tiles) == hash(configs.Tiles(64, 128, 32, 8, 3, 128))


@pytest.fixture
def tf32_switch() -> Iterator[Callable[[bool], None]]:
    """Sets ``torch.backends.cuda.matmul.allow_tf32`` (a module attribute monkeypatch cannot restore)."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32

    def switch(allowed: bool) -> None:
        matmul.allow_tf32 = allowed

    yield switch
    matmul.allow_tf32 = before


def test_operand_types_follow_the_tf32_switch(tf32_switch: Callable[[bool], None]) -> None:
    for allowed in (True, False, True):
        tf32_switch(allowed)
        assert configs.tf32_allowed() is allowed
        assert configs.dot_args(torch.float32)["PRECISION"] == ("tf32" if allowed else "ieee")
        assert configs.dot_args(torch.float16)["PRECISION"] == "ieee"


def test_one_pass_switch_is_read_on_every_call(
    monkeypatch: pytest.MonkeyPatch, tf32_switch: Callable[[bool], None]
) -> None:
    monkeypatch.setattr(configs, "ADAPTER_ONE_PASS_LN", False)
    assert not configs.one_pass_layer_norm(torch.bfloat16)
    monkeypatch.setattr(configs, "ADAPTER_ONE_PASS_LN", True)
    assert configs.one_pass_layer_norm(torch.bfloat16)
    tf32_switch(True)
    assert not configs.one_pass_layer_norm(torch.float32)
    tf32_switch(False)
    assert configs.one_pass_layer_norm(torch.float32)


def test_measured_rule_is_consulted_only_for_an_automatic_choice_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import famevil_fast.ops.adapter as adapter_module

    def refuse(*args: object) -> bool:
        raise AssertionError("triton_adapter_pays consulted")

    monkeypatch.setattr(adapter_module, "triton_adapter_pays", refuse)
    monkeypatch.delenv("FAMEVIL_FAST_BACKEND", raising=False)
    p = _params(32, 8)
    x = torch.randn(5, 32)
    for backend in ("triton", "torch", None):  # explicit, or automatic on the CPU (the interpreter is on)
        torch.testing.assert_close(
            fused_adapter(x, *p, backend=backend), fused_adapter(x, *p, backend="torch"), atol=1e-4, rtol=1e-4
        )


def test_measured_rule_reads_the_capture_state_only_between_its_thresholds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import famevil_fast.ops.adapter as adapter_module
    from famevil_fast.capture import static_shapes

    narrow = AdapterParams(*(t.to(torch.bfloat16) for t in _params(768, 64)))  # the measured dtype
    low, high = adapter_module.TRITON_ADAPTER_MIN_ROWS_IN_GRAPH, adapter_module.TRITON_ADAPTER_MIN_ROWS
    fewer = torch.empty(low - 1, 768, device="meta", dtype=torch.bfloat16)
    many = torch.empty(high, 768, device="meta", dtype=torch.bfloat16)
    between = torch.empty(low, 768, device="meta", dtype=torch.bfloat16)
    with static_shapes():
        assert adapter_module.triton_adapter_pays(between, narrow)
        with monkeypatch.context() as patch:
            patch.setattr(adapter_module, "static_shapes_enabled", lambda: pytest.fail("capture state read"))
            assert not adapter_module.triton_adapter_pays(fewer, narrow)
            assert adapter_module.triton_adapter_pays(many, narrow)
    assert not adapter_module.triton_adapter_pays(between, narrow)


@pytest.mark.parametrize("shape", [(300, 64), (3, 100, 64)])
def test_no_grad_forward_allocates_only_its_output(monkeypatch: pytest.MonkeyPatch, shape: tuple) -> None:
    """Evaluation keeps nothing for a backward: the launcher allocates y alone, no empty statistics."""
    monkeypatch.setattr(configs, "ADAPTER_ONE_PASS_LN", False)
    launches = RecordLaunch.patch(monkeypatch, launch)
    p = _params(64, 8)
    x = torch.randn(*shape)
    with torch.no_grad():
        fused_adapter(x, *p, residual=x, backend="triton")  # makes the launchers' per-device constants
        with AtenLog() as log:
            fused_adapter(x, *p, residual=x, backend="triton")
    assert launches == ["adapter_fwd_fused_kernel"] * 2
    assert [op for op in log.ops if op != "view"] == ["empty_like"], log.ops


@pytest.mark.parametrize("rows, r", [(300, 8), (5, 8), (5, 200)])  # fused kernel, columns spread, split
def test_adapter_output_is_adapter_forwards_output(rows: int, r: int) -> None:
    x = torch.randn(rows, 64)
    params = tuple(_params(64, r))
    residuals = [torch.randn(rows, 64)]
    y, h, mean, rstd = launch.adapter_forward(x, params, residuals, launch.SINGLE_TASK, True, 1e-5)
    assert h.shape == (rows, r) and mean.shape == rstd.shape == (rows,)
    unsaved = launch.adapter_forward(x, params, residuals, launch.SINGLE_TASK, False, 1e-5)
    assert [t.shape[0] for t in unsaved[1:]] == [0, 0, 0]
    for out in (unsaved[0], launch.adapter_output(x, params, residuals, launch.SINGLE_TASK, 1e-5)):
        torch.testing.assert_close(out, y)


def test_layer_norm_linear_output_is_the_forwards_output() -> None:
    x, w, b = torch.randn(20, 48), torch.randn(24, 48), torch.randn(24)
    lnw, lnb = torch.randn(48), torch.randn(48)
    out, mean, rstd = launch.ln_linear_forward(x, lnw, lnb, w, b, True, 1e-5)
    assert mean.shape == rstd.shape == (20,)
    torch.testing.assert_close(launch.ln_linear_output(x, lnw, lnb, w, b, 1e-5), out)


@pytest.mark.parametrize(
    "shape, dtype",
    [((1,), torch.float32), ((1,), torch.bfloat16), ((3, 1), torch.float32), ((1, 1), torch.float16)],
)
def test_scale_gradient_takes_the_scales_shape_and_dtype(shape: tuple, dtype: torch.dtype) -> None:
    parts = torch.randn(shape[0], 5)
    s = torch.ones(shape, dtype=dtype)
    ds = launch._scale_grad(parts, s)
    assert ds.shape == s.shape and ds.dtype == dtype
    torch.testing.assert_close(ds, parts.sum(dim=1).to(dtype).view(shape))


def test_backward_outside_grad_mode_does_not_switch_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The launchers of a backward run without a no_grad context when autograd is off already; under
    create_graph=True (autograd on) they still run without it."""
    from famevil_fast.kernels.autograd import without_grad

    seen = []

    def probe(value: int) -> int:
        seen.append(torch.is_grad_enabled())
        return value + 1

    with torch.no_grad():
        assert without_grad(probe, 1) == 2
    assert without_grad(probe, 2) == 3
    assert seen == [False, False]
    assert torch.is_grad_enabled()


def test_contrastive_number_scale_is_filled_on_the_device() -> None:
    from famevil_fast.ops.contrastive import _as_scale

    a = torch.randn(4, 8)
    with AtenLog() as log:
        s = _as_scale(2.5, a)
    assert log.ops == ["full"]  # no tensor made on the host and copied over
    assert s.shape == () and s.dtype == torch.float32 and s.item() == 2.5
    assert _as_scale(2.5, a.double()).dtype == torch.float64


@pytest.mark.parametrize("scale", [1e40, -1e40])
def test_a_float_scale_beyond_the_compute_dtype_gives_a_non_finite_loss(scale: float) -> None:
    """As a host-made tensor of the number rounded it: inf, then a non-finite loss (not an error)."""
    from famevil_fast.ops import contrastive_loss

    a, b = torch.randn(5, 8), torch.randn(5, 8)
    assert not torch.isfinite(contrastive_loss(a, b, scale, backend="torch"))
