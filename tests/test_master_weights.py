"""bf16 parameters with float32 master copies (``train.master_weights``): the masters, the optimizer that
steps them, checkpoints that hold them, and the casts a step no longer makes."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file
from test_residual_stream import micro_model, task_batches
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from trainer_fixtures import micro_config, streams

from famevil_fast.ops import cross_attention_adapter, fused_adapter
from famevil_fast.ops.adapter import AdapterParams
from famevil_fast.ops.cross_attention import CrossAttentionParams
from famevil_fast.train.master_weights import MasterAdamW, MasterWeights
from famevil_fast.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def small_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    model.temperature = nn.Parameter(torch.tensor(2.6592))
    model.norm_s = nn.Parameter(torch.full((1,), 4.0))
    model.scale = nn.Parameter(torch.full((1,), 0.5))
    return model


def test_parameters_become_bf16_beside_float32_masters_and_temperatures_stay_float32() -> None:
    """0-d parameters and those named like the heads' temperature stay float32; a (1,) adapter scale
    does not (an adapter's parameters share one dtype)."""
    model = small_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    weights = MasterWeights(model)
    for name, param in model.named_parameters():
        master = weights.master(param)
        assert master.dtype == torch.float32 and torch.equal(master, before[name]), name
        want = torch.float32 if name in ("temperature", "norm_s") else torch.bfloat16
        assert param.dtype == want, name
        assert torch.equal(param.float(), before[name].to(want).float()), name


def test_bad_models_and_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="16-bit model"):
        MasterWeights(small_model(), dtype=torch.float32)
    with pytest.raises(
        ValueError, match=r"start from a float32 model; parameter temperature is torch.bfloat16"
    ):
        MasterWeights(small_model().to(torch.bfloat16))
    weights = MasterWeights(small_model())
    with pytest.raises(ValueError, match=r"shape \(2,\) is not one of the model's"):
        weights.master(nn.Parameter(torch.zeros(2)))


def groups_of(model: nn.Module) -> list[dict]:
    """Two groups with their own learning rate and weight decay; the last Linear is left out of both."""
    first = [model[0].weight, model[0].bias, model.temperature]
    second = [model[1].weight, model[1].bias]
    return [
        {"params": first, "lr": 1e-2, "weight_decay": 0.1, "names": ["a"] * 3},
        {"params": second, "lr": 3e-3, "weight_decay": 0.0, "names": ["b"] * 2},
    ]


def random_grads(model: nn.Module, seed: int, skip: tuple[nn.Parameter, ...] = ()) -> list:
    g = torch.Generator().manual_seed(seed)
    grads = []
    for param in model.parameters():
        grad = torch.randn(param.shape, generator=g).to(param.device, param.dtype)
        grad = None if any(param is s for s in skip) else grad
        param.grad = grad
        grads.append(grad)
    return grads


@pytest.mark.parametrize("fused", [True, False])
def test_master_adamw_steps_the_masters_as_adamw_steps_a_float32_model(fused) -> None:
    """The same gradients (the bf16 ones, widened) through AdamW on a float32 copy: its parameters equal
    the masters bit for bit, and the model holds their rounding; a parameter without a gradient in a step
    is skipped by both (no decay, no moment update)."""
    reference = small_model()
    model = copy.deepcopy(reference)
    weights = MasterWeights(model)
    optimizer = MasterAdamW(groups_of(model), weights, fused=fused)
    expected = torch.optim.AdamW(groups_of(reference), fused=fused)
    for step in range(3):
        skip = (model[0].bias,) if step == 1 else ()
        grads = random_grads(model, step, skip)
        for param, grad in zip(reference.parameters(), grads):
            param.grad = None if grad is None else grad.float()
        optimizer.step()
        expected.step()
        optimizer.zero_grad()
        for (name, param), ref in zip(model.named_parameters(), reference.parameters()):
            assert torch.equal(weights.master(param), ref.detach()), (step, name)
            assert torch.equal(param.detach(), ref.detach().to(param.dtype)), (step, name)
        assert all(p.grad is None for p in optimizer.model_params)
    assert torch.equal(model[2].weight.float(), reference[2].weight.to(torch.bfloat16).float())  # left out
    assert [g["names"] for g in optimizer.param_groups] == [["a"] * 3, ["b"] * 2]


