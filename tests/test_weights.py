"""Checkpoint formats: famevil_fast's own files, the official FAME-ViL layout, errors on bad files."""

import pytest
import torch
from helpers import TINY_WITH_VOCAB as TINY
from helpers import perturb_, token_batch

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.export import save_huggingface, save_official, to_official_famevil
from famevil_fast.model.weights import WEIGHTS_FILE

MICRO = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8)


@pytest.fixture(scope="module")
def model():
    return perturb_(FameViL(MICRO), std=0.05).eval()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_and_load_roundtrip(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", WEIGHTS_FILE]
    loaded = FameViL.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert _same_weights(model, loaded)
    # the single safetensors file carries its config too
    assert _same_weights(model, FameViL.from_pretrained(tmp_path / "ckpt" / WEIGHTS_FILE))


def test_official_layout_names_and_shapes_for_the_release():
    """Key names, count and shapes of the released r=512 checkpoint (the official layout)."""
    with torch.device("meta"):
        state = to_official_famevil(
            FameViL(FameViLConfig(adapter_bottleneck=512)).state_dict(), prefix="module.model."
        )
    assert len(state) == 1486
    expected = {
        "module.model.clip.logit_scale": (),
        "module.model.clip.text_model.embeddings.position_ids": (1, 77),
        "module.model.clip.vision_model.embeddings.position_ids": (1, 197),
        "module.model.clip.vision_model.pre_layrnorm.weight": (768,),
        "module.model.clip.vision_model.embeddings.patch_embedding.weight": (768, 3, 16, 16),
        "module.model.clip.visual_projection.weight": (512, 768),
        "module.model.clip.text_model.encoder.layers.3.self_attn.k_proj.weight": (512, 512),
        "module.model.clip.text_model.encoder.layers.0.adapt_mlp.itc.adapter_layer_norm_before.weight": (
            512,
        ),
        "module.model.clip.vision_model.encoder.layers.11.adapt_mlp.cap.down_proj.weight": (512, 768),
        "module.model.clip.vision_model.encoder.layers.11.adapt_mlp.cap.up_proj.weight": (768, 512),
        "module.model.clip.vision_model.encoder.layers.5.adapt_mlp.tgir.scale": (1,),
        "module.model.clip.text_model.encoder.layers.2.cross_attn.key.weight": (512, 768),
        "module.model.clip.vision_model.encoder.layers.2.cross_attn.value.weight": (768, 512),
        "module.model.clip.vision_model.encoder.layers.7.cross_attn.xattn_adapter.down_proj.weight": (
            64,
            768,
        ),
        "module.model.clip.text_model.encoder.layers.7.cross_attn.context_layernorm.weight": (768,),
        "module.model.heads.itc.norm_s": (1,),
        "module.model.heads.scr.weight": (121, 512),
        "module.model.heads.cap.bias": (49408,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    per_layer = [k for k in state if ".vision_model.encoder.layers.4." in k]
    assert len(per_layer) == 61


def test_loads_official_checkpoint_with_teachers_in_a_training_container(model, tmp_path):
    state = to_official_famevil(model.state_dict(), prefix="model.")
    state["model.balances.itc"] = torch.ones(1)
    state["model.teachers.itc.clip.logit_scale"] = torch.tensor(1.0)
    path = tmp_path / "best.ckpt"
    torch.save({"model": state, "num_updates": 7}, path)
    # head counts are not stored in the official layout, and width 64 is no standard CLIP width: no guess
    with pytest.raises(ValueError, match=r"best\.ckpt carries no model config.*vision width 64"):
        FameViL.from_pretrained(path)
    loaded = FameViL.from_pretrained(path, clip=MICRO.clip)
    assert loaded.config.adapter_bottleneck == 8 and loaded.config.xaa == "both"
    assert _same_weights(model, loaded)
    pixels, ids = torch.randn(2, 3, 32, 32), token_batch(2)
    with torch.no_grad():
        assert torch.equal(loaded.compose(pixels, ids), model.compose(pixels, ids))


def test_loads_bare_ddp_state_dict_and_single_task_teacher(model, tmp_path):
    bare = to_official_famevil(model.state_dict(), prefix="module.model.")
    torch.save(bare, tmp_path / "fashionclip_final.pth")
    assert _same_weights(model, FameViL.from_pretrained(tmp_path / "fashionclip_final.pth", clip=MICRO.clip))
    teacher = FameViL(MICRO.replace(tasks=("scr",)))
    state = to_official_famevil(teacher.state_dict(), prefix="model.")
    state = {
        k.replace(".adapt_mlp.scr.", ".adapt_mlp."): v for k, v in state.items()
    }  # teachers have no task segment
    torch.save(state, tmp_path / "teacher.pth")
    loaded = FameViL.from_pretrained(tmp_path / "teacher.pth", clip=MICRO.clip)
    assert loaded.config.tasks == ("scr",)
    assert _same_weights(teacher, loaded)


def test_mismatching_checkpoint_lists_missing_unexpected_and_mismatched_keys(model, tmp_path):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["vision.ln_post.weight"]
    state["vision.extra"] = torch.zeros(1)
    state["heads.scr.bias"] = torch.zeros(7)
    state["heads.scr.weight"] = torch.zeros(7, 64)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as err:
        FameViL.from_pretrained(tmp_path / "bad.safetensors", clip=MICRO.clip, num_classes=121)
    text = str(err.value)
    assert "vision.ln_post.weight" in text and "vision.extra" in text and "heads.scr.bias: file (7,)" in text


def test_truncated_and_missing_files(model, tmp_path):
    model.save_pretrained(tmp_path / "ok")
    data = (tmp_path / "ok" / WEIGHTS_FILE).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        FameViL.from_pretrained(tmp_path / "cut.safetensors")
    torch.save(model.state_dict(), tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        FameViL.from_pretrained(tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        FameViL.from_pretrained(tmp_path / "nowhere.pth")


def test_from_clip_accepts_every_clip_layout_and_rejects_foreign_weights(tmp_path):
    from famevil_fast.model import CLIP

    clip = perturb_(CLIP(clip_preset("micro")))
    model = FameViL.from_clip(clip.state_dict(), MICRO)
    assert torch.equal(model.vision.proj.weight, clip.vision.proj.weight)
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        FameViL.from_clip({"encoder.weight": torch.zeros(2)}, MICRO)
    with pytest.raises(ValueError, match="does not match"):
        FameViL.from_clip(clip.state_dict(), FameViLConfig(clip=clip_preset("tiny")))


# ---------------------------------------------------------------- settings the weights do not carry


@pytest.fixture(scope="module")
def tiny():
    return perturb_(FameViL(TINY), std=0.05).eval()


def _same_outputs(a: FameViL, b: FameViL) -> bool:
    pixels, ids = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), token_batch(2)
    with torch.no_grad():
        states = a.caption_states(a.vision_memory(pixels), ids)
        return (
            torch.equal(a.encode_image(pixels), b.encode_image(pixels))
            and torch.equal(a.encode_text(ids), b.encode_text(ids))
            and torch.equal(a.caption_logits(states), b.caption_logits(states))
        )


@pytest.mark.parametrize("name", ["c.pth", "c.safetensors"])
def test_official_export_keeps_the_config_beside_the_official_keys(tiny, tmp_path, name):
    written = save_official(tiny, tmp_path / name)
    path = tmp_path / name
    if name.endswith(".pth"):
        assert written == [path, tmp_path / "c.pth.config.json"]
        tensors = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        assert written == [path]  # the config is in the safetensors metadata, no sidecar
        tensors = load_file(str(path))
    assert sorted(tensors) == sorted(
        to_official_famevil(tiny.state_dict())
    )  # nothing the official code lacks
    loaded = FameViL.from_pretrained(path).eval()
    assert loaded.config == TINY
    assert _same_weights(tiny, loaded) and _same_outputs(tiny, loaded)


def test_official_file_without_config_and_a_nonstandard_width_is_refused(tiny, tmp_path):
    path = save_official(tiny, tmp_path / "c.pth")[0]
    (tmp_path / "c.pth.config.json").unlink()
    with pytest.raises(
        ValueError, match=r"c\.pth carries no model config.*vision width 128.*c\.pth\.config\.json"
    ):
        FameViL.from_pretrained(path)
    loaded = FameViL.from_pretrained(path, clip=TINY.clip).eval()
    assert loaded.config.clip.vision.heads == 4 and loaded.config.caption_vocab is None
    (tmp_path / "c.pth.config.json").write_text('{"text_config": {"num_attention_heads": 4}}')
    with pytest.raises(ValueError, match="vision width 128") as err:  # a Hugging Face style hint counts
        FameViL.from_pretrained(path)
    assert "text width" not in str(err.value)


def test_huggingface_export_keeps_the_clip_config(tiny, tmp_path):
    from famevil_fast.model import CLIP
    from famevil_fast.model.famevil import DiscardedWeightsWarning

    tiny.save_pretrained(tmp_path / "ckpt")
    for name in ("clip.safetensors", "pytorch_model.bin"):
        save_huggingface(tiny, tmp_path / name)
        back = CLIP.from_pretrained(tmp_path / name).eval()
        with pytest.warns(DiscardedWeightsWarning):  # the backbone of a FAME-ViL checkpoint
            ref = CLIP.from_pretrained(tmp_path / "ckpt").eval()
        assert back.config == TINY.clip
        pixels, ids = torch.randn(2, 3, 64, 64), token_batch(2)
        with torch.no_grad():
            assert torch.equal(back.encode_image(pixels), ref.encode_image(pixels))
            assert torch.equal(back.encode_text(ids), ref.encode_text(ids))
        assert FameViL.from_clip(tmp_path / name).config.clip == TINY.clip
        with pytest.raises(ValueError, match=r"is a CLIP checkpoint.*FameViL\.from_clip"):
            FameViL.from_pretrained(tmp_path / name)  # no adapters or heads: not a FAME-ViL checkpoint


def test_weights_file_suffix_picks_the_format_and_bad_outputs_are_named(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"out\.zip.*must end in one of"):
        save_official(tiny, tmp_path / "out.zip")
    (tmp_path / "taken").write_text("")
    with pytest.raises(NotADirectoryError, match="taken is a file"):
        save_official(tiny, tmp_path / "taken" / "c.pth")
    (tmp_path / "dir.pth").mkdir()
    with pytest.raises(IsADirectoryError, match=r"dir\.pth: it is a directory"):
        save_official(tiny, tmp_path / "dir.pth")
    path = save_official(tiny, tmp_path / "new" / "deeper" / "c.pt")[0]  # parents are created
    assert FameViL.from_pretrained(path).config == TINY


def test_corrupt_configs_are_named(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{\n")
    with pytest.raises(ValueError, match=r"cannot read .*ckpt/config\.json: not valid JSON"):
        FameViL.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object"):
        FameViL.from_pretrained(tmp_path / "ckpt")
    path = save_official(model, tmp_path / "c.pth")[0]
    (tmp_path / "c.pth.config.json").write_bytes(b"\xff")
    with pytest.raises(ValueError, match=r"cannot read .*c\.pth\.config\.json: not valid JSON"):
        FameViL.from_pretrained(path)


# ---------------------------------------------------------------- loading returns ready-to-use models
def test_loaded_models_are_in_eval_mode(tmp_path):
    from famevil_fast.model import CLIP

    model = perturb_(FameViL(MICRO.replace(adapter_dropout=0.5)), std=0.05)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = FameViL.from_pretrained(tmp_path / "ckpt")
    assert not loaded.training  # dropout off: inference is deterministic
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels), loaded.encode_image(pixels))
    clip = CLIP(clip_preset("micro"))
    assert not FameViL.from_clip(clip.state_dict(), MICRO).training
    assert not CLIP.from_pretrained(clip.state_dict(), clip_preset("micro")).training


def test_from_pretrained_refuses_a_clip_only_checkpoint(tmp_path):
    from famevil_fast.model import CLIP

    torch.save(CLIP(clip_preset("micro")).state_dict(), tmp_path / "clip.pt")
    with pytest.raises(ValueError, match=r"clip\.pt is a CLIP checkpoint.*FameViL\.from_clip"):
        FameViL.from_pretrained(tmp_path / "clip.pt")
    assert FameViL.from_clip(tmp_path / "clip.pt").config.clip == clip_preset("micro")


def _official_with(model, tmp_path, name, edit):
    state = to_official_famevil(model.state_dict(), prefix="model.")
    edit(state)
    torch.save(state, tmp_path / name)
    return tmp_path / name


def test_unexpected_official_content_is_named(model, tmp_path):
    layer = "model.clip.text_model.encoder.layers.0."
    path = _official_with(
        model, tmp_path, "foo.pth", lambda s: s.update({layer + "adapt_mlp.itc.foo.weight": torch.zeros(3)})
    )
    with pytest.raises(
        ValueError, match=r"^checkpoint .*foo\.pth: .*adapter key adapt_mlp\.itc\.foo\.weight.*expected one"
    ):
        FameViL.from_pretrained(path, clip=MICRO.clip)
    with pytest.raises(ValueError, match=r"^CLIP weights .*foo\.pth: .*adapter key adapt_mlp\.itc\.foo"):
        FameViL.from_clip(path, MICRO)

    def nas(state):
        for key in [k for k in state if ".adapt_mlp." in k]:
            value = state.pop(key)
            if ".adapt_mlp.itc." in key:
                state[key.replace(".adapt_mlp.itc.", ".adapt_mlp.adapters.0.")] = value

    with pytest.raises(ValueError, match=r"adapt_mlp\.adapters\.0\..*nas_adapter layout"):
        FameViL.from_pretrained(_official_with(model, tmp_path, "nas.pth", nas), clip=MICRO.clip)
    bad_q = {layer + "self_attn.q_proj.weight": torch.zeros(64, 32)}
    path = _official_with(model, tmp_path, "q.pth", lambda s: s.update(bad_q))
    with pytest.raises(ValueError, match=r"equal shapes.*q_proj\.weight': \(64, 32\)"):
        FameViL.from_pretrained(path, clip=MICRO.clip)
    down = "model.clip.vision_model.encoder.layers.0.adapt_mlp.itc.down_proj.weight"
    path = _official_with(model, tmp_path, "int.pth", lambda s: s.update({down: s[down].long()}))
    with pytest.raises(ValueError, match=r"vision\.blocks\.0\.tsa\.adapters\.itc\.down\.weight: file dtype"):
        FameViL.from_pretrained(path, clip=MICRO.clip)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda c: c["famevil"].pop("clip"), r"\['clip'\]"),
        (lambda c: c["famevil"].update(adapter_bottleneck="64"), "adapter_bottleneck must be int"),
        (lambda c: c["famevil"]["clip"]["vision"].update(foo=1), r"'clip\.vision': \['foo'\]"),
        (lambda c: c["famevil"].update(backend="gpu"), "backend must be one of"),
    ],
)
def test_malformed_stored_config_names_the_file_and_field(model, tmp_path, edit, field):
    import json

    model.save_pretrained(tmp_path / "ckpt")
    stored = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    edit(stored)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(stored))
    with pytest.raises(ValueError, match=rf"ckpt/config\.json is invalid: .*{field}"):
        FameViL.from_pretrained(tmp_path / "ckpt")


