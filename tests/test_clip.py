"""CLIP towers against transformers' CLIPModel and open_clip's CLIP on the same random weights."""

import pytest
import torch
from helpers import hf_clip, open_clip_model, perturb_, rel_err, token_batch

from famevil_fast.model import CLIP, CLIPConfig, FameViL, FameViLConfig, clip_preset
from famevil_fast.model.config import TextConfig, VisionConfig


def _hf_features(hf, pixels, ids):
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=pixels)
        txt = hf.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    return img, txt


def test_matches_transformers_from_directory(tmp_path):
    hf = hf_clip()
    hf.save_pretrained(tmp_path)
    ours = CLIP.from_pretrained(tmp_path).eval()
    pixels, ids = torch.randn(2, 3, 32, 32), token_batch(2)
    ref_img, ref_txt = _hf_features(hf, pixels, ids)
    with torch.no_grad():
        assert rel_err(ours.encode_image(pixels), ref_img) < 1e-5
        assert rel_err(ours.encode_text(ids), ref_txt) < 1e-5


def test_matches_transformers_state_dict_with_explicit_heads():
    hf = hf_clip(width=96, heads=3, text_width=64, text_heads=4)
    config = CLIPConfig(
        vision=VisionConfig(image_size=32, patch_size=16, width=96, layers=2, heads=3, mlp_dim=128),
        text=TextConfig(width=64, layers=2, heads=4, mlp_dim=128),
        embed_dim=48,
    )
    ours = CLIP.from_pretrained(hf.state_dict(), config).eval()
    pixels, ids = torch.randn(1, 3, 32, 32), token_batch(1, seed=3)
    ref_img, ref_txt = _hf_features(hf, pixels, ids)
    with torch.no_grad():
        assert rel_err(ours.encode_image(pixels), ref_img) < 1e-5
        assert rel_err(ours.encode_text(ids), ref_txt) < 1e-5


def test_matches_open_clip(tmp_path):
    oc = open_clip_model()
    path = tmp_path / "open_clip.pt"
    torch.save(oc.state_dict(), path)
    # no config and width 64 (not a standard CLIP width, nor a preset's sizes): the heads are not guessed
    with pytest.raises(ValueError, match=r"open_clip\.pt carries no model config.*vision width 64"):
        CLIP.from_pretrained(path)
    ours = CLIP.from_pretrained(
        path,
        CLIPConfig(
            vision=VisionConfig(32, 16, 64, 2, 2, 128),
            text=TextConfig(width=64, layers=2, heads=2, mlp_dim=128),
            embed_dim=48,
        ),
    ).eval()
    pixels, ids = torch.randn(3, 3, 32, 32), token_batch(3, seed=5)
    with torch.no_grad():
        assert rel_err(ours.encode_image(pixels), oc.encode_image(pixels)) < 1e-5
        assert rel_err(ours.encode_text(ids), oc.encode_text(ids)) < 1e-5


def test_openai_torchscript_archive(tmp_path):
    oc = open_clip_model(head_width=64, width=64)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.encode_image(x)

    # an OpenAI-style archive: a scripted module whose state dict carries the CLIP names
    scripted = torch.jit.trace(Wrapper(oc), torch.randn(1, 3, 32, 32))
    state = {k[len("m.") :]: v for k, v in scripted.state_dict().items()}
    assert "visual.conv1.weight" in state
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(_StateHolder(state)), path)
    config = CLIPConfig(
        vision=VisionConfig(32, 16, 64, 2, 1, 128),
        text=TextConfig(width=64, layers=2, heads=1, mlp_dim=128),
        embed_dim=48,
    )
    ours = CLIP.from_pretrained(path, config)  # width 64: head counts must be given
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(ours.encode_image(pixels), oc.encode_image(pixels)) < 1e-5


