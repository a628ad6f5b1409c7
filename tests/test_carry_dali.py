"""bench/carry_dali.sh: wheels packed into parts here, received one part per call and installed there.

The download is replaced by two small wheels built here (CARRY_DALI_WHEELS), cut into 2 KiB parts.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "carry_dali.sh"


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_wheel(folder: Path, package: str, payload: bytes) -> Path:
    """A minimal pure-Python wheel: ``package/__init__.py`` (VALUE = payload length) plus a data file."""
    dist = f"{package}-1.0.dist-info"
    files = {
        f"{package}/__init__.py": f"VALUE = {len(payload)}\n".encode(),
        f"{package}/payload.bin": payload,
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(name, data) for name, data in files.items()] + [f"{dist}/RECORD,,"]
    path = folder / f"{package}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return path


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def packed(tmp_path: Path) -> tuple[dict[str, str], list[Path]]:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "carried_a", os.urandom(3000))
    make_wheel(wheels, "carried_b", os.urandom(1500))
    env = {
        "CARRY_DALI_WHEELS": str(wheels),
        "CARRY_DALI_OUT": str(tmp_path / "out"),
        "CARRY_DALI_PART_SIZE": "2K",
        "CARRY_DALI_PARTS": str(tmp_path / "received"),
        "CARRY_DALI_SITE": str(tmp_path / "site"),
    }
    result = run("pack", env=env)
    assert result.returncode == 0, result.stderr
    parts = sorted((tmp_path / "out").glob("part_*"))
    assert len(parts) >= 5 and all(p.stat().st_size <= 2048 for p in parts)
    return env, parts


def test_parts_received_one_by_one_install_and_import(packed, tmp_path: Path) -> None:
    env, parts = packed
    for i in range(len(parts)):
        result = run("receive", str(i), env=env)
        assert result.returncode == 0, result.stderr
    result = run("install", env=env)
    assert result.returncode == 0, result.stderr
    check = subprocess.run(
        [sys.executable, "-c", "import carried_a, carried_b; print(carried_a.VALUE, carried_b.VALUE)"],
        env={**os.environ, "PYTHONPATH": env["CARRY_DALI_SITE"]},
        capture_output=True,
        text=True,
    )
    assert check.stdout.split() == ["3000", "1500"], check.stderr


def test_a_missing_part_stops_the_install(packed) -> None:
    env, parts = packed
    for i in range(len(parts)):
        if i != 2:
            assert run("receive", str(i), env=env).returncode == 0
    result = run("install", env=env)
    assert result.returncode == 2
    assert "carry_dali:" in result.stderr
    assert not Path(env["CARRY_DALI_SITE"]).exists()


def test_a_part_not_carried_is_named(packed) -> None:
    env, parts = packed
    result = run("receive", str(len(parts)), env=env)
    assert result.returncode == 2 and f"part_{len(parts)}" in result.stderr


def test_gpu_session_names_its_slices():
    """bench/gpu_session.sh refuses a slice it does not know, with the usage line (exit 2)."""
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_session.sh"), "7"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "usage" in result.stderr and "0|1|2|3|4" in result.stderr


@pytest.mark.parametrize(
    ("parts", "benches", "named"),
    [
        ("build,benches", "", "benches"),
        ("bench", "imtl,trainstep", "trainstep"),
        ("bench", "imtl retreival", "retreival"),
    ],
)
def test_gpu_check_refuses_unknown_names_before_running(tmp_path: Path, parts, benches, named):
    """bench/gpu_check.sh stops (exit 2), naming a misspelt part or benchmark, before it runs anything."""
    env = dict(
        os.environ,
        OUT=str(tmp_path / "out"),
        GPU_CHECK_PARTS_DIR=str(tmp_path / "parts"),
        GPU_CHECK_DRY="1",
        GPU_CHECK_PARTS=parts,
        GPU_CHECK_BENCH=benches,
        PYTHON=sys.executable,
    )
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 2 and f"'{named}'" in result.stdout
    assert not list((tmp_path / "parts").iterdir())
