"""Checkpoint edge cases: a stored config comes before a preset and contradicting it is refused, transfers
check the stored CLIP config, damaged or odd files are named in one clear error, and the export and CLI
options that would write unreadable files are refused."""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from helpers import hf_clip, perturb_, save_micro_checkpoint, token_batch

from famevil_fast.cli.main import main
from famevil_fast.model import CLIP, FameViL, FameViLConfig, clip_preset
from famevil_fast.model.export import save_huggingface, save_official, to_official_famevil
from famevil_fast.model.famevil import DiscardedWeightsWarning
from famevil_fast.model.transfer import load_shared_weights
from famevil_fast.model.weights import StoredConfigConflict, load_famevil_checkpoint, torch_file_damage

MICRO = clip_preset("micro")
CORRUPT = "corrupt or truncated"


def _error_line(capsys: pytest.CaptureFixture[str], command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"famevil-fast {command}: error: "), err
    return err[0]


def _micro_with(**clip_changes: object) -> FameViLConfig:
    """The micro FAME-ViL (r = 8) with some CLIP fields changed (``vision_heads`` sets the vision tower's)."""
    vision_heads = clip_changes.pop("vision_heads", None)
    clip = dataclasses.replace(MICRO, **clip_changes)
    if vision_heads is not None:
        clip = dataclasses.replace(clip, vision=dataclasses.replace(clip.vision, heads=vision_heads))
    return FameViLConfig(clip=clip, adapter_bottleneck=8, xaa_bottleneck=8)


def _saved(directory: Path, config: FameViLConfig, tasks: tuple[str, ...] | None = None) -> Path:
    if tasks is not None:
        config = config.replace(tasks=tasks)
    model = perturb_(FameViL(config), std=0.05)
    model.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- a Hugging Face config before a preset
@pytest.mark.parametrize("name", ["tiny", "other_name"])
def test_a_hugging_face_directory_named_after_a_preset_keeps_its_own_config(tmp_path, name):
    # the sizes of the tiny preset, but 2 heads (tiny has 4) and GELU (tiny has QuickGELU)
    hf = hf_clip(width=128, layers=4, heads=2, mlp=512, image_size=64, patch=16, embed=128, act="gelu")
    hf.save_pretrained(tmp_path / name)
    ours = CLIP.from_pretrained(tmp_path / name)
    assert (ours.config.vision.heads, ours.config.text.heads, ours.config.activation) == (2, 2, "gelu")
    ids = token_batch(2, 77)
    with torch.no_grad():
        theirs = hf.get_text_features(input_ids=ids)
        theirs = theirs if torch.is_tensor(theirs) else theirs.pooler_output
        torch.testing.assert_close(ours.encode_text(ids), theirs, atol=1e-5, rtol=1e-5)
    assert FameViL.from_clip(tmp_path / name).config.clip == ours.config


# ---------------------------------------------------------------- a preset against a stored config
def test_convert_refuses_a_clip_preset_that_the_stored_config_contradicts(tmp_path, capsys):
    source = _saved(tmp_path / "h1", _micro_with(vision_heads=1))
    assert main(["convert", str(source), str(tmp_path / "out"), "--clip", "micro"]) == 2
    line = _error_line(capsys, "convert")
    assert "--clip micro" in line and str(source / "config.json") in line
    assert "vision.heads (stored 1, preset 2)" in line and not (tmp_path / "out").exists()
    # without --clip the stored config is kept as it is
    assert main(["convert", str(source), str(tmp_path / "out")]) == 0
    assert FameViL.from_pretrained(tmp_path / "out").config.clip.vision.heads == 1
    with pytest.raises(StoredConfigConflict, match="vision.heads"):
        load_famevil_checkpoint(FameViL, source, preset=MICRO)


def test_convert_takes_a_clip_preset_equal_to_the_stored_config_or_for_a_config_less_file(tmp_path):
    source = save_micro_checkpoint(tmp_path)
    assert main(["convert", str(source), str(tmp_path / "same"), "--clip", "micro"]) == 0
    assert main(["convert", str(source), str(tmp_path / "o.pth"), "--to", "official"]) == 0
    (tmp_path / "o.pth.config.json").unlink()
    assert main(["convert", str(tmp_path / "o.pth"), str(tmp_path / "back"), "--clip", "micro"]) == 0
    assert FameViL.from_pretrained(tmp_path / "back").config.clip == MICRO