class _StateHolder(torch.nn.Module):
    """A TorchScript module whose parameters have exactly the given names (dots become submodules)."""

    def __init__(self, state):
        super().__init__()
        for name, value in state.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(value.detach().clone(), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_famevil_at_init_is_clip():
    """Zero-initialised adapters: FAME-ViL's two-tower embeddings equal CLIP's, for every task."""
    hf = hf_clip()
    clip_cfg = CLIPConfig(
        vision=VisionConfig(32, 16, 64, 2, 2, 128),
        text=TextConfig(width=64, layers=2, heads=2, mlp_dim=128),
        embed_dim=48,
    )
    model = FameViL.from_clip(hf.state_dict(), FameViLConfig(clip=clip_cfg)).eval()
    pixels, ids = torch.randn(2, 3, 32, 32), token_batch(2, seed=1)
    ref_img, ref_txt = _hf_features(hf, pixels, ids)
    with torch.no_grad():
        for task in ("itc", "tgir", "scr", "cap"):
            assert (
                rel_err(model.encode_image(pixels, task), torch.nn.functional.normalize(ref_img, dim=-1))
                < 1e-5
            )
            assert (
                rel_err(model.encode_text(ids, task), torch.nn.functional.normalize(ref_txt, dim=-1)) < 1e-5
            )


def test_gelu_variant_matches_transformers(tmp_path):
    hf = hf_clip(act="gelu")
    hf.save_pretrained(tmp_path)
    ours = CLIP.from_pretrained(tmp_path).eval()
    assert ours.config.activation == "gelu"
    pixels, ids = torch.randn(2, 3, 32, 32), token_batch(2)
    ref_img, ref_txt = _hf_features(hf, pixels, ids)
    with torch.no_grad():
        assert rel_err(ours.encode_image(pixels), ref_img) < 1e-5
        assert rel_err(ours.encode_text(ids), ref_txt) < 1e-5


@pytest.mark.slow
def test_vit_b16_matches_transformers_and_open_clip():
    import open_clip

    oc = perturb_(open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval(), std=0.002)
    ours = CLIP.from_pretrained(oc.state_dict()).eval()
    assert ours.config == clip_preset("ViT-B-16")
    pixels, ids = torch.randn(1, 3, 224, 224), token_batch(1, seed=7)
    with torch.no_grad():
        assert rel_err(ours.encode_image(pixels), oc.encode_image(pixels)) < 1e-5
        assert rel_err(ours.encode_text(ids), oc.encode_text(ids)) < 1e-5
        hf = hf_clip(
            width=768,
            layers=12,
            heads=12,
            mlp=3072,
            image_size=224,
            patch=16,
            embed=512,
            text_width=512,
            text_heads=8,
            text_mlp=2048,
        )
        hf.load_state_dict(_to_hf(ours), strict=True)
        ref_img, ref_txt = _hf_features(hf, pixels, ids)
        assert rel_err(ours.encode_image(pixels), ref_img) < 1e-5
        assert rel_err(ours.encode_text(ids), ref_txt) < 1e-5


def _to_hf(model: CLIP) -> dict:
    """famevil_fast names -> Hugging Face names (the inverse mapping, for this one test)."""
    from famevil_fast.model.export import to_huggingface

    return to_huggingface(model.state_dict())


def test_clip_encoders_validate_their_inputs():
    clip = CLIP(clip_preset("micro")).eval()
    pixels, ids = torch.randn(2, 3, 32, 32), token_batch(2)
    cases = [
        (lambda: clip.encode_image((pixels * 50).to(torch.uint8)), "floating-point"),
        (lambda: clip.encode_image(torch.randn(1, 3, 64, 64)), r"shape \(B, 3, 32, 32\)"),
        (lambda: clip.encode_image(pixels[:0]), "empty batch"),
        (lambda: clip.encode_text(ids + 60000), "outside the vocabulary"),
        (lambda: clip.encode_text(ids[:, :1]), "no end-of-text token"),
        (lambda: clip.encode_text(ids.float()), "integer token ids"),
        (lambda: clip.encode_text(torch.cat([ids, ids], 1)), r"1 <= L <= 77"),
        (lambda: clip.encode_text(ids[:0]), "B >= 1"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_config_less_clip_weights_get_heads_from_a_preset_or_are_refused(tmp_path):
    from safetensors.torch import save_file

    from famevil_fast.model.export import to_huggingface

    hf_layout = to_huggingface(perturb_(CLIP(clip_preset("micro"))).state_dict())
    save_file({k: v.contiguous() for k, v in hf_layout.items()}, str(tmp_path / "w.safetensors"))
    for load in (CLIP.from_pretrained, FameViL.from_clip):  # width 64 and no config: no guess
        with pytest.raises(ValueError, match=r"w\.safetensors carries no model config.*vision width 64"):
            load(tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="the given state dict carries no model config"):
        CLIP.from_pretrained(hf_layout)
    assert CLIP.from_pretrained(hf_layout, clip_preset("micro")).config == clip_preset("micro")
    # a file named after a preset of its sizes takes that preset's heads
    save_file({k: v.contiguous() for k, v in hf_layout.items()}, str(tmp_path / "micro.safetensors"))
    assert CLIP.from_pretrained(tmp_path / "micro.safetensors").config.vision.heads == 2
    # famevil_fast's own layout (models built from presets) matches any preset of the same sizes
    torch.save(CLIP(clip_preset("tiny")).state_dict(), tmp_path / "ViT-B-16.pt")
    assert FameViL.from_clip(tmp_path / "ViT-B-16.pt").config.clip == clip_preset("tiny")


def test_clip_weights_of_another_size_list_the_mismatches(tmp_path):
    torch.save(CLIP(clip_preset("tiny")).state_dict(), tmp_path / "tiny.pt")
    message = r"(?s)CLIP weights .*tiny\.pt does not match the model.*unexpected keys"
    with pytest.raises(ValueError, match=message):
        CLIP.from_pretrained(tmp_path / "tiny.pt", clip_preset("micro"))