def test_a_master_adamw_resumes_exactly_from_saved_masters_and_state() -> None:
    """As a checkpoint resumes: the masters saved through ``float32_weights`` and the optimizer's state
    loaded into a fresh model and optimizer; the next step is the same bit for bit."""
    model = small_model()
    twin = copy.deepcopy(model)
    optimizer = MasterAdamW(groups_of(model), MasterWeights(model))
    random_grads(model, 0)
    optimizer.step()
    saved = copy.deepcopy(optimizer.weights.float32_state_dict(model))
    resumed = MasterAdamW(groups_of(twin), MasterWeights(twin))
    resumed.weights.load_float32_state_dict(twin, saved, "saved")
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for opt, net in ((optimizer, model), (resumed, twin)):
        opt.zero_grad()
        random_grads(net, 1)
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.weights.masters, resumed.weights.masters):
        assert torch.equal(a, b)


def test_a_closure_is_refused() -> None:
    model = small_model()
    optimizer = MasterAdamW(groups_of(model), MasterWeights(model))
    with pytest.raises(ValueError, match="takes no closure"):
        optimizer.step(lambda: 0.0)


def test_zero_grad_clears_the_model_gradients_or_zeroes_them_in_place() -> None:
    model = small_model()
    optimizer = MasterAdamW(groups_of(model), MasterWeights(model))
    random_grads(model, 0)
    held = model[0].weight.grad
    optimizer.zero_grad(set_to_none=False)
    assert model[0].weight.grad is held and not held.any()
    optimizer.zero_grad()
    assert all(p.grad is None for p in optimizer.model_params)


def test_float32_state_dicts_hold_the_masters_and_load_into_them_in_place() -> None:
    """The state dict holds the float32 masters (a tied parameter under both names); a load writes the
    masters exactly and the model's parameters, in place, with their rounding: no parameter changes its
    tensor (a captured graph reads those addresses, DDP hooks their gradient accumulators)."""
    model = small_model()
    model.tied = model[0].weight
    weights = MasterWeights(model)
    state = weights.float32_state_dict(model)
    assert set(state) == set(model.state_dict())
    assert all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["tied"], weights.master(model[0].weight))
    assert torch.equal(state["0.weight"], weights.master(model[0].weight))
    pointers = [(p.data_ptr(), p.dtype) for p in model.parameters()]
    loaded = {k: torch.randn_like(v) for k, v in state.items()}
    loaded["tied"] = loaded["0.weight"]
    weights.load_float32_state_dict(model, loaded, "a file")
    assert [(p.data_ptr(), p.dtype) for p in model.parameters()] == pointers
    for name, param in model.named_parameters():
        assert torch.equal(weights.master(param), loaded[name]), name
        assert torch.equal(param.detach(), loaded[name].to(param.dtype)), name
    with pytest.raises(ValueError, match=r"a file does not match the model"):
        weights.load_float32_state_dict(model, {"0.weight": loaded["0.weight"]}, "a file")


def test_step_hooks_fire_once_beside_a_plain_adamw() -> None:
    """The masters' copies are step hooks of their own: hooks registered by a user fire once a step, also
    where a plain AdamW (whose class step is hooked too) exists in the same process."""
    torch.optim.AdamW([nn.Parameter(torch.zeros(1))])
    model = small_model()
    optimizer = MasterAdamW(groups_of(model), MasterWeights(model))
    fired = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: fired.append(opt))
    random_grads(model, 0)
    optimizer.step()
    assert fired == [optimizer]


