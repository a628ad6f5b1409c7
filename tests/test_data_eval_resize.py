"""The eval resize, faithful (squash) or fixed (keep_aspect, the default), reaches every decoding backend and
every evaluation set, and every backend gives the reference pixels in both (the official code's quirk)."""

import os

import pytest
import torch
from PIL import Image
from test_data_backends import TOLERANCE
from test_data_fixtures import noise_image, synthetic

from famevil_fast.data import build_eval_sets
from famevil_fast.data.backends import available_backends, make_backend
from famevil_fast.data.backends.cache_backend import CacheBackend
from famevil_fast.data.backends.torchvision_backend import TorchvisionBackend
from famevil_fast.data.cache import build_cache
from famevil_fast.data.transforms import CLIP_STD, EVAL_RESIZE_MODES, CropPlan, reference_transform

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

S = 32


def _levels(x: torch.Tensor) -> torch.Tensor:
    return x * 255.0 * torch.tensor(CLIP_STD).view(-1, 1, 1)


def _reference(root, rel, mode, size=S):
    with Image.open(os.path.join(root, rel)) as im:
        return reference_transform(im, size, eval_resize=mode)


def _check(root, paths, pixels, mode, tolerance, size=S):
    """Within ``tolerance`` of the reference of ``mode``; and, for a non-square image (sides 10% apart or
    more), far from the reference of the other mode (so a backend ignoring the mode cannot pass)."""
    mean_tol, max_tol = tolerance
    other = {"keep_aspect": "squash", "squash": "keep_aspect"}[mode]
    checked = []
    for k, rel in enumerate(paths):
        diff = _levels((pixels[k].cpu() - _reference(root, rel, mode, size)).abs())
        assert diff.mean() <= mean_tol + 1e-3 and diff.max() <= max_tol + 1e-3, (rel, mode, diff.mean())
        with Image.open(os.path.join(root, rel)) as im:
            h, w = im.height, im.width
        if abs(h - w) >= 0.1 * max(h, w):
            far = _levels((pixels[k].cpu() - _reference(root, rel, other, size)).abs())
            assert far.mean() > max(2 * mean_tol, 1.0), (rel, mode, far.mean())
            checked.append(rel)
    return checked


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_resize_images")
    paths = []
    for i, (h, w) in enumerate([(50, 70), (61, 43), (23, 97), (40, 40)]):
        for ext, kw in ((".jpg", {"quality": 92}), (".png", {})):
            noise_image(root / f"img{i}{ext}", h, w, seed=i, smooth=True, **kw)
            paths.append(f"img{i}{ext}")
    return root, paths


def _file_backend(name, root):
    if name == "torchvision-batched":  # the batched on-device resampler (what CUDA runs), here on the CPU
        if "torchvision" not in available_backends():
            pytest.skip("torchvision is not installed")
        return TorchvisionBackend(root, S, "cpu", 2, resampler="torch")
    if name not in available_backends():
        pytest.skip(f"backend {name} is not installed")
    return make_backend(name, root, S, "cpu", num_threads=2)


@pytest.mark.parametrize("mode", EVAL_RESIZE_MODES)
@pytest.mark.parametrize("name", ["pil", "torchvision", "torchvision-batched", "dali"])
def test_every_file_backend_gives_the_reference_eval_crop_in_both_modes(odd_images, name, mode):
    root, paths = odd_images
    backend = _file_backend(name, root)
    out = backend.load(paths, CropPlan(eval_resize=mode))
    assert out.ok.all() and out.pixels.shape == (len(paths), 3, S, S)
    assert len(_check(root, paths, out.pixels, mode, TOLERANCE[name])) == 6  # all but the square image
    backend.close()


