"""Checkpoint formats: famevil_fast's own files, the official FAME-ViL layout, errors on bad files."""

import pytest
import torch
from helpers import perturb_, token_batch

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.export import to_official_famevil
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
    """Key names, count and shapes of the released r=512 checkpoint (CHECKPOINT_LAYOUT.md)."""
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
    # head counts are not stored in the official layout: CLIP's 64-wide heads are assumed unless given
    assert FameViL.from_pretrained(path).config.clip.vision.heads == 1
    loaded = FameViL.from_pretrained(path, clip=MICRO.clip)
    assert loaded.config.adapter_bottleneck == 8 and loaded.config.xaa == "both"
    assert _same_weights(model, loaded)
    pixels, ids = torch.randn(2, 3, 32, 32), token_batch(2)
    with torch.no_grad():
        assert torch.equal(loaded.compose(pixels, ids), model.compose(pixels, ids))


def test_loads_bare_ddp_state_dict_and_single_task_teacher(model, tmp_path):
    bare = to_official_famevil(model.state_dict(), prefix="module.model.")
    torch.save(bare, tmp_path / "fashionclip_final.pth")
    assert _same_weights(model, FameViL.from_pretrained(tmp_path / "fashionclip_final.pth"))
    teacher = FameViL(MICRO.replace(tasks=("scr",)))
    state = to_official_famevil(teacher.state_dict(), prefix="model.")
    state = {
        k.replace(".adapt_mlp.scr.", ".adapt_mlp."): v for k, v in state.items()
    }  # teachers have no task segment
    torch.save(state, tmp_path / "teacher.pth")
    loaded = FameViL.from_pretrained(tmp_path / "teacher.pth")
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
        FameViL.from_pretrained(tmp_path / "bad.safetensors", num_classes=121)
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
