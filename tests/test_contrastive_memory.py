"""Extra peak memory of the CPU contrastive loss (forward + backward), measured in a fresh process as the
growth of its peak resident set (VmHWM, reset through /proc/self/clear_refs just before the loss)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from famevil_fast.ops import contrastive as C

MiB = 1 << 20

_SCRIPT = textwrap.dedent(
    """
    import re, sys
    import torch
    from famevil_fast.ops import contrastive_loss

    def status(key):
        return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

    m, d = int(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    warm = [torch.randn(64, d, requires_grad=True) for _ in range(2)]
    contrastive_loss(warm[0], warm[1], 2.0, backend="cpu").backward()  # thread pool and libraries in place
    a = torch.nn.functional.normalize(torch.randn(m, d), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(m, d), dim=1).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    loss = contrastive_loss(a, b, s, backend="cpu")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    print(status("VmHWM") - base)
    """
)


def _peak_rss_growth(m: int, d: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(m), str(d)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def _can_measure() -> bool:
    return os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")


needs_measure = pytest.mark.skipif(
    not _can_measure() or C.unavailable_reason("cpu", torch.device("cpu")) is not None,
    reason="needs the compiled extension and /proc/self/clear_refs",
)


@needs_measure
def test_cpu_loss_memory_is_linear_small():
    m, d = 8192, 32
    growth = _peak_rss_growth(m, d)
    logits_bytes = m * m * 4  # what the naive loss allocates for the float32 logits alone (256 MiB)
    assert growth < 48 * MiB, (
        f"extra peak {growth / MiB:.1f} MiB, logits would be {logits_bytes / MiB:.0f} MiB"
    )


@needs_measure
@pytest.mark.slow
def test_cpu_loss_memory_at_32k_rows():
    growth = _peak_rss_growth(32768, 256)
    assert growth < 256 * MiB, (
        f"extra peak {growth / MiB:.1f} MiB (limit 256 MiB; naive logits take 4096 MiB)"
    )