def test_convert_from_clip_refuses_a_clip_preset_that_the_stored_config_contradicts(tmp_path, capsys):
    model = FameViL(_micro_with(activation="gelu"))
    save_huggingface(model, tmp_path / "clip.safetensors")
    argv = ["convert", str(tmp_path / "clip.safetensors"), str(tmp_path / "out"), "--from-clip"]
    assert main([*argv, "--clip", "micro"]) == 2
    assert "activation (stored 'gelu', preset 'quick_gelu')" in _error_line(capsys, "convert")
    assert main(argv) == 0
    assert FameViL.from_pretrained(tmp_path / "out").config.clip.activation == "gelu"


# ---------------------------------------------------------------- transfers
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"activation": "gelu"}, "activation (stored 'gelu', model 'quick_gelu')"),
        ({"vision_heads": 1}, "vision.heads"),
    ],
)
def test_a_transfer_refuses_a_checkpoint_stored_with_another_clip_config(tmp_path, changes, field):
    source = _saved(tmp_path / "src", _micro_with(**changes), tasks=("itc",))
    target = FameViL(_micro_with().replace(tasks=("itc", "scr")))
    with pytest.raises(ValueError, match="cannot start this model") as error:
        load_shared_weights(target, source)
    assert field in str(error.value) and str(source / "config.json") in str(error.value)


@pytest.mark.parametrize("key", ["model", "state_dict"])
def test_a_transfer_unwraps_a_training_container(tmp_path, key):
    source = perturb_(FameViL(_micro_with().replace(tasks=("itc",))), std=0.05)
    target = FameViL(_micro_with().replace(tasks=("itc", "scr")))
    report = load_shared_weights(target, {key: source.state_dict(), "epoch": 3})
    assert report.loaded and torch.equal(target.vision.ln_pre.weight, source.vision.ln_pre.weight)


# ---------------------------------------------------------------- damaged and odd files
def test_a_zip_with_a_damaged_central_directory_is_called_corrupt(tmp_path):
    path = save_micro_checkpoint(tmp_path)
    model = FameViL.from_pretrained(path)
    save_official(model, tmp_path / "m.pth")
    data = bytearray((tmp_path / "m.pth").read_bytes())
    first = data.find(b"PK\x01\x02")
    data[first : first + 4] = b"XXXX"
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(data))
    for load in (FameViL.from_pretrained, CLIP.from_pretrained):
        with pytest.raises(ValueError, match=CORRUPT) as error:
            load(bad)
        assert f"cannot read checkpoint {bad}" in str(error.value)


@pytest.mark.parametrize("config", ["[1, 2]", '"ViT-B-16"', "3"])
def test_safetensors_config_metadata_that_is_no_json_object_is_named(tmp_path, config):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(1)}, str(path), metadata={"config": config})
    for load in (FameViL.from_pretrained, CLIP.from_pretrained, FameViL.from_clip):
        with pytest.raises(ValueError, match="must be a JSON object") as error:
            load(path)
        assert f"the config metadata of {path}" in str(error.value)


def test_a_pickle_declaring_a_huge_length_is_called_corrupt(tmp_path):
    path = tmp_path / "crafted.pth"
    path.write_bytes(b"\x80\x02\x8d" + struct.pack("<Q", 2**62) + b"abc")  # BINBYTES8 of 2**62 bytes
    assert torch_file_damage(path) is not None
    with pytest.raises(ValueError, match=CORRUPT) as error:
        FameViL.from_pretrained(path)
    assert str(path) in str(error.value)


