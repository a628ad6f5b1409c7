"""The FAME-ViL model: parameter budget, the three modes, task losses, mixed-task adapters, input errors."""

import pytest
import torch
import torch.nn.functional as F
from helpers import perturb_, token_batch

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.adapters import TaskAdapters
from famevil_fast.model.losses import itc_loss
from famevil_fast.model.task_mix import as_task_mix, task_mix

MICRO = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8)


def micro_model(**changes) -> FameViL:
    model = FameViL(MICRO.replace(**changes))
    return perturb_(model, std=0.05)


def micro_batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pixels": torch.randn(b, 3, 32, 32, generator=g),
        "ref_pixels": torch.randn(b, 3, 32, 32, generator=g),
        "target_pixels": torch.randn(b, 3, 32, 32, generator=g),
        "input_ids": token_batch(b, seed=seed),
        "labels": torch.randint(0, 121, (b,), generator=g),
    }


@pytest.mark.parametrize("r,total", [(64, 214_303_220), (128, 222_173_684), (512, 269_396_468)])
def test_parameter_budget_matches_reference(r, total):
    with torch.device("meta"):
        counts = FameViL(FameViLConfig(adapter_bottleneck=r)).parameter_counts()
    assert counts["total"] == total
    assert counts["clip"] == 149_620_737
    assert counts["xaa"] == 31_219_224
    assert counts["heads"] == 25_408_379
    per_task = 12 * ((2 * 768 * r + 3 * 768 + r + 1) + (2 * 512 * r + 3 * 512 + r + 1))
    assert all(counts[f"tsa.{t}"] == per_task for t in ("itc", "tgir", "scr", "cap"))


def test_text_only_xaa_budget():
    with torch.device("meta"):
        counts = FameViL(FameViLConfig(xaa="text")).parameter_counts()
    assert counts["xaa"] == 13_437_708


@pytest.mark.parametrize("task", ["itc", "tgir", "scr", "cap"])
def test_task_forward_backward_reaches_the_right_parameters(task):
    model = micro_model()
    out = model(micro_batch(), task)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(f".tsa.adapters.{task}." in n for n in grads)
    assert not any(".tsa.adapters." in n and f".adapters.{task}." not in n for n in grads)
    vision_xaa = any(n.startswith("vision.") and ".xaa." in n for n in grads)
    text_xaa = any(n.startswith("text.") and ".xaa." in n for n in grads)
    assert vision_xaa == (task in ("tgir", "scr"))
    assert text_xaa == (task != "itc")
    assert any(n.startswith(f"heads.{task}.") for n in grads)


def test_itc_loss_is_symmetric_infonce_with_squared_scale():
    model = micro_model()
    batch = micro_batch(4)
    out = model(batch, "itc")
    logits = out.outputs["scale"] * out.outputs["image"] @ out.outputs["text"].T
    labels = torch.arange(4)
    ref = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    assert torch.allclose(out.loss, ref, atol=1e-6)
    assert torch.allclose(out.outputs["scale"], model.heads["itc"].norm_s.detach().square().squeeze())


def test_tgir_loss_is_one_way():
    model = micro_model()
    out = model(micro_batch(4), "tgir")
    logits = out.outputs["scale"] * out.outputs["query"] @ out.outputs["target"].T
    assert torch.allclose(out.loss, F.cross_entropy(logits, torch.arange(4)), atol=1e-6)


def test_caption_loss_ignores_padding_by_default_and_trains_it_when_faithful():
    batch = micro_batch(2)
    content = int((batch["input_ids"] != 0).sum()) - 2  # tokens after the start token, up to the end token
    out = micro_model()(batch, "cap")
    assert out.outputs["targets"].numel() == content
    faithful = micro_model(caption_loss_on_padding=True)(batch, "cap")
    assert faithful.outputs["targets"].numel() == 2 * 76
    assert (faithful.outputs["targets"][-1] == 49407).all()


