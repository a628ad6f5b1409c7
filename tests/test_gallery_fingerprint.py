"""The model fingerprint that `famevil-fast embed` records in a gallery: the same weights give the same
fingerprint however they are loaded, stored or placed; a change to any tensor the task's image embedding
reads changes it, and a change elsewhere does not."""

import pytest
import torch
from helpers import save_micro_checkpoint

from famevil_fast.cli.gallery_file import model_fingerprint
from famevil_fast.model import FameViL, FameViLConfig, clip_preset

MICRO = FameViLConfig(clip=clip_preset("micro"), adapter_bottleneck=8, xaa_bottleneck=8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_micro_checkpoint(tmp_path_factory.mktemp("ckpt"), std=0.05)


def test_the_same_weights_give_the_same_fingerprint(checkpoint, tmp_path):
    first, second = FameViL.from_pretrained(checkpoint), FameViL.from_pretrained(checkpoint)
    assert model_fingerprint(first, "itc") == model_fingerprint(second, "itc")
    first.save_pretrained(tmp_path / "copy")
    copy = FameViL.from_pretrained(tmp_path / "copy")
    assert all(model_fingerprint(copy, t) == model_fingerprint(first, t) for t in ("itc", "tgir"))
    assert model_fingerprint(first, "itc") != model_fingerprint(first, "tgir")


def test_the_fingerprint_does_not_depend_on_dtype_or_device(checkpoint):
    model = FameViL.from_pretrained(checkpoint).to(torch.bfloat16)  # bf16 values are exact in float32
    expected = model_fingerprint(model, "itc")
    assert model_fingerprint(model.float(), "itc") == expected
    if torch.cuda.is_available():
        assert model_fingerprint(model.cuda(), "itc") == expected


def _changed(model, prefix):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefix):
                p.add_(0.01)
    return model


@pytest.mark.parametrize(
    ("prefix", "changes"),
    [
        ("vision.proj", True),
        ("vision.blocks.1.mlp.fc1", True),
        ("vision.blocks.0.tsa.adapters.itc", True),
        ("vision.blocks.0.tsa.adapters.tgir", False),
        ("vision.blocks.0.xaa", False),
        ("text.", False),
        ("heads.", False),
    ],
)
def test_only_what_the_image_embedding_reads_is_fingerprinted(checkpoint, prefix, changes):
    model = FameViL.from_pretrained(checkpoint)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.encode_image(pixels, "itc"), model_fingerprint(model, "itc")
        _changed(model, prefix)
        after = model.encode_image(pixels, "itc"), model_fingerprint(model, "itc")
    assert (not torch.equal(before[0], after[0])) == changes
    assert (before[1] != after[1]) == changes
