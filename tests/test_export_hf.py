"""`convert --to huggingface`: a directory that transformers' CLIPModel loads as it is (config.json and
model.safetensors, the same embeddings as the model's CLIP backbone), and the single-file export beside it."""

import dataclasses
import json

import pytest
import torch
from helpers import TINY_WITH_VOCAB as TINY
from helpers import perturb_

from famevil_fast.cli.main import main
from famevil_fast.model import CLIP, FameViL, FameViLConfig, clip_preset
from famevil_fast.model.famevil import DiscardedWeightsWarning
from famevil_fast.text import tokenize

transformers = pytest.importorskip("transformers")

MICRO_GELU = FameViLConfig(
    clip=dataclasses.replace(clip_preset("micro"), activation="gelu"), adapter_bottleneck=8, xaa_bottleneck=8
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    perturb_(FameViL(TINY), std=0.05).save_pretrained(path)
    return path


def _backbone(checkpoint) -> CLIP:
    """The CLIP backbone of a FAME-ViL checkpoint (its adapters and heads are discarded, with a warning)."""
    with pytest.warns(DiscardedWeightsWarning):
        return CLIP.from_pretrained(checkpoint).eval()


def _features(out) -> torch.Tensor:
    """A CLIPModel's ``get_*_features`` result (a tensor, or an output holding it as ``pooler_output``)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _assert_same_embeddings(hf, backbone: CLIP) -> None:
    size = backbone.config.vision.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = tokenize(["red silk dress", "a blue denim jacket with two pockets", "shoes"])
    with torch.no_grad():
        image = _features(hf.get_image_features(pixel_values=pixels))
        text = _features(hf.get_text_features(input_ids=ids))
        torch.testing.assert_close(image, backbone.encode_image(pixels), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(text, backbone.encode_text(ids), rtol=1e-5, atol=1e-6)


def _load_hf(directory):
    model, info = transformers.CLIPModel.from_pretrained(str(directory), output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    return model.eval()


def test_a_directory_destination_loads_in_transformers(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "exports" / "hf"
    assert main(["convert", str(tiny_checkpoint), str(out), "--to", "huggingface"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    printed = capsys.readouterr().out
    assert "the CLIP backbone only" in printed and "task adapters" in printed and "heads" in printed
    config = json.loads((out / "config.json").read_text())
    clip = TINY.clip
    assert config["model_type"] == "clip" and config["projection_dim"] == clip.embed_dim
    assert config["vision_config"]["num_attention_heads"] == clip.vision.heads == 4
    assert config["text_config"]["hidden_act"] == "quick_gelu"
    assert config["vision_config"]["image_size"] == clip.vision.image_size
    _assert_same_embeddings(_load_hf(out), _backbone(tiny_checkpoint))
    # famevil_fast reads the export back with the same CLIP config (head counts from config.json)
    assert CLIP.from_pretrained(out).config == clip


def test_gelu_and_an_existing_directory(tmp_path):
    """A GELU model (hidden_act "gelu") written into an existing directory whose name has a dot."""
    model = perturb_(FameViL(MICRO_GELU), std=0.05).eval()
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "clip.v1"
    out.mkdir()
    assert main(["convert", str(tmp_path / "ckpt"), str(out), "--to", "huggingface"]) == 0
    assert json.loads((out / "config.json").read_text())["text_config"]["hidden_act"] == "gelu"
    _assert_same_embeddings(_load_hf(out), _backbone(tmp_path / "ckpt"))


def test_a_file_destination_is_still_one_file(tiny_checkpoint, tmp_path):
    out = tmp_path / "hf.safetensors"
    assert main(["convert", str(tiny_checkpoint), str(out), "--to", "huggingface"]) == 0
    assert out.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["hf.safetensors"]
    assert CLIP.from_pretrained(out).config == TINY.clip
    from safetensors.torch import load_file

    from famevil_fast.model.export import huggingface_config

    hf = transformers.CLIPModel(transformers.CLIPConfig(**huggingface_config(TINY.clip, 2.6592)))
    missing, unexpected = hf.load_state_dict(load_file(str(out)), strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    _assert_same_embeddings(hf.eval(), _backbone(tiny_checkpoint))


def test_destination_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    cases = {
        tmp_path / "taken" / "hf": "taken is a file, not a directory",
        tmp_path / "out.zip": "or give a directory name without a suffix",
    }
    for dest, message in cases.items():
        assert main(["convert", str(tiny_checkpoint), str(dest), "--to", "huggingface"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    weights = next(p for p in tiny_checkpoint.iterdir() if p.suffix == ".safetensors")
    over_source = [  # the directory itself, a file inside it, the folder of a file source
        (tiny_checkpoint, tiny_checkpoint),
        (tiny_checkpoint, tiny_checkpoint / "hf.safetensors"),
        (weights, tiny_checkpoint),
    ]
    for source, dest in over_source:
        assert main(["convert", str(source), str(dest), "--to", "huggingface"]) == 2
        assert "would write over the source checkpoint" in capsys.readouterr().err
    assert FameViL.from_pretrained(tiny_checkpoint).config == TINY
    assert main(["convert", str(tiny_checkpoint), str(tmp_path / "off"), "--to", "official"]) == 2
    assert "its name must end in one of" in capsys.readouterr().err  # official stays a single file
