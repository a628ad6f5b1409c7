"""bench/step_floor.py: the bytes and FLOPs a training step's calls move and compute, counted on fake tensors,
and the floor they set at a given bandwidth and matrix peak."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import step_floor  # noqa: E402


def test_a_product_is_charged_its_operands_and_flops() -> None:
    """mm of (64, 32) by (32, 16) in float32: both operands read, the result written, 2mnk FLOPs; its floor
    at 1 TFLOP/s and 1 TB/s is the larger of the two."""
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    counter = step_floor.OpCounter(tflops=1.0, tbps=1.0)
    with counter:
        c = a @ b
        c.t().unsqueeze(0)  # views launch nothing
    mm = counter.by_op["mm"]
    assert (mm.calls, mm.flops, mm.bytes) == (1, 2 * 64 * 32 * 16, 4 * (64 * 32 + 32 * 16 + 64 * 16))
    assert mm.floor_s == pytest.approx(max(mm.flops, mm.bytes) / 1e12)
    assert counter.by_kind["matmul"].calls == 1 and counter.total().calls == 1


def test_in_place_and_broadcast_operands() -> None:
    """An in-place add reads both operands and writes its target; a broadcast operand counts its storage."""
    x, row = torch.randn(100, 8), torch.randn(8)
    counter = step_floor.OpCounter()
    with counter:
        x.add_(row.expand(100, 8))
    add = counter.by_op["add_"]
    assert add.bytes == 4 * (800 + 8 + 800)


def test_cuda_autocast_runs_layer_norm_in_float32_and_products_in_bfloat16() -> None:
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with step_floor.cuda_autocast():
        h = torch.nn.functional.linear(x, w)
        z = torch.nn.functional.layer_norm(h, (8,))
        s = torch.softmax(h, -1)
    assert (h.dtype, z.dtype, s.dtype) == (torch.bfloat16, torch.float32, torch.float32)


def test_fused_quick_gelu_lowers_the_floor_of_a_step() -> None:
    """The micro model's ITC step: the same products with QuickGELU fused, fewer bytes and calls."""
    plain = step_floor.count_step("plain", "micro", 2, "itc")
    fused = step_floor.count_step("plain+quick_gelu", "micro", 2, "itc")
    assert plain.by_kind["matmul"].flops == fused.by_kind["matmul"].flops > 0
    assert fused.by_op["quick_gelu"].calls == fused.by_op["quick_gelu_backward"].calls > 0
    assert fused.by_kind["other"].bytes < plain.by_kind["other"].bytes
    assert fused.total().calls < plain.total().calls and fused.total().floor_s < plain.total().floor_s
    assert plain.by_kind["optimizer"].calls >= 1  # the fused AdamW step is counted beside the passes


def test_steady_state_step_is_counted() -> None:
    """The counted step is a steady-state one: the optimizer's lazily created state is not counted."""
    counter = step_floor.count_step("plain", "micro", 2, "scr")
    assert counter.by_op["_fused_adamw_"].calls == 1
    assert "zeros_like" not in counter.by_op and "zeros" not in counter.by_op, sorted(counter.by_op)


def test_fused_adamw_reads_four_tensors_and_writes_three() -> None:
    """Parameters, gradients and both moments read; all but the gradients written (no grad scale); each
    parameter's step count read (the optimizer increments it in a call of its own)."""
    params = [torch.nn.Parameter(torch.randn(5, 7)), torch.nn.Parameter(torch.randn(3))]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True)
    optimizer.step()
    counter = step_floor.OpCounter()
    with counter:
        optimizer.step()
    adam = counter.by_op["_fused_adamw_"]
    assert adam.calls == 1 and adam.bytes == 4 * (4 + 3) * (35 + 3) + 4 * len(params)
    assert counter.by_op["_foreach_add_"].calls == 1


def test_table_and_configurations(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        step_floor.known_config("plain+quick_gelu") is None
        and step_floor.known_config("fast+quick_gelu") is None
    )
    assert "not counted" in step_floor.known_config("fast_triton")
    assert step_floor.known_config("plain+other") == "unknown configuration 'plain+other'"
    with pytest.raises(SystemExit) as stop:
        step_floor.main(["--configs", "plain,nonsense"])
    assert stop.value.code == 2
    assert "unknown configuration 'nonsense'" in capsys.readouterr().err
    argv = ["--preset", "micro", "--batch", "2", "--workload", "scr", "--configs", "plain,fast_quick_gelu"]
    assert step_floor.main(argv) == 0
    out = capsys.readouterr().out
    assert "plain      total" in out and "fast_quick_gelu      total" in out
    assert "the 12 ops with the largest floor" in out


def test_a_bf16_model_drops_the_autocast_casts() -> None:
    """``+bf16_model``: the same products on a bf16 model without autocast; the casts between a float32
    stream and bf16 products are gone, and extras combine."""
    plain = step_floor.count_step("plain", "micro", 2, "itc")
    bf16 = step_floor.count_step("plain+quick_gelu+bf16_model", "micro", 2, "itc")
    assert plain.by_kind["matmul"].flops == bf16.by_kind["matmul"].flops
    assert bf16.by_kind["cast"].calls < plain.by_kind["cast"].calls / 10
    assert bf16.total().bytes < plain.total().bytes and "quick_gelu" in bf16.by_op
    assert step_floor.known_config("plain+bf16_model+quick_gelu") is None
    assert torch.get_default_dtype() == torch.float32


def test_a_configuration_s_own_bf16_model_flag_counts_as_the_extra() -> None:
    """``bf16_model_graphed`` (bench_train_step's probe) is counted as the bf16 model it runs."""
    probe = step_floor.count_step("bf16_model_graphed", "micro", 2, "itc")
    extra = step_floor.count_step("plain+bf16_model", "micro", 2, "itc")
    assert probe.by_kind["cast"].calls == extra.by_kind["cast"].calls
    assert probe.total().bytes == extra.total().bytes


def test_master_weights_remove_the_weight_casts_of_a_step() -> None:
    """The micro model's ITC step on the bf16 stream: with bf16 parameters and float32 masters, the casts of
    the weights and their gradients are gone; the optimizer adds its two multi-tensor copies."""
    autocast = step_floor.count_step("fast_bf16_stream_quick_gelu", "micro", 2, "itc")
    master = step_floor.count_step("fast_master_weights", "micro", 2, "itc")
    assert master.by_kind["matmul"].flops == autocast.by_kind["matmul"].flops > 0
    assert master.by_kind["cast"].calls < autocast.by_kind["cast"].calls / 4
    # each way one multi-tensor copy per pair of dtypes: the bf16 parameters', the float32 temperatures'
    assert master.by_op["_foreach_copy_"].calls == 4
    assert master.total().calls < autocast.total().calls
    assert step_floor.config_options("plain+master_weights")["master_weights"]