# ---------------------------------------------------------------- the model in bf16
class CastCounter(TorchDispatchMode):
    """Counts the dtype conversions (``_to_copy`` between floating dtypes) that run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and args[0].is_floating_point():
            self.casts += int(kwargs.get("dtype", args[0].dtype) != args[0].dtype)
        return out


def step_casts(model, batches) -> tuple[int, dict[str, float]]:
    counter = CastCounter()
    with counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = model.forward_mixed(batches)
            total = sum(o.loss for o in outs.values())
        total.backward()
    return counter.casts, {t: float(o.loss.detach()) for t, o in outs.items()}


def test_a_bf16_model_on_the_bf16_stream_casts_no_weight() -> None:
    """The four-task mixed step of the micro model under autocast: with master weights and the bf16 stream,
    a few casts remain (inputs, the temperature, the losses' float32 work) where the float32 model casts
    every weight a product reads, forward and backward. The losses agree within bf16 rounding."""
    reference = micro_model().set_runtime(residual_stream="autocast")
    model = copy.deepcopy(reference)
    MasterWeights(model)
    batches = task_batches(reference)
    float32_casts, float32_losses = step_casts(reference, batches)
    bf16_casts, bf16_losses = step_casts(model, batches)
    weights_read = sum(1 for n, p in reference.named_parameters() if p.dim() >= 2)
    assert float32_casts - bf16_casts >= weights_read
    assert bf16_casts < float32_casts / 4
    for task, value in float32_losses.items():
        assert bf16_losses[task] == pytest.approx(value, rel=0.02), task


def test_a_bf16_model_keeps_the_float32_stream_under_autocast() -> None:
    """``residual_stream: float32`` means float32 whatever the parameters' dtype: a bf16 model's text
    embeddings (bf16) enter the blocks in float32, as a float32 model's do."""
    model = micro_model()
    MasterWeights(model)
    ids = task_batches(model)["itc"]["input_ids"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.text.embed(ids).dtype == torch.float32
    model.set_runtime(residual_stream="autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.text.embed(ids).dtype == torch.bfloat16


def adapter_params(d: int, r: int, dtype: torch.dtype, seed: int = 0) -> AdapterParams:
    g = torch.Generator().manual_seed(seed)
    shapes = ((d,), (d,), (r, d), (r,), (d, r), (d,), (1,))
    return AdapterParams(*(torch.randn(s, generator=g).mul(0.3).to(dtype).requires_grad_() for s in shapes))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_adapter_takes_bf16_parameters_on_a_float32_input_under_autocast(backend) -> None:
    """What a bf16 model's adapters see on the float32 stream: the Triton kernels widen the parameters to
    float32, the reference takes them as they are; both agree with the reference on the widened parameters,
    forward and backward (gradients in the parameters' dtype)."""
    x = torch.randn(2, 7, 24, requires_grad=True)
    params = adapter_params(24, 8, torch.bfloat16)
    widened = AdapterParams(*(p.detach().float().requires_grad_() for p in params))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_adapter(x, *params, residual=x, backend=backend)
        expected = fused_adapter(x, *widened, residual=x, backend="torch")
    assert out.dtype == torch.float32
    assert rel_err(out.detach(), expected.detach()) < 2e-2
    grads = torch.autograd.grad(out.sum(), params)
    want = torch.autograd.grad(expected.sum(), widened)
    for name, g, w in zip(AdapterParams._fields, grads, want):
        assert g.dtype == torch.bfloat16, name
        assert rel_err(g.float(), w) < 5e-2, name


def test_bf16_parameters_on_a_float32_input_without_autocast_are_refused() -> None:
    x = torch.randn(5, 24)
    with pytest.raises(
        ValueError, match=r"parameters are torch.bfloat16 but x is torch.float32 \(allowed: x's"
    ):
        fused_adapter(x, *adapter_params(24, 8, torch.bfloat16), backend="torch")


def test_the_cross_attention_adapter_takes_bf16_parameters_on_a_float32_stream() -> None:
    g = torch.Generator().manual_seed(0)
    d, c = 16, 12
    shapes = ((d,), (d,), (c,), (c,), (d, d), (d,), (2 * d, c), (2 * d,))
    attn = CrossAttentionParams(*(torch.randn(s, generator=g).mul(0.3).to(torch.bfloat16) for s in shapes))
    adapter = adapter_params(d, 4, torch.bfloat16)
    x, context = torch.randn(2, 5, d), torch.randn(2, 3, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cross_attention_adapter(x, attn, adapter, 2, context=context, backend="torch")
        widened = cross_attention_adapter(
            x,
            CrossAttentionParams(*(t.float() for t in attn)),
            AdapterParams(*(t.detach().float() for t in adapter)),
            2,
            context=context,
            backend="torch",
        )
    assert rel_err(out.detach(), widened.detach()) < 2e-2
    with pytest.raises(ValueError, match="attention parameters are torch.bfloat16 but x is torch.float32"):
        cross_attention_adapter(x, attn, adapter, 2, context=context, backend="torch")


# ---------------------------------------------------------------- training
def test_master_weights_need_bf16_precision(tmp_path) -> None:
    with pytest.raises(ValueError, match="train.master_weights .* needs train.precision=bf16, got fp32"):
        micro_config(tmp_path, "train.master_weights=true").validate()


@pytest.mark.parametrize("graphs", [False, True])
def test_training_with_master_weights_tracks_the_float32_model(tmp_path, graphs) -> None:
    """Six updates of the four tasks (mixed passes, bf16 stream; captured steps simulated): the losses of
    the bf16 model with float32 masters stay within bf16 rounding of the float32 model's under the same
    autocast; its checkpoint and final export hold the float32 masters."""
    common = (
        "train.precision=bf16",
        "train.updates=6",
        "train.mixed_task_batches=true",
        "model.residual_stream=autocast",
        f"train.cuda_graphs={str(graphs).lower()}",
    )
    reference = Trainer(micro_config(tmp_path / "float32", *common), streams())
    reference.fit()
    trainer = Trainer(micro_config(tmp_path / "master", *common, "train.master_weights=true"), streams())
    trainer.fit()
    for a, b in zip(reference.history, trainer.history):
        for (task, want), (_, got) in zip(a["losses"], b["losses"]):
            assert got == pytest.approx(want, rel=0.02), (a["update"], task)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16, torch.float32}
    masters = {n: trainer.master_weights.master(p) for n, p in trainer.model.named_parameters()}
    checkpoint = trainer.checkpoints.latest()
    for directory in (checkpoint, tmp_path / "master" / "final"):
        saved = load_file(str(directory / "model.safetensors"))
        for name, master in masters.items():
            assert saved[name].dtype == torch.float32 and torch.equal(saved[name], master), (directory, name)
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert state["config"]["train"]["master_weights"] is True


def test_the_final_export_loads_as_a_float32_model(tmp_path) -> None:
    """The final export loads into a plain float32 model: the masters are its weights."""
    from famevil_fast.model import FameViL

    config = micro_config(tmp_path, "train.precision=bf16", "train.updates=2", "train.master_weights=true")
    trainer = Trainer(config, streams())
    trainer.fit()
    loaded = FameViL.from_pretrained(tmp_path / "final")
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.float32
        assert torch.equal(param, trainer.master_weights.master(dict(trainer.model.named_parameters())[name]))


CUDA = torch.cuda.is_available()


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_master_adamw_on_cuda_steps_as_fused_adamw_on_a_float32_copy() -> None:
    """On the GPU (fused AdamW, multi-tensor copies across dtypes): the masters equal a float32 copy's
    parameters bit for bit after three steps, and the model holds their rounding."""
    reference = small_model().cuda()
    model = copy.deepcopy(reference)
    weights = MasterWeights(model)
    optimizer = MasterAdamW(groups_of(model), weights, fused=True)
    expected = torch.optim.AdamW(groups_of(reference), fused=True)
    for step in range(3):
        grads = random_grads(model, step)
        for param, grad in zip(reference.parameters(), grads):
            param.grad = grad.float()
        optimizer.step()
        expected.step()
        optimizer.zero_grad()
    for param, ref in zip(model.parameters(), reference.parameters()):
        assert torch.equal(weights.master(param), ref.detach())
        assert torch.equal(param.detach(), ref.detach().to(param.dtype))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_graphed_training_with_master_weights_on_cuda_matches_eager_and_resumes(tmp_path) -> None:
    """Four tasks in mixed passes on the bf16 stream, on the GPU: replayed CUDA graphs give the losses of
    eager steps (the first update's within bf16 rounding; the capture-safe paths round differently, so later
    ones drift a little), and a run cut after update 2 resumes to the same masters."""
    common = (
        "train.device=cuda",
        "train.precision=bf16",
        "train.master_weights=true",
        "train.mixed_task_batches=true",
        "model.residual_stream=autocast",
        "train.updates=4",
    )
    eager = Trainer(micro_config(tmp_path / "eager", *common), streams())
    eager.fit()
    graphed = Trainer(micro_config(tmp_path / "graphed", *common, "train.cuda_graphs=true"), streams())
    graphed.fit()
    for a, b in zip(eager.history, graphed.history):  # the first update's; then within the drift of bf16
        tol = 1e-2 if a["update"] == 1 else 5e-2
        for (task, want), (_, got) in zip(a["losses"], b["losses"]):
            assert got == pytest.approx(want, rel=tol, abs=1e-3), (a["update"], task)
    cut = (*common, "train.cuda_graphs=true")
    Trainer(micro_config(tmp_path / "cut", *cut, "train.updates=2"), streams()).fit()
    resumed = Trainer(micro_config(tmp_path / "cut", *cut, "checkpoint.resume=true"), streams())
    resumed.fit()
    for a, b in zip(graphed.master_weights.masters, resumed.master_weights.masters):
        assert torch.equal(a, b)
