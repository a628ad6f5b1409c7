"""Atomic writes: the file appears whole, with the permissions a plain write gives, and a failed write
leaves nothing behind."""

import os
import stat
from pathlib import Path

import pytest

from famevil_fast.files import (
    atomic_write,
    atomic_write_json,
    atomic_write_together,
    default_mode,
    json_writer,
)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_permissions_of_a_plain_write(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write_json(tmp_path / "sub" / "a.json", {"a": 1})
    assert (tmp_path / "sub" / "a.json").read_text() == '{"a": 1}'
    assert _mode(tmp_path / "sub" / "a.json") == _mode(plain) == default_mode()
    (tmp_path / "d").mkdir()
    assert _mode(tmp_path / "d") == default_mode(directory=True)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, [1])

    def half_then_fail(tmp):
        tmp.write_text("[2, ")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "[1]" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_files_written_together_are_renamed_only_once_all_are_written(tmp_path):
    """Weights and config: a writer that fails leaves both old files and no temporary; no file is renamed
    into place before the last one is written."""
    weights, config = tmp_path / "model.bin", tmp_path / "sub" / "config.json"
    atomic_write_together({weights: lambda tmp: tmp.write_text("old"), config: json_writer({"v": 1})})
    seen = []

    def config_failing(tmp):
        seen.append(weights.read_text())  # the weights are written but not yet in place
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_together({weights: lambda tmp: tmp.write_text("new"), config: config_failing})
    assert seen == ["old"] and weights.read_text() == "old" and config.read_text() == '{"v": 1}'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "model.bin", "sub"]
    atomic_write_together({weights: lambda tmp: tmp.write_text("new"), config: json_writer({"v": 2})})
    assert weights.read_text() == "new" and config.read_text() == '{"v": 2}'
    assert _mode(weights) == _mode(config) == default_mode()


def test_a_failed_group_write_removes_the_folders_it_made_and_a_directory_target_is_refused_first(tmp_path):
    weights = tmp_path / "new" / "deep" / "model.bin"

    def failing(tmp):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write_together(
            {weights: lambda tmp: tmp.write_text("w"), tmp_path / "new" / "c.json": failing}
        )
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "config.json").mkdir()
    with pytest.raises(IsADirectoryError, match="config.json: it is a directory"):
        atomic_write_together(
            {tmp_path / "model.bin": json_writer(1), tmp_path / "config.json": json_writer(2)}
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # the weights not written either


@pytest.fixture
def umask_022():
    """The process umask set to 022 for the test (and the package's cached reading of it), then restored."""
    from famevil_fast import files

    previous = os.umask(0o022)
    files._umask.cache_clear()
    yield
    os.umask(previous)
    files._umask.cache_clear()


def _modes(directory) -> dict[str, int]:
    return {p.name: _mode(p) for p in directory.iterdir()}


def test_safetensors_files_get_the_permissions_of_a_plain_write(tmp_path, umask_022):
    """safetensors' own writer makes its files private (0o600); ours does not."""
    import torch
    from safetensors.torch import load_file

    from famevil_fast.files import atomic_save_safetensors

    target = tmp_path / "sub" / "t.safetensors"
    atomic_save_safetensors(target, {"a": torch.arange(3.0)}, {"k": "v"})
    assert torch.equal(load_file(str(target))["a"], torch.arange(3.0))
    assert _modes(target.parent) == {"t.safetensors": 0o644}  # and no temporary left behind


def test_every_checkpoint_file_gets_the_permissions_of_a_plain_write(tmp_path, umask_022):
    import torch

    from famevil_fast.model import FameViL, FameViLConfig, clip_preset
    from famevil_fast.train.checkpoint import OPTIMIZER_FILE, RNG_FILE, CheckpointManager

    model = FameViL(FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.logit_scale.sum().backward()
    optimizer.step()  # the optimizer holds tensors to write
    path = CheckpointManager(tmp_path).save(1, model, optimizer, {})
    modes = _modes(path)
    assert {OPTIMIZER_FILE, RNG_FILE, "model.safetensors", "config.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o644)
    assert _mode(path) == 0o755


def test_embed_output_gets_the_permissions_of_a_plain_write(tmp_path, umask_022):
    from helpers import save_micro_checkpoint

    from famevil_fast.cli.main import main

    checkpoint = save_micro_checkpoint(tmp_path)
    texts = tmp_path / "texts.txt"
    texts.write_text("red silk dress\nblue denim jacket\n")
    out = tmp_path / "out" / "emb.safetensors"
    assert main(["embed", str(checkpoint), "--texts", str(texts), "--out", str(out)]) == 0
    assert _modes(out.parent) == {"emb.safetensors": 0o644}  # written whole: no temporary left behind


def test_the_folders_of_renamed_files_are_synced_after_the_renames(tmp_path, monkeypatch):
    import famevil_fast.files as files

    synced, real = [], files.fsync_directory

    def record(path):
        synced.append((Path(path), sorted(p.name for p in Path(path).iterdir())))

    monkeypatch.setattr(files, "fsync_directory", record)
    files.atomic_write_together(
        {tmp_path / "a.json": json_writer({}), tmp_path / "sub" / "b.json": json_writer({})}
    )
    assert synced == [(tmp_path, ["a.json", "sub"]), (tmp_path / "sub", ["b.json"])]
    real(tmp_path)  # on a real folder
    real(tmp_path / "missing")  # nothing to sync: no error
