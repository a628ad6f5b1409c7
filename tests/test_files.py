"""Atomic writes: the file appears whole, with the permissions a plain write gives, and a failed write
leaves nothing behind."""

import os
import stat

import pytest

from famevil_fast.files import atomic_write, atomic_write_json, default_mode


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