def test_official_export_refuses_pretraining_tasks(tmp_path):
    config = FameViLConfig(clip=clip_preset("micro"), tasks=("itc", "mvc", "pac", "itm"), num_attributes=5)
    model = FameViL(config)
    with pytest.raises(ValueError, match=r"no pre-training tasks .*e\.g\. heads\.itm"):
        save_official(model, tmp_path / "c.pth")
    assert not (tmp_path / "c.pth").exists()


def test_huggingface_config_of_vit_l_14_has_openai_sizes():
    """The config.json of a Hugging Face export: every size from the model's CLIP config (those of
    openai/clip-vit-large-patch14 for ViT-L-14)."""
    from famevil_fast.model.export import huggingface_config

    config = huggingface_config(clip_preset("ViT-L-14"), 4.6052)
    assert (config["model_type"], config["projection_dim"], config["logit_scale_init_value"]) == (
        "clip",
        768,
        4.6052,
    )
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act")
    text, vision = config["text_config"], config["vision_config"]
    assert [text[k] for k in sizes] == [768, 12, 12, 3072, "quick_gelu"]
    assert [vision[k] for k in sizes] == [1024, 24, 16, 4096, "quick_gelu"]
    assert (text["vocab_size"], text["max_position_embeddings"]) == (49408, 77)
    assert (vision["image_size"], vision["patch_size"]) == (224, 14)
    assert text["eos_token_id"] == 49407  # pooled at the first end token, as famevil_fast's text tower