def test_fusion_ignores_text_padding_and_reduces_to_two_tower_without_xaa():
    model = micro_model().eval()
    batch = micro_batch(2)
    ids = batch["input_ids"].clone()
    noisy = ids.clone()
    eot = (ids == 49407).int().argmax(1)
    for i in range(2):
        noisy[i, eot[i] + 1 :] = torch.randint(1, 49406, (77 - eot[i] - 1,))
    with torch.no_grad():
        a = model.fused_features(batch["pixels"], ids, "scr")
        b = model.fused_features(batch["pixels"], noisy, "scr")
        assert torch.allclose(a[0], b[0], atol=1e-6) and torch.allclose(a[1], b[1], atol=1e-6)
        for blk in list(model.vision.blocks) + list(model.text.blocks):
            blk.xaa.adapter.up.weight.zero_()
            blk.xaa.adapter.up.bias.zero_()
        v, t = model.fused_features(batch["pixels"], ids, "scr")
        assert torch.allclose(v, model.image_features(batch["pixels"], "scr"), atol=1e-6)
        assert torch.allclose(t, model.text_features(ids, "scr"), atol=1e-6)


def test_fusion_is_cross_modal():
    model = micro_model().eval()
    batch = micro_batch(2)
    with torch.no_grad():
        v1, _ = model.fused_features(batch["pixels"], batch["input_ids"], "tgir")
        v2, _ = model.fused_features(batch["pixels"], token_batch(2, seed=9), "tgir")
    assert not torch.allclose(v1, v2)


def test_public_api_shapes():
    model = micro_model().eval()
    b = micro_batch(2)
    with torch.no_grad():
        assert model.encode_image(b["pixels"]).shape == (2, 64)
        assert torch.allclose(model.encode_text(b["input_ids"]).norm(dim=-1), torch.ones(2))
        assert model.compose(b["ref_pixels"], b["input_ids"]).shape == (2, 64)
        assert model.classify(b["pixels"], b["input_ids"]).shape == (2, 121)


