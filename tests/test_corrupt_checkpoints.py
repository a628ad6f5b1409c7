"""Torch checkpoints that cannot be read: a file that is no torch file, or a damaged one, is called corrupt
or truncated in one line without pointing at ``trust_pickle``; a sound file that weights-only loading
refuses (it holds non-tensor objects) keeps the ``trust_pickle`` hint."""

import argparse
import os
import pickle
from pathlib import Path

import pytest
import torch

from famevil_fast.cli.main import main
from famevil_fast.model import FameViL
from famevil_fast.model.weights import read_state_dict, torch_file_damage

CORRUPT = "not a torch or safetensors file, or corrupt or truncated"
STATE = {"w": torch.arange(64 * 64, dtype=torch.float32).reshape(64, 64), "b": torch.zeros(3)}


def _save(path: Path, obj: object, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _cut(source: Path, path: Path, fraction: float = 0.5) -> Path:
    data = source.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    full = _save(tmp_path / "full.pth", STATE)
    legacy = _save(tmp_path / "legacy.pth", STATE, legacy=True)
    png = tmp_path / "image.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    noise = tmp_path / "noise.pth"
    noise.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    plain = tmp_path / "plain.pth"
    plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    return {
        "zip cut in half": _cut(full, tmp_path / "half.pth"),
        "zip cut to its head": _cut(full, tmp_path / "head.pth", 0.01),
        "legacy cut in the tensor data": _cut(legacy, tmp_path / "legacy_half.pth"),
        "legacy cut in the pickles": _cut(legacy, tmp_path / "legacy_head.pth", 0.02),
        "png": png,
        "random bytes": noise,
        "empty": empty,
        "plain pickle": plain,
    }


BAD = [
    "zip cut in half",
    "zip cut to its head",
    "legacy cut in the tensor data",
    "legacy cut in the pickles",
    "png",
    "random bytes",
    "empty",
    "plain pickle",
]


def _assert_corrupt_message(err: pytest.ExceptionInfo, path: Path) -> None:
    text = str(err.value)
    assert text.startswith(f"cannot read checkpoint {path}: {CORRUPT} (") and text.endswith(")"), text
    assert "trust" not in text.lower() and "\n" not in text and len(text) < 400, text


@pytest.mark.parametrize("trust_pickle", [False, True])
@pytest.mark.parametrize("name", BAD)
def test_a_damaged_or_foreign_file_is_called_corrupt_without_the_trust_hint(name, trust_pickle, tmp_path):
    path = _bad_files(tmp_path)[name]
    with pytest.raises(ValueError) as err:
        read_state_dict(path, trust_pickle)
    _assert_corrupt_message(err, path)


@pytest.mark.parametrize("name", ["zip cut in half", "png", "empty"])
def test_from_pretrained_and_from_clip_report_a_damaged_file_as_corrupt(name, tmp_path):
    path = _bad_files(tmp_path)[name]
    for load in (FameViL.from_pretrained, FameViL.from_clip):
        with pytest.raises(ValueError) as err:
            load(path)
        _assert_corrupt_message(err, path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_sound_files_are_sound_and_still_load(legacy, tmp_path):
    path = _save(tmp_path / "ok.pth", STATE, legacy=legacy)
    assert torch_file_damage(path) is None
    state, _ = read_state_dict(path)
    assert torch.equal(state["w"], STATE["w"])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_sound_file_holding_non_tensor_objects_keeps_the_trust_pickle_hint(legacy, tmp_path):
    container = {"model": STATE, "args": argparse.Namespace(lr=1e-4)}
    path = _save(tmp_path / "container.pth", container, legacy=legacy)
    assert torch_file_damage(path) is None
    with pytest.raises(ValueError) as err:
        read_state_dict(path)
    text = str(err.value)
    assert text.startswith(f"cannot read checkpoint {path}: weights-only loading refused"), text
    assert "argparse.Namespace" in text and "\n" not in text and CORRUPT not in text
    assert text.endswith(
        "(if the file is trusted and holds non-tensor objects, pass trust_pickle=True; "
        "famevil-fast: --trust-pickle, or model.trust_pickle: true in a recipe)"
    )
    state, _ = read_state_dict(path, trust_pickle=True)
    assert torch.equal(state["w"], STATE["w"])


def test_a_trusted_file_naming_a_missing_class_is_not_called_corrupt(tmp_path):
    path = _save(tmp_path / "container.pth", {"model": STATE, "args": argparse.Namespace()})
    # the same file, with the pickled class renamed to one that does not exist
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    (data_pkl,) = [n for n in members if n.endswith("/data.pkl")]
    assert b"argparse\nNamespace" in members[data_pkl]
    members[data_pkl] = members[data_pkl].replace(b"argparse\nNamespace", b"argparse\nNoSuchKl")
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    assert torch_file_damage(path) is None
    with pytest.raises(ValueError) as err:
        read_state_dict(path, trust_pickle=True)
    text = str(err.value)
    assert "NoSuchKl" in text and CORRUPT not in text and "\n" not in text, text


@pytest.mark.parametrize("name", ["zip cut in half", "png"])
def test_convert_of_a_damaged_file_is_one_line_and_exit_status_2(name, tmp_path, capsys):
    path = _bad_files(tmp_path)[name]
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("famevil-fast convert: error: cannot read checkpoint"), err
    assert CORRUPT in err[0] and "trust" not in err[0].lower()
    assert not (tmp_path / "out").exists()


def test_convert_of_a_container_still_points_at_trust_pickle(tmp_path, capsys):
    path = _save(tmp_path / "container.pth", {"model": STATE, "args": argparse.Namespace()})
    assert main(["convert", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-pickle" in err[0] and CORRUPT not in err[0], err
