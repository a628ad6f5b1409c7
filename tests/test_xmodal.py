"""The Cross-Modal Adapter variant: arithmetic against a plain reference (forward and backward), weight
sharing between the towers, parameter counts equal to the adapter's formula, save/load, freezing (by default
when training, with exact resume), decoding."""

import warnings

import pytest
import torch
from helpers import token_batch

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.config import CLIPConfig, TextConfig, VisionConfig
from famevil_fast.model.generation import generate, generate_by_reencoding
from famevil_fast.model.xmodal import CrossModalAdapter, SharedUp, xmodal_parameter_count
from famevil_fast.train.optim import freeze_backbone


def _config(**kw) -> FameViLConfig:
    cfg = dict(
        clip=clip_preset("micro"),
        tasks=("itc", "tgir", "scr", "cap"),
        adapter_type="xmodal",
        xmodal_bottleneck=4,
        xmodal_shared=8,
        num_classes=10,
    )
    cfg.update(kw)
    return FameViLConfig(**cfg)


def _spec_formula(d_v, d_t, layers, r, d_s, tasks):
    """Spec section 7: per (layer, site) two modality-specific down-projections, two modality-specific
    up-projections onto d - d_s channels and one shared up-projection onto d_s channels."""
    down = (d_v * r + r) + (d_t * r + r)
    own_up = (r * (d_v - d_s) + (d_v - d_s)) + (r * (d_t - d_s) + (d_t - d_s))
    shared_up = r * d_s + d_s
    return tasks * layers * 2 * (down + own_up + shared_up)


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "xma" in name or "xmodal_shared" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


# ------------------------------------------------------------------------------------------ arithmetic
@pytest.mark.parametrize("rows, width, r, d_s", [(1, 5, 1, 0), (7, 12, 3, 5), (2, 9, 4, 9)])
def test_adapter_matches_reference_forward_and_backward(rows, width, r, d_s):
    adapter = CrossModalAdapter(width, r, d_s).double()
    shared = SharedUp(r, d_s).double()
    adapter.bind(shared)
    with torch.no_grad():
        for p in [*adapter.parameters(), *shared.parameters()]:
            p.normal_()
    x = torch.randn(3, rows, width, dtype=torch.float64, requires_grad=True)
    got = adapter(x)
    params = [
        adapter.down.weight,
        adapter.down.bias,
        adapter.up.weight,
        adapter.up.bias,
        shared.weight,
        shared.bias,
    ]
    wd, bd, wu, bu, ws, bs = params
    h = wd @ x.unsqueeze(-1)
    h = h.squeeze(-1) + bd
    h = h * torch.sigmoid(1.702 * h)
    own = h @ wu.T + bu
    common = h @ ws.T + bs
    want = x + torch.cat([own, common], dim=-1)
    torch.testing.assert_close(got, want)
    weights = torch.randn_like(want)
    for a, b in zip(
        torch.autograd.grad((got * weights).sum(), [x, *params]),
        torch.autograd.grad((want * weights).sum(), [x, *params]),
    ):
        torch.testing.assert_close(a, b)


def test_block_places_sequential_adapters_after_attention_and_mlp():
    model = _perturb(FameViL(_config()))
    block = model.vision.blocks[1]
    h = torch.randn(2, 5, 64)
    attn = block.attn(block.ln_1(h))
    adapter = block.xma.attn.adapters["scr"]
    a = h + adapter(attn)
    mlp = block.mlp(block.ln_2(a))
    want = a + block.xma.mlp.adapters["scr"](mlp)
    torch.testing.assert_close(block(h, "scr"), want)
    assert block.tsa is None
    plain = h + attn
    torch.testing.assert_close(block(h, None), plain + block.mlp(block.ln_2(plain)))