def test_mixed_task_adapters_equal_per_task_calls():
    torch.manual_seed(1)
    tsa = perturb_(TaskAdapters(16, 4, ("itc", "tgir", "scr", "cap")), std=0.1)
    x = torch.randn(5, 3, 16, dtype=torch.float64, requires_grad=True)
    tsa = tsa.double()
    task_index = torch.tensor([2, 0, 2, 0, 2])  # tgir and cap absent
    out = tsa(x, task_index, residual=x)
    expected = torch.stack(
        [tsa(x[i : i + 1], tsa.tasks[t], residual=x[i : i + 1])[0] for i, t in enumerate(task_index.tolist())]
    )
    assert torch.allclose(out, expected)
    out.sum().backward()
    assert tsa.adapters["tgir"].down.weight.grad is None and tsa.adapters["cap"].up.weight.grad is None
    assert tsa.adapters["scr"].up.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_task_layout_equals_per_task_calls(backend, monkeypatch):
    """A TaskMix (host-side segments) gives the per-task results on either backend; the reference path
    slices the batch by the segments and never reads the device-side index."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(3)
    tsa = perturb_(TaskAdapters(16, 4, ("itc", "tgir", "scr", "cap")), std=0.1)
    for adapter in tsa.adapters.values():
        adapter.backend = backend
    x = torch.randn(5, 3, 16, requires_grad=True)
    mix = task_mix([2, 0, 3], [2, 1, 2], "cpu")
    out = tsa(x, mix, residual=x)
    expected = torch.cat([tsa(x[:2], "scr", x[:2]), tsa(x[2:3], "itc", x[2:3]), tsa(x[3:], "cap", x[3:])])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if backend == "torch":
        blind = mix._replace(index=torch.empty(5, dtype=torch.long, device="meta"))
        torch.testing.assert_close(tsa(x, blind, residual=x), expected)


def test_mixed_task_layout_asks_the_rule_for_a_mixed_call(monkeypatch):
    """The mixed-task pass tells the automatic choice that one call would hold several tasks' rows (the
    rule keeps those on the per-task PyTorch path on a GPU), and runs the per-task path when told "torch"."""
    import famevil_fast.model.adapters as adapters_module

    asked = []

    def rule(x, params, backend=None, mixed=False):
        asked.append(mixed)
        return "torch"

    monkeypatch.setattr(adapters_module, "adapter_backend", rule)
    tsa = perturb_(TaskAdapters(16, 4, ("itc", "tgir", "scr", "cap")), std=0.1)
    x = torch.randn(5, 3, 16)
    mix = task_mix([2, 0, 3], [2, 1, 2], "cpu")
    expected = torch.cat([tsa(x[:2], "scr", x[:2]), tsa(x[2:3], "itc", x[2:3]), tsa(x[3:], "cap", x[3:])])
    torch.testing.assert_close(tsa(x, mix, residual=x), expected)
    assert asked == [True]


def test_task_mix_from_an_index_tensor():
    mix = as_task_mix(torch.tensor([1, 1, 0, 2, 2, 2]), 6)
    assert mix.segments == ((1, 0, 2), (0, 2, 3), (2, 3, 6)) and mix.present == (0, 1, 2)
    with pytest.raises(ValueError, match="one per sample"):
        as_task_mix(torch.tensor([0, 1]), 3)


def test_distributed_gather_gives_the_global_loss():
    torch.manual_seed(2)
    img = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1).requires_grad_()
    scale = torch.tensor(9.0, dtype=torch.float64)
    full = itc_loss(img, txt, scale)
    g_full = torch.autograd.grad(full, (img, txt))
    parts = []
    for rank in range(2):
        rows = slice(3 * rank, 3 * rank + 3)
        parts.append(
            itc_loss(
                img[rows], txt[rows], scale, gather=lambda x, src=None, r=rank: _fake_gather(x, r, img, txt)
            )
        )
    mean = sum(parts) / 2
    assert torch.allclose(mean, full)
    g_mean = torch.autograd.grad(mean, (img, txt))
    assert all(torch.allclose(a, b) for a, b in zip(g_full, g_mean))


def _fake_gather(x, rank, img, txt):
    """Two-process all-gather with gradient flow, simulated: the other half comes from the full tensors."""
    full = img if any(x.data_ptr() == img[s].data_ptr() for s in (slice(0, 3), slice(3, 6))) else txt
    halves = [full[0:3], full[3:6]]
    halves[rank] = x
    return torch.cat(halves), 3 * rank


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, b: m.encode_image(torch.randn(2, 3, 48, 48)), "shape \\(B, 3, 32, 32\\)"),
        (lambda m, b: m.encode_image(b["pixels"].to(torch.uint8)), "floating-point"),
        (lambda m, b: m.encode_image(b["pixels"], task="xmr"), "unknown task 'xmr'"),
        (lambda m, b: m.encode_text(b["input_ids"].float()), "integer token ids"),
        (lambda m, b: m.encode_text(b["input_ids"] + 60000), "outside the vocabulary"),
        (lambda m, b: m.encode_text(torch.ones(2, 77, dtype=torch.long)), "no end-of-text token"),
        (lambda m, b: m.encode_text(torch.ones(2, 78, dtype=torch.long)), "1 <= L <= 77"),
        (lambda m, b: m.compose(b["pixels"][:1], b["input_ids"]), "batch sizes differ"),
        (lambda m, b: m({"pixels": b["pixels"]}, "itc"), "missing \\['input_ids'\\]"),
        (lambda m, b: m({**b, "labels": b["labels"] + 200}, "scr"), "labels must lie in"),
        (lambda m, b: m(b, "vqa"), "unknown task 'vqa'"),
    ],
)
def test_bad_input_raises_a_clear_error(call, message):
    model = micro_model()
    with pytest.raises(ValueError, match=message):
        call(model, micro_batch(3))


def test_task_not_in_model():
    model = FameViL(MICRO.replace(tasks=("itc",), xaa="none"))
    with pytest.raises(ValueError, match="unknown task 'tgir'"):
        model.compose(torch.randn(1, 3, 32, 32), token_batch(1))


def test_config_rejects_unpairable_towers():
    with pytest.raises(ValueError, match="24 layers"):
        FameViLConfig(clip=clip_preset("ViT-L/14"))
    assert FameViLConfig(clip=clip_preset("ViT-L/14"), xaa="none").clip.vision.layers == 24


def test_eager_attention_matches_sdpa():
    model = micro_model().eval()
    b = micro_batch(2)
    with torch.no_grad():
        ref = model.compose(b["ref_pixels"], b["input_ids"])
        model.set_runtime(attention="eager")
        assert torch.allclose(model.compose(b["ref_pixels"], b["input_ids"]), ref, atol=1e-6)


def test_mixed_task_forward_equals_separate_forwards():
    model = micro_model().double()
    batches = {
        t: {k: (v.double() if v.is_floating_point() else v) for k, v in micro_batch(3, seed=i).items()}
        for i, t in enumerate(("itc", "tgir", "scr", "cap"))
    }
    mixed = model.forward_mixed(batches)
    total = sum(out.loss for out in mixed.values())
    grads_mixed = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    separate = {t: model(b, t) for t, b in batches.items()}
    for t in batches:
        assert torch.allclose(mixed[t].loss, separate[t].loss, atol=1e-10), t
    grads_sep = torch.autograd.grad(
        sum(o.loss for o in separate.values()), list(model.parameters()), allow_unused=True
    )
    for a, b in zip(grads_mixed, grads_sep):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-9)


def test_trimming_text_padding_changes_no_output():
    model = micro_model().eval()
    b = micro_batch(3)
    ids = b["input_ids"]
    from famevil_fast.model.famevil import trim_text_padding

    assert trim_text_padding(ids).shape[1] == int((ids == 49407).int().argmax(1).max()) + 1
    with torch.no_grad():
        assert torch.allclose(model.text_features(ids, "itc"), model.text(ids, "itc"), atol=1e-6)
        full = model.caption_states(model.vision_memory(b["pixels"]), ids)
        trimmed = model.caption_states(model.vision_memory(b["pixels"]), trim_text_padding(ids))
        assert torch.allclose(full[:, : trimmed.shape[1]], trimmed, atol=1e-6)


def test_caption_vocabulary_shortlist():
    batch = micro_batch(2)
    vocab = tuple(sorted(set(batch["input_ids"].flatten().tolist()) - {0, 49406} | {49407}))
    model = micro_model(caption_vocab=vocab)
    out = model(batch, "cap")
    full = FameViL(MICRO)
    full.load_state_dict(model.state_dict())
    ref = full(batch, "cap")
    restricted = ref.outputs["logits"][:, list(vocab)]
    targets = torch.tensor([vocab.index(t) for t in ref.outputs["targets"].tolist()])
    assert torch.allclose(out.loss, F.cross_entropy(restricted, targets), atol=1e-5)
    with pytest.raises(ValueError, match="end token"):
        MICRO.replace(caption_vocab=(5, 6))


def test_caption_vocabulary_decoding_stays_in_the_shortlist():
    from famevil_fast.model.generation import generate, generate_by_reencoding

    vocab = (320, 1125, 3360, 49407)
    model = micro_model(caption_vocab=vocab, xaa="text").double().eval()
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        for beams in (1, 2):
            ids = generate(model, pixels, max_len=6, num_beams=beams)
            assert set(ids[:, 1:].flatten().tolist()) <= set(vocab)
            assert torch.equal(ids, generate_by_reencoding(model, pixels, max_len=6, num_beams=beams))


def test_every_task_runs_under_bf16_autocast():
    model = micro_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for task in ("itc", "tgir", "scr", "cap"):
            out = model(micro_batch(2), task)
            assert torch.isfinite(out.loss)
            out.loss.backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_adapter_mixes_stream_and_branch_dtypes_under_autocast(backend):
    from famevil_fast.model.adapters import BottleneckAdapter

    adapter = perturb_(BottleneckAdapter(64, 8), std=0.1)
    adapter.backend = backend
    a = torch.randn(5, 64)
    branch = torch.randn(5, 64).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = adapter(a, residual=[a, branch])
    ref = a + branch.float() + adapter.up(torch.relu(adapter.down(adapter.ln(a)))) * adapter.scale
    assert out.dtype == torch.float32
    assert torch.allclose(out, ref, atol=5e-2)


def test_set_runtime_validates_the_backend_and_changes_only_what_is_passed():
    model = micro_model()
    with pytest.raises(
        ValueError, match=r"backend must be one of \(None, 'torch', 'triton', 'cuda', 'cpu'\)"
    ):
        model.set_runtime(backend="gpu")
    assert model.config.backend is None  # the refused value was not stored
    model.set_runtime(backend="cuda")  # the compiled contrastive losses; the adapters choose automatically
    assert model.config.backend == "cuda" and model.vision.blocks[0].tsa.adapters["itc"].backend is None
    model.set_runtime(backend="torch")
    model.set_runtime(attention="eager")
    assert model.config.backend == "torch" and model.config.attention == "eager"
    assert model.vision.blocks[0].tsa.adapters["itc"].backend == "torch"
    model.set_runtime(backend=None)  # None, passed, means automatic
    assert model.config.backend is None and model.config.attention == "eager"
    with pytest.raises(ValueError, match="backend must be one of"):
        MICRO.replace(backend="bogus")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.pop("clip"), r"lacks the field\(s\) \['clip'\]"),
        (lambda d: d.update(adapter_bottleneck="64"), "famevil.adapter_bottleneck must be int, got str '64'"),
        (lambda d: d["clip"]["vision"].update(foo=1), r"unknown field\(s\) under 'clip.vision': \['foo'\]"),
        (lambda d: d["clip"].pop("text"), r"'clip' lacks the field\(s\) \['text'\]"),
        (lambda d: d.update(tasks=["itc", 3]), r"famevil.tasks must be tuple\[str, ...\]"),
    ],
)
def test_config_from_dict_names_the_bad_field(edit, message):
    stored = MICRO.to_dict()
    assert FameViLConfig.from_dict(stored) == MICRO
    edit(stored)
    with pytest.raises(ValueError, match=message):
        FameViLConfig.from_dict(stored)


def test_activation_backend_sets_the_quick_gelus_apart_from_the_other_ops(tmp_path) -> None:
    """``activation_backend`` names the QuickGELUs' backend; None leaves them on that of ``backend``; a
    checkpoint and a training recipe's ``model.activation_backend`` set it; a bad value is refused by name."""
    from trainer_fixtures import micro_config

    from famevil_fast.model.adapters import BottleneckAdapter
    from famevil_fast.model.clip import QuickGELU
    from famevil_fast.train.trainer import build_model

    config = FameViLConfig(clip=clip_preset("micro"), activation_backend="triton")
    model = FameViL(config)

    def backends(kind):
        return {m.backend for m in model.modules() if isinstance(m, kind)}

    assert backends(QuickGELU) == {"triton"} and backends(BottleneckAdapter) == {None}
    model.set_runtime(backend="torch")
    assert backends(QuickGELU) == {"triton"} and backends(BottleneckAdapter) == {"torch"}
    model.set_runtime(activation_backend=None)
    assert backends(QuickGELU) == {"torch"}
    model.set_runtime(backend="cuda", activation_backend="torch")
    assert backends(QuickGELU) == {"torch"} and backends(BottleneckAdapter) == {None}
    with pytest.raises(ValueError, match="activation_backend must be one of"):
        config.replace(activation_backend="cuda")
    with pytest.raises(ValueError, match="activation_backend must be one of"):
        model.set_runtime(activation_backend="flash")
    model.save_pretrained(tmp_path / "saved")
    assert FameViL.from_pretrained(tmp_path / "saved").config.activation_backend == "torch"
    model = build_model(micro_config(tmp_path / "run", "model.activation_backend=triton"))
    assert backends(QuickGELU) == {"triton"} and backends(BottleneckAdapter) == {None}
