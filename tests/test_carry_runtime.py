"""bench/carry_runtime.sh: the run-time packages the GPU machines lack, copied into one folder that a
Python without them imports from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "carry_runtime.sh"
NEEDED = ("ftfy", "wcwidth", "open_clip", "pycocoevalcap")


def _run(out: Path, python: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=python, CARRY_RUNTIME_OUT=str(out))
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_packs_what_a_bare_python_then_imports(tmp_path: Path) -> None:
    for name in NEEDED:
        pytest.importorskip(name)
    out = tmp_path / "site"
    result = _run(out, sys.executable)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(NEEDED)
    assert not (out / "pycocoevalcap" / "meteor").exists() and not (out / "pycocoevalcap" / "spice").exists()
    assert list((out / "open_clip").glob("bpe_simple_vocab_16e6.txt.gz"))
    assert not list(out.rglob("__pycache__"))
    # -S: no site-packages, so each import below can come only from the packed folder
    probe = "import ftfy, wcwidth, pycocoevalcap.bleu.bleu"  # CIDEr and ROUGE-L also need numpy
    assert (out / "pycocoevalcap" / "cider" / "cider.py").is_file()
    assert (out / "pycocoevalcap" / "rouge" / "rouge.py").is_file()
    env = dict(os.environ, PYTHONPATH=str(out))
    bare = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True)
    assert bare.returncode == 0, bare.stderr


def test_a_python_without_them_is_named(tmp_path: Path) -> None:
    python = shutil.which("python3")
    if python is None or subprocess.run([python, "-c", "import ftfy"], capture_output=True).returncode == 0:
        pytest.skip("needs a python3 on PATH without ftfy")
    result = _run(tmp_path / "site", python)
    assert result.returncode != 0
    assert "carry_runtime: ftfy" in result.stderr and "not installed" in result.stderr
    assert not (tmp_path / "site").exists()


def test_a_folder_holding_other_files_is_not_replaced(tmp_path: Path) -> None:
    out = tmp_path / "site"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _run(out, sys.executable)
    assert result.returncode != 0 and "holds other files (notes.txt)" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"


def test_relative_paths_are_the_callers(tmp_path: Path) -> None:
    for name in NEEDED:
        pytest.importorskip(name)
    env = dict(os.environ, PYTHON=sys.executable, CARRY_RUNTIME_OUT="here/site")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "here" / "site" / "ftfy").is_dir()
