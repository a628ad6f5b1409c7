"""Every Triton kernel compiles ahead of time for NVIDIA targets, without a GPU, within the target's shared
memory.

The compilation runs ``python -m famevil_fast.kernels.aot`` in a subprocess with TRITON_INTERPRET=0
(the test session interprets kernels, and the compiler needs the real JIT functions). Compiled kernels
land in Triton's cache, so only kernels whose source changed are rebuilt on later runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from famevil_fast.kernels import aot  # noqa: E402


def compile_kernels(*args: str) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, "-m", "famevil_fast.kernels.aot", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Shared memory a block may use (opt-in maximum) per compute capability: a kernel compiled past it fails
# at launch with "out of resources", which only a card would show.
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def check_results(results: list[dict], archs: list[int], full: bool) -> None:
    expected = {
        (v.name, dtype, arch)
        for arch in archs
        for dtype, mixed in (("fp32", False), ("bf16", True))
        for v in aot.variants(dtype, mixed, full)
    }
    assert {(r["kernel"], r["dtype"], r["arch"]) for r in results} == expected
    for r in results:
        where = f"{r['kernel']} {r['dtype']} sm_{r['arch']}"
        assert r["ptx_target"], where
        assert r["cubin_bytes"] > 0, where
        assert r["shared_bytes"] <= SHARED_MEMORY_LIMIT[r["arch"]], f"{where}: {r['shared_bytes']} bytes"
        if "registers" in r:  # cuobjdump's resource report, where Triton ships the tool
            assert 0 < r["registers"] <= 255 and r["spill_stack_bytes"] >= 0, where
        if r["has_dot"]:
            # Hopper matrix products go through warpgroup MMA (bf16 and tf32 alike) where a row block has 64
            # rows or more, Ampere's (and smaller blocks') through mma.sync
            assert r["wgmma"] == (r["arch"] >= 90 and r["warpgroup_rows"]), where
            assert r["mma"], where


def test_every_kernel_compiles_for_sm90_in_fp32_and_bf16() -> None:
    results = compile_kernels("--arch", "90")
    check_results(results, [90], full=False)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80() -> None:
    """Ampere: the same kernels through mma.sync (python -m famevil_fast.kernels.aot --full also covers
    every other tile shape the launchers use)."""
    results = compile_kernels("--arch", "80")
    check_results(results, [80], full=False)
