"""The residual stream under autocast: float32 (as autocast leaves it) or the autocast dtype
(``residual_stream="autocast"``), with LayerNorms that normalise a 16-bit input in its own dtype
(``ops.layer_norm``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import token_batch

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.clip import StreamLayerNorm
from famevil_fast.ops.layer_norm import layer_norm_in_dtype


def micro_model() -> FameViL:
    torch.manual_seed(0)
    model = FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8))
    with torch.no_grad():  # non-zero adapters, so that every branch reaches the stream
        for name, p in model.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(std=0.05)
    return model.set_runtime(backend="torch")


def task_batches(model: FameViL) -> dict[str, dict[str, torch.Tensor]]:
    size = model.config.clip.vision.image_size
    g = torch.Generator().manual_seed(1)
    pixels, ids = torch.randn(3, 3, size, size, generator=g), token_batch(3)
    return {
        "itc": {"pixels": pixels, "input_ids": ids},
        "tgir": {"ref_pixels": pixels, "target_pixels": pixels.flip(0), "input_ids": ids},
        "scr": {"pixels": pixels, "input_ids": ids, "labels": torch.tensor([0, 3, 5])},
        "cap": {"pixels": pixels, "input_ids": ids},
    }


def stream_dtypes(model: FameViL, run) -> set[torch.dtype]:
    """The dtypes of every block's input (the residual stream) while ``run()`` runs."""
    seen: set[torch.dtype] = set()
    blocks = [*model.vision.blocks, *model.text.blocks]
    handles = [b.register_forward_pre_hook(lambda m, args: seen.add(args[0].dtype)) for b in blocks]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def both_streams(model: FameViL, batches: dict, device: str, dtype: torch.dtype, mixed: bool) -> dict:
    """Per residual stream: (losses by task, gradients by parameter, the stream's dtypes) of one pass over
    ``batches`` under autocast to ``dtype`` on ``device``, mixed-task or one pass per task."""
    results = {}
    for stream in ("float32", "autocast"):
        model.set_runtime(residual_stream=stream)
        model.zero_grad(set_to_none=True)
        outs: dict = {}

        def run(outs: dict = outs) -> None:
            with torch.autocast(device, dtype=dtype):
                if mixed:
                    outs.update(model.forward_mixed(batches))
                else:
                    outs.update({t: model(b, t) for t, b in batches.items()})
            sum(o.loss for o in outs.values()).backward()

        dtypes = stream_dtypes(model, run)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[stream] = ({t: o.loss.item() for t, o in outs.items()}, grads, dtypes)
    return results


def assert_the_streams_agree(results: dict) -> None:
    """The 16-bit stream's losses within 2% and its (float32) gradients within 10% of the float32 stream's."""
    for task, loss in results["float32"][0].items():
        assert results["autocast"][0][task] == pytest.approx(loss, rel=2e-2), task
    grads32, grads16 = results["float32"][1], results["autocast"][1]
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads16.values())
    diff = sum(float((grads16[n] - g).square().sum()) for n, g in grads32.items())
    norm = sum(float(g.square().sum()) for g in grads32.values())
    assert (diff / norm) ** 0.5 < 0.1


@pytest.mark.parametrize("mixed", [False, True])
def test_the_stream_takes_the_autocast_dtype_and_the_losses_stay(mixed: bool) -> None:
    model = micro_model()
    results = both_streams(model, task_batches(model), "cpu", torch.bfloat16, mixed)
    assert results["autocast"][2] == {torch.bfloat16}
    assert results["autocast"][1].keys() == results["float32"][1].keys()
    assert_the_streams_agree(results)


def test_without_autocast_the_setting_changes_nothing() -> None:
    model = micro_model()
    batch = task_batches(model)["itc"]
    plain = model(batch, "itc").loss
    model.set_runtime(residual_stream="autocast")
    assert stream_dtypes(model, lambda: model(batch, "itc")) == {torch.float32}
    assert torch.equal(model(batch, "itc").loss, plain)