def test_clip_from_pretrained_takes_trust_pickle(tmp_path):
    clip = perturb_(CLIP(MICRO), std=0.05)
    path = tmp_path / "container.pt"
    torch.save({"state_dict": clip.state_dict(), "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        CLIP.from_pretrained(path, MICRO)
    loaded = CLIP.from_pretrained(path, MICRO, trust_pickle=True)
    assert torch.equal(loaded.text.ln_final.weight, clip.text.ln_final.weight)


def test_clip_from_pretrained_warns_of_the_adapters_and_heads_it_discards(tmp_path):
    path = save_micro_checkpoint(tmp_path)
    with pytest.warns(DiscardedWeightsWarning, match="CLIP.from_pretrained keeps only its CLIP backbone"):
        CLIP.from_pretrained(path)
    save_huggingface(FameViL.from_pretrained(path), tmp_path / "clip.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiscardedWeightsWarning)
        CLIP.from_pretrained(tmp_path / "clip.safetensors")


# ---------------------------------------------------------------- export options
def test_official_export_without_task_names_refuses_several_tasks():
    model = FameViL(_micro_with())
    with pytest.raises(ValueError, match="task_segment=False .* 4 tasks"):
        to_official_famevil(model.state_dict(), task_segment=False)
    single = FameViL(_micro_with().replace(tasks=("scr",)))
    keys = to_official_famevil(single.state_dict(), task_segment=False)
    assert any(".adapt_mlp.down_proj." in k for k in keys)


def test_official_export_refuses_a_prefix_without_its_dot(tmp_path, capsys):
    with pytest.raises(ValueError, match="'foo'"):
        to_official_famevil(FameViL(_micro_with()).state_dict(), prefix="foo")
    source = save_micro_checkpoint(tmp_path)
    argv = ["convert", str(source), str(tmp_path / "p.pth"), "--to", "official", "--prefix"]
    assert main([*argv, "foo"]) == 2
    assert "--prefix 'foo'" in _error_line(capsys, "convert") and not (tmp_path / "p.pth").exists()
    for prefix in ("module.model.", ""):
        assert main([*argv, prefix]) == 0
        state = torch.load(tmp_path / "p.pth")
        assert all(k.startswith(f"{prefix}clip.") or k.startswith(f"{prefix}heads.") for k in state)
        assert FameViL.from_pretrained(tmp_path / "p.pth").config == FameViL.from_pretrained(source).config


# ---------------------------------------------------------------- info --checkpoint --clip
def test_info_counts_a_config_less_checkpoint_with_a_clip_preset(tmp_path, capsys):
    source = save_micro_checkpoint(tmp_path)
    save_official(FameViL.from_pretrained(source), tmp_path / "o.pth")
    (tmp_path / "o.pth.config.json").unlink()
    assert main(["info", "--checkpoint", str(tmp_path / "o.pth")]) == 2
    assert "--clip PRESET" in _error_line(capsys, "info")
    assert main(["info", "--checkpoint", str(tmp_path / "o.pth"), "--clip", "micro"]) == 0
    total = FameViL.from_pretrained(source).parameter_counts()["total"]
    assert f"{total:,}" in capsys.readouterr().out
    # a checkpoint with its own config: the same preset is taken, another one is refused
    assert main(["info", "--checkpoint", str(source), "--clip", "micro"]) == 0
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(source), "--clip", "tiny"]) == 2
    line = _error_line(capsys, "info")
    assert "--clip tiny cannot be used with --checkpoint" in line and "vision.width (stored 64" in line


def test_info_still_refuses_bottleneck_and_xaa_with_a_checkpoint(tmp_path, capsys):
    source = save_micro_checkpoint(tmp_path)
    assert main(["info", "--checkpoint", str(source), "--bottleneck", "4"]) == 2
    assert "--bottleneck cannot be used with --checkpoint" in _error_line(capsys, "info")


def test_a_preset_is_checked_against_the_config_in_the_weights_metadata(tmp_path):
    """A famevil_fast directory keeps its config in the weights' metadata too: a preset is checked
    against it when config.json is gone."""
    source = _saved(tmp_path / "h1", _micro_with(vision_heads=1))
    (source / "config.json").unlink()
    meta = json.loads(_metadata(source / "model.safetensors")["config"])
    assert meta["famevil"]["clip"]["vision"]["heads"] == 1
    with pytest.raises(StoredConfigConflict, match="vision.heads"):
        load_famevil_checkpoint(FameViL, source, preset=MICRO)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