def test_default_eval_crop_keeps_the_aspect(odd_images):
    root, paths = odd_images
    backend = make_backend("pil", root, S, "cpu", num_threads=1)
    default = backend.load(paths, CropPlan()).pixels
    assert torch.equal(default, backend.load(paths, CropPlan(eval_resize="keep_aspect")).pixels)
    _check(root, paths, default, "keep_aspect", TOLERANCE["pil"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return synthetic(tmp_path_factory)


@pytest.fixture(scope="module")
def cache_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_resize_cache")
    build_cache(data, out, tokenize=False)
    return out


def _fiq_gallery_paths(data, n=6):
    tgir = build_eval_sets("tgir", data, image_size=S, backend="pil", device="cpu")
    return [p for (p,) in tgir.categories["dress"].gallery.table.images["pixels"]][:n]


@pytest.mark.parametrize("mode", EVAL_RESIZE_MODES)
@pytest.mark.parametrize("resampler", ["pil", "torch"])
def test_cache_backend_gives_the_reference_eval_crop_in_both_modes(data, cache_dir, resampler, mode):
    paths = _fiq_gallery_paths(data)  # FashionIQ images: narrower than high
    backend = CacheBackend(cache_dir, S, "cpu", 2, resampler=resampler, root=data)
    out = backend.load(paths, CropPlan(eval_resize=mode))
    assert out.ok.all()
    tolerance = TOLERANCE["pil"] if resampler == "pil" else TOLERANCE["torchvision-batched"]
    assert _check(data, paths, out.pixels, mode, tolerance)  # non-square images among them


@pytest.mark.parametrize("mode", EVAL_RESIZE_MODES)
def test_evaluation_sets_pass_the_mode_to_their_batches(data, cache_dir, mode):
    """build_eval_sets(eval_resize=...) reaches the pixels of every set, from files and from the cache;
    the FashionGen views (square) are the same in both modes, the FashionIQ images (not square) are not."""
    kwargs = {"image_size": S, "device": "cpu", "batch_size": 64, "eval_resize": mode}
    tgir = build_eval_sets("tgir", data, backend="pil", **kwargs)
    assert tgir.eval_resize == mode
    gallery = tgir.categories["dress"].gallery
    assert gallery.eval_resize == mode and tgir.categories["dress"].queries.eval_resize == mode
    paths = [p for (p,) in gallery.table.images["pixels"]]
    pixels = next(iter(gallery))["pixels"]
    assert _check(data, paths[: len(pixels)], pixels, mode, TOLERANCE["pil"])
    cached = build_eval_sets("tgir", data, cache_dir=cache_dir, **kwargs)
    torch.testing.assert_close(
        next(iter(cached.categories["dress"].gallery))["pixels"], pixels, atol=0, rtol=0
    )
    for task in ("itc", "scr", "cap"):
        built = build_eval_sets(task, data, backend="pil", **kwargs)
        batches = built.images if task == "itc" else built.samples
        assert built.eval_resize == batches.eval_resize == mode
        views = [p for (p,) in batches.table.images["pixels"]][:3]
        got = next(iter(batches))["pixels"][:3]
        for k, rel in enumerate(views):  # square views: both modes give the reference of either
            for either in EVAL_RESIZE_MODES:
                assert torch.equal(got[k], _reference(data, rel, either))


def test_evaluator_and_options_carry_the_mode(data):
    from famevil_fast.eval.runner import EvalOptions, Evaluator

    evaluator = Evaluator.build(
        data, ["tgir", "itc"], S, 16, device="cpu", backend="pil", options=EvalOptions(eval_resize="squash")
    )
    assert evaluator.sets["tgir"].eval_resize == evaluator.sets["itc"].eval_resize == "squash"
    assert evaluator.sets["tgir"].categories["shirt"].gallery.eval_resize == "squash"
    assert Evaluator.build(data, ["tgir"], S, 16, device="cpu", backend="pil").sets["tgir"].eval_resize == (
        "keep_aspect"
    )
    with pytest.raises(ValueError, match="eval_resize must be one of"):
        build_eval_sets("tgir", data, image_size=S, backend="pil", device="cpu", eval_resize="stretch")