def test_layer_norm_in_dtype_under_autocast() -> None:
    """A bf16 input under autocast: bf16 out, equal to the float32 LayerNorm of that input rounded once;
    gradients to float32 parameters in float32. Outside autocast: F.layer_norm in x's dtype."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(5, 33, generator=g) + 1).bfloat16().requires_grad_()
    w = torch.randn(33, generator=g).requires_grad_()
    b = torch.randn(33, generator=g).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm_in_dtype(x, w, b, 1e-5)
    want = F.layer_norm(x.double(), (33,), w.double(), b.double(), 1e-5)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), want, rtol=2**-7, atol=2**-7)
    y.float().sum().backward()
    assert w.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    plain = layer_norm_in_dtype(x.detach(), w.detach(), b.detach(), 1e-5)
    assert torch.equal(plain, F.layer_norm(x.detach(), (33,), w.detach().bfloat16(), b.detach().bfloat16()))


def test_stream_layer_norm_keeps_the_dtype_only_when_told() -> None:
    ln = StreamLayerNorm(16)
    x = torch.randn(2, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        default = ln(x)
        ln.keeps_dtype = True
        kept = ln(x)
    assert kept.dtype == torch.bfloat16
    torch.testing.assert_close(kept.float(), default.float(), rtol=2**-7, atol=2**-7)
    assert isinstance(ln, torch.nn.LayerNorm) and set(ln.state_dict()) == {"weight", "bias"}


def test_the_setting_is_a_config_field_and_a_recipe_field(tmp_path) -> None:
    with pytest.raises(ValueError, match="residual_stream must be one of"):
        FameViLConfig(clip=clip_preset("micro"), residual_stream="bf16")
    model = micro_model().set_runtime(residual_stream="autocast")
    assert model.vision.keeps_stream_dtype and model.text.keeps_stream_dtype
    assert all(m.keeps_dtype for m in model.modules() if isinstance(m, StreamLayerNorm))
    model.save_pretrained(tmp_path / "m")
    loaded = FameViL.from_pretrained(tmp_path / "m")
    assert loaded.config.residual_stream == "autocast" and loaded.vision.keeps_stream_dtype
    old = model.config.to_dict()
    del old["residual_stream"]  # a config written before the field existed
    assert FameViLConfig.from_dict(old).residual_stream == "float32"
    from famevil_fast.train.config import load_config

    cfg = load_config(None, ["model.residual_stream=autocast"])
    assert cfg.model.residual_stream == "autocast"


@pytest.mark.parametrize("op", ["adapter", "projection"])
def test_the_references_layer_norms_cast_no_activation_under_cuda_autocast_rules(op: str) -> None:
    """Under CUDA autocast's rules (emulated on the CPU by bench/step_floor.py), the adapter's and the
    cross-attention projection's references normalise a bf16 x without casting it to float32 and back."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import step_floor

    from famevil_fast.ops import AdapterParams
    from famevil_fast.ops.adapter import adapter_reference
    from famevil_fast.ops.cross_attention import layer_norm_linear_reference

    d, r = 32, 8
    x = torch.randn(2, 7, d).bfloat16().requires_grad_()
    ln = (torch.ones(d, requires_grad=True), torch.zeros(d, requires_grad=True))  # float32, as trained

    def bf16(*shape: int) -> torch.Tensor:  # the products' parameters already bf16: no cast of theirs
        return torch.randn(*shape).bfloat16()

    params = AdapterParams(*ln, bf16(r, d), bf16(r), bf16(d, r), bf16(d), bf16(1))
    projection = (bf16(2 * d, d), bf16(2 * d))
    counter = step_floor.OpCounter()
    with counter, step_floor.cuda_autocast():
        if op == "adapter":
            y = adapter_reference(x, params)
        else:
            y = layer_norm_linear_reference(x, *ln, *projection, 1e-5)
    assert y.dtype == torch.bfloat16
    casts = counter.by_op.get("_to_copy")
    activation_bytes = x.numel() * 2
    assert casts is None or casts.bytes < activation_bytes, casts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("stream", ["float32", "autocast"])
