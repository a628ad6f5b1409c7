"""The README's five-line example runs (on a micro CLIP checkpoint saved under the file name it uses)."""

import re
from pathlib import Path

import torch
from helpers import perturb_
from PIL import Image

from famevil_fast.model import CLIP, clip_preset

README = Path(__file__).resolve().parents[1] / "README.md"


def test_five_line_example_runs(tmp_path, monkeypatch):
    block = re.search(r"## Five lines\s+```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len([line for line in block.splitlines() if line.strip()]) == 5
    torch.save(perturb_(CLIP(clip_preset("micro"))).state_dict(), tmp_path / "ViT-B-16.pt")
    for name, colour in (("dress.jpg", "red"), ("coat.jpg", "navy")):
        Image.new("RGB", (48, 40), colour).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(block.replace("size=224", "size=32"), scope)  # the micro model takes 32 px images
    assert scope["pixels"].shape == (2, 3, 32, 32) and not scope["scores"].requires_grad
    assert scope["scores"].shape == (2, 2)
    assert torch.all(scope["scores"].abs() <= 1.0 + 1e-5)


def test_every_command_is_in_the_readme_table():
    from famevil_fast.cli.main import _command_modules

    table = README.read_text()
    missing = [m.NAME for m in _command_modules() if f"famevil-fast {m.NAME}" not in table]
    assert not missing, f"commands missing from the README's table: {missing}"