def test_mixed_task_rows_match_single_task_calls():
    model = _perturb(FameViL(_config()))
    pixels = torch.randn(4, 3, 32, 32)
    task = torch.tensor([0, 2, 0, 1])
    mixed = model.vision(pixels, task)
    for i, t in enumerate(task.tolist()):
        torch.testing.assert_close(
            mixed[i], model.vision(pixels[i : i + 1], model.config.tasks[t])[0], rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("sizes", [(2, 4, 2), (3, 3), (1,) * 9])
def test_mixed_task_adapters_match_each_task_alone_forward_and_backward(sizes):
    """Segments of tasks 0, 2, 0, ... (``sizes`` samples each; task 1 absent) through one site's adapters:
    in equal chunks as batched products ((2, 4, 2): four chunks of 2; (3, 3): two of 3), or (nine
    segments) one call per segment. Outputs and every gradient equal each task's own adapter on its
    samples (float64); the absent task gets no gradient; the grouped layouts split nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from famevil_fast.model.task_mix import MAX_GROUPED_CHUNKS
    from famevil_fast.model.xmodal import CrossModalTaskAdapters

    torch.manual_seed(0)
    tasks = ("itc", "tgir", "scr")
    site = CrossModalTaskAdapters(12, 3, 5, tasks).double()
    shares = {t: SharedUp(3, 5).double() for t in tasks}
    for t in tasks:
        site.adapters[t].bind(shares[t])
    index = torch.cat([torch.full((n,), (0, 2)[i % 2]) for i, n in enumerate(sizes)])
    y = torch.randn(len(index), 6, 12, dtype=torch.float64, requires_grad=True)

    class Calls(TorchDispatchMode):
        names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    with Calls() as calls:
        out = site(y, index)
    grouped = len(sizes) <= MAX_GROUPED_CHUNKS
    assert grouped == ("split_with_sizes" not in calls.names)
    weights = torch.randn_like(out)
    params = [*site.parameters(), *(p for t in tasks for p in shares[t].parameters())]
    grads = torch.autograd.grad((out * weights).sum(), [y, *params], allow_unused=True)
    expected = torch.cat([site.adapters[tasks[int(t)]](y[i : i + 1]) for i, t in enumerate(index)])
    want = torch.autograd.grad((expected * weights).sum(), [y, *params], allow_unused=True)
    torch.testing.assert_close(out, expected)
    for g, w in zip(grads, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w)
    absent = {id(p) for p in (*site.adapters["tgir"].parameters(), *shares["tgir"].parameters())}
    assert all(g is None for p, g in zip(params, grads[1:]) if id(p) in absent)
    assert sum(g is None for g in grads) == len(absent)


# ------------------------------------------------------------------------------------------ sharing
def test_last_channels_are_shared_between_towers():
    model = FameViL(_config())
    d_s = model.config.xmodal_shared
    for layer in range(2):
        for site in ("attn", "mlp"):
            v = getattr(model.vision.blocks[layer].xma, site).adapters["itc"]
            t = getattr(model.text.blocks[layer].xma, site).adapters["itc"]
            wv, bv = v.up_params()
            wt, bt = t.up_params()
            assert torch.equal(wv[-d_s:], wt[-d_s:]) and torch.equal(bv[-d_s:], bt[-d_s:])
            assert v.down.weight is not t.down.weight and v.up.weight is not t.up.weight
            assert v._shared[0] is model.xmodal_shared[layer][site]["itc"]
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) == len(model.state_dict())


def test_shared_parameters_receive_gradient_from_both_towers():
    model = _perturb(FameViL(_config()))
    shared = model.xmodal_shared[0]["mlp"]["itc"].weight
    pixels, ids = torch.randn(2, 3, 32, 32), token_batch(2, seed=1)
    g_image = torch.autograd.grad(model.image_features(pixels, "itc").sum(), shared)[0]
    g_text = torch.autograd.grad(model.text_features(ids, "itc").sum(), shared)[0]
    g_both = torch.autograd.grad(
        (model.image_features(pixels, "itc") + model.text_features(ids, "itc")).sum(), shared
    )[0]
    assert g_image.abs().sum() > 0 and g_text.abs().sum() > 0
    torch.testing.assert_close(g_both, g_image + g_text, rtol=1e-5, atol=1e-7)


def test_initialisation_follows_the_reference():
    text = TextConfig(width=192, layers=2, heads=4, mlp_dim=64)
    model = FameViL(_config(clip=CLIPConfig(VisionConfig(32, 16, 256, 2, 4, 64), text, 64)))
    weights = torch.cat(
        [
            p.detach().flatten()
            for n, p in model.named_parameters()
            if ("xma" in n or "xmodal_shared" in n) and n.endswith("weight")
        ]
    )
    biases = [
        p for n, p in model.named_parameters() if ("xma" in n or "xmodal_shared" in n) and n.endswith("bias")
    ]
    assert 0.009 < float(weights.std()) < 0.011 and abs(float(weights.mean())) < 1e-3
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    assert not any(".ln" in n for n, _ in model.named_parameters() if "xma" in n)


# ------------------------------------------------------------------------------------------ counts
@pytest.mark.parametrize(
    "r, d_s, tasks", [(8, 16, ("itc",)), (4, 0, ("itc", "scr")), (2, 64, ("itc", "tgir", "cap"))]
)
def test_parameter_counts_equal_the_formula(r, d_s, tasks):
    model = FameViL(_config(xmodal_bottleneck=r, xmodal_shared=d_s, tasks=tasks))
    counts = model.parameter_counts()
    per_task = _spec_formula(64, 64, 2, r, d_s, 1)
    assert all(counts[f"xmodal.{t}"] == per_task for t in tasks)
    assert not any(k.startswith("tsa.") for k in counts)
    assert xmodal_parameter_count(64, 64, 2, r, d_s, len(tasks)) == per_task * len(tasks)


def test_vit_b16_size_matches_the_spec():
    with torch.device("meta"):
        model = FameViL(
            FameViLConfig(clip=clip_preset("ViT-B-16"), tasks=("itc",), adapter_type="xmodal", xaa="none")
        )
    assert model.parameter_counts()["xmodal.itc"] == _spec_formula(768, 512, 12, 8, 16, 1) == 519_168


# ------------------------------------------------------------------------------------------ save, freeze
def test_save_and_load_round_trip(tmp_path):
    model = _perturb(FameViL(_config())).eval()
    model.save_pretrained(tmp_path / "x")
    loaded = FameViL.from_pretrained(tmp_path / "x").eval()
    assert loaded.config == model.config
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b)
    pixels, ids = torch.randn(2, 3, 32, 32), token_batch(2, seed=2)
    torch.testing.assert_close(loaded.encode_image(pixels, "scr"), model.encode_image(pixels, "scr"))
    torch.testing.assert_close(loaded.compose(pixels, ids), model.compose(pixels, ids))
    with torch.no_grad():  # the loaded model's towers still share their parameters
        loaded.xmodal_shared[1]["attn"]["itc"].weight.add_(1.0)
    v = loaded.vision.blocks[1].xma.attn.adapters["itc"].up_params()[0]
    t = loaded.text.blocks[1].xma.attn.adapters["itc"].up_params()[0]
    assert torch.equal(v[-8:], t[-8:])


def test_backbone_export_leaves_the_adapters_out_and_the_official_layout_refuses_them(tmp_path):
    from famevil_fast.model.export import save_huggingface, save_official
    from famevil_fast.model.weights import is_new_module_key, load_clip_state_dict

    model = _perturb(FameViL(_config()))
    save_huggingface(model, tmp_path / "clip.safetensors")
    backbone, _ = load_clip_state_dict(str(tmp_path / "clip.safetensors"))
    own = model.state_dict()
    assert backbone.keys() == {k for k in own if not is_new_module_key(k)}
    assert all(torch.equal(backbone[k], own[k]) for k in backbone)
    with pytest.raises(ValueError, match="official FAME-ViL layout has no Cross-Modal Adapters"):
        save_official(model, tmp_path / "official.pth")


def test_frozen_backbone_trains_only_adapters_and_heads():
    model = FameViL(_config(xaa="none", tasks=("itc",)))
    trainable = freeze_backbone(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".xma." in n or n.startswith(("xmodal_shared.", "heads.")) for n in names)
    assert trainable == model.parameter_counts()["xmodal.itc"] + model.parameter_counts()["heads"]


def test_cached_decoding_equals_reencoding():
    model = _perturb(FameViL(_config())).eval()
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        generate(model, pixels, max_len=6), generate_by_reencoding(model, pixels, max_len=6)
    )


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(adapter_type="lora"), "adapter_type"),
        (dict(xmodal_shared=65), "xmodal_shared"),
        (dict(xmodal_bottleneck=0), "xmodal_bottleneck"),
        (
            dict(
                clip=CLIPConfig(VisionConfig(32, 16, 64, 3, 2, 128), TextConfig(64, 77, 64, 2, 2, 128), 64),
                xaa="none",
            ),
            "layers",
        ),
    ],
)
def test_bad_configs(changes, message):
    with pytest.raises(ValueError, match=message):
        _config(**changes)


def test_unbound_adapter_is_an_error():
    adapter = CrossModalAdapter(6, 2, 3)
    with pytest.raises(ValueError, match="not bound"):
        adapter(torch.randn(1, 6))
    with pytest.raises(ValueError, match="does not fit"):
        adapter.bind(SharedUp(2, 4))


# ------------------------------------------------------------------------------------------ training default
XMODAL = ("model.adapter_type=xmodal", "model.xmodal_bottleneck=4", "model.xmodal_shared=8")


@pytest.mark.parametrize(
    ("overrides", "frozen"),
    [
        ((), False),
        (XMODAL, True),
        ((*XMODAL, "train.freeze_backbone=false"), False),
        (("train.freeze_backbone=true",), True),
        (("model.adapter_type=tsa", "train.freeze_backbone=null"), False),
    ],
)
def test_freeze_backbone_follows_the_adapter_type_unless_set(overrides, frozen):
    from famevil_fast.train.config import load_config

    assert load_config(None, list(overrides)).train.freeze_backbone is frozen


def test_print_config_shows_the_resolved_freeze_backbone(capsys):
    from famevil_fast.cli.main import main
    from famevil_fast.train.config import describe_fields

    assert "freeze_backbone: null  # train only adapters" in describe_fields()
    assert "null = automatic: true with model.adapter_type xmodal" in describe_fields()
    for adapter_type, shown in (("xmodal", "true"), ("tsa", "false")):
        argv = [
            "train",
            "--config",
            "tiny_cpu",
            "--print-config",
            "--set",
            f"model.adapter_type={adapter_type}",
        ]
        assert main(argv) == 0
        assert f"  freeze_backbone: {shown}  #" in capsys.readouterr().out


def test_cross_modal_adapter_training_freezes_the_backbone_by_default(tmp_path):
    from trainer_fixtures import micro_config, streams

    from famevil_fast.train.trainer import RandomFrozenBackboneWarning, Trainer

    with pytest.warns(RandomFrozenBackboneWarning, match=r"true \(the default with model.adapter_type"):
        trainer = Trainer(micro_config(tmp_path, "train.updates=1", *XMODAL), streams())
    backbone = trainer.model.vision.blocks[0].mlp.fc1.weight.detach().clone()
    shared = trainer.model.xmodal_shared[0]["mlp"]["itc"].weight.detach().clone()
    trainer.fit()
    assert torch.equal(trainer.model.vision.blocks[0].mlp.fc1.weight, backbone)
    assert not torch.equal(trainer.model.xmodal_shared[0]["mlp"]["itc"].weight, shared)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(
        ".xma." in n or ".xaa." in n or n.startswith(("xmodal_shared.", "heads.")) for n in trainable
    )


@pytest.mark.parametrize("freeze", [True, False])
def test_a_frozen_backbone_that_no_weights_reached_is_warned_of(tmp_path, freeze: bool):
    """A frozen backbone built from the recipe with no starting weights stays random: a warning says so; a
    trained one, or a model handed to the trainer (its weights are the caller's), is not warned of."""
    from trainer_fixtures import micro_config, streams

    from famevil_fast.train.trainer import RandomFrozenBackboneWarning, Trainer, build_model

    config = micro_config(tmp_path, "train.updates=1", f"train.freeze_backbone={str(freeze).lower()}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(config, streams())
        Trainer(config, streams(), model=build_model(config))
    random_frozen = [w for w in caught if issubclass(w.category, RandomFrozenBackboneWarning)]
    assert len(random_frozen) == int(freeze)
    if freeze:
        assert "train.freeze_backbone is true, but model.init, init_from and resume_weights" in str(
            random_frozen[0].message
        )


def test_cross_modal_adapter_runs_resume_exactly_with_the_automatic_freeze(tmp_path):
    from test_resume_matrix import run_pair

    full, resumed = run_pair(tmp_path, XMODAL, k=2, n=3)
    assert full.cfg.train.freeze_backbone is True and resumed.cfg.train.freeze_backbone is True


def test_resume_refuses_a_checkpoint_whose_freeze_backbone_resolves_otherwise(tmp_path):
    from trainer_fixtures import micro_config, streams

    from famevil_fast.train.trainer import Trainer

    settings = ("train.updates=1", "checkpoint.every=1", *XMODAL)
    Trainer(micro_config(tmp_path, *settings, "train.freeze_backbone=false"), streams()).fit()
    resume = (*settings, "train.updates=2", "checkpoint.resume=true")
    with pytest.raises(
        ValueError, match=r"freeze_backbone: False -> True \(null, .* --set train.freeze_backbone=false\)"
    ):
        Trainer(micro_config(tmp_path, *resume), streams()).fit()
    assert (
        Trainer(micro_config(tmp_path, *resume, "train.freeze_backbone=false"), streams()).fit()["update"]
        == 2
    )