def test_cuda_dtype_rules_hold_on_fake_cuda_tensors(stream: str, dtype: torch.dtype) -> None:
    """Every task's forward, and a mixed pass, under CUDA autocast on fake CUDA tensors (shapes and dtypes
    only; no GPU needed): CUDA's kernels refuse what the CPU's accept, e.g. a LayerNorm whose float32
    weight sits beside a 16-bit input. The stream keeps the autocast dtype when asked."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from famevil_fast.capture import simulated_capture

    size = clip_preset("micro").vision.image_size
    ids = token_batch(3)
    previous = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    with FakeTensorMode(allow_non_fake_inputs=True):
        with torch.device("cuda"):
            model = FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8))
        model.set_runtime(backend="torch", residual_stream=stream)
        pixels, ids = torch.randn(3, 3, size, size, device="cuda"), ids.to("cuda")
        batches = {
            "itc": {"pixels": pixels, "input_ids": ids},
            "tgir": {"ref_pixels": pixels, "target_pixels": pixels, "input_ids": ids},
            "scr": {"pixels": pixels, "input_ids": ids, "labels": torch.tensor([0, 3, 5], device="cuda")},
            "cap": {"pixels": pixels, "input_ids": ids},
        }
        torch.set_autocast_dtype("cuda", dtype)
        torch.set_autocast_enabled("cuda", True)
        try:
            with simulated_capture():
                seen = stream_dtypes(model, lambda: [model(b, t) for t, b in batches.items()])
                outs = model.forward_mixed(batches)
        finally:
            torch.set_autocast_enabled("cuda", previous[0])
            torch.set_autocast_dtype("cuda", previous[1])
    assert set(outs) == set(batches)
    assert seen == ({dtype} if stream == "autocast" else {torch.float32})


def test_adapter_dropout_and_cached_decoding_keep_the_stream_dtype() -> None:
    """The adapters' dropout path (training with adapter_dropout > 0) and the cached decoder's one-token
    steps keep a bf16 stream bf16."""
    torch.manual_seed(0)
    config = FameViLConfig(
        clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8, adapter_dropout=0.1
    )
    model = FameViL(config).set_runtime(backend="torch", residual_stream="autocast").train()
    batch = task_batches(model)["itc"]

    def train_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(batch, "itc").loss.backward()

    assert stream_dtypes(model, train_step) == {torch.bfloat16}
    model.eval()
    steps: set[torch.dtype] = set()
    hooks = [b.ln_1.register_forward_pre_hook(lambda m, a: steps.add(a[0].dtype)) for b in model.text.blocks]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.caption(batch["pixels"], max_len=4)
    for h in hooks:
        h.remove()
    assert steps == {torch.bfloat16}


def test_a_recipe_refuses_the_setting_without_autocast() -> None:
    from famevil_fast.train.config import load_config

    with pytest.raises(ValueError, match="needs train.precision=bf16, got fp32"):
        load_config(None, ["model.residual_stream=autocast", "train.precision=fp32"])
    with pytest.raises(ValueError, match="model.residual_stream"):
        load_config(None, ["model.residual_stream=bf16"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_stream_in_the_autocast_dtype_trains_as_the_float32_stream(dtype: torch.dtype) -> None:
    """On a GPU, a mixed four-task pass under autocast with either stream: the losses within 2% and the
    gradients (float32) within 10% of each other, the stream in the autocast dtype when asked."""
    model = micro_model().cuda()
    batches = {t: {k: v.cuda() for k, v in b.items()} for t, b in task_batches(model).items()}
    assert_the_streams_agree(both_streams(model, batches, "cuda", dtype, mixed=True))
