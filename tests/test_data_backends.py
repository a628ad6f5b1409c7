"""Every decoding backend gives the reference tensors (within interpolation tolerance) and skips bad files."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_fixtures import noise_image, synthetic

from famevil_fast.data.backends import available_backends, choose_backend, make_backend
from famevil_fast.data.fashiongen import read_fashiongen
from famevil_fast.data.fashioniq import read_fashioniq
from famevil_fast.data.transforms import CLIP_STD, CropPlan, counter_uniforms, reference_transform

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
)

CPU_BACKENDS = ["pil", "torchvision", "dali"]
# mean / max absolute difference allowed, in 8-bit levels: PIL and torchvision share the decoder and the
# resampler; DALI has its own resize kernel
TOLERANCE = {
    "pil": (0.0, 0.0),
    "torchvision": (0.05, 2.0),
    "torchvision-batched": (0.5, 1.01),
    "dali": (0.5, 8.0),
    # on a GPU, JPEG goes through nvJPEG (its own IDCT and chroma upsampling) before the resize: on an H200,
    # 1.02 (DALI) and 1.05 (torchvision) levels on average, 7 at most, for a 50 x 70 image; PNG is decoded
    # on the CPU and only resized on the GPU, so the CPU tolerances hold
    "dali-jpeg-gpu": (2.0, 16.0),
    "torchvision-jpeg-gpu": (2.0, 16.0),
    "dali-png-gpu": (0.5, 8.0),
    "torchvision-png-gpu": (0.5, 1.01),
}
GPU_BACKENDS = ["dali", "torchvision"]


def _backend(name, root, size):
    if name not in available_backends():
        pytest.skip(f"backend {name} is not installed")
    return make_backend(name, root, size, "cpu", num_threads=2)


def _levels(x: torch.Tensor) -> torch.Tensor:
    return x * 255.0 * torch.tensor(CLIP_STD).view(-1, 1, 1)


def _check_against_reference(root, paths, plan, pixels, size, name):
    for k, rel in enumerate(paths):
        if name.endswith("-gpu"):
            image_format = "jpeg" if rel.endswith(".jpg") else "png"
            mean_tol, max_tol = TOLERANCE[name.replace("-gpu", f"-{image_format}-gpu")]
        else:
            mean_tol, max_tol = TOLERANCE[name]
        u = None if plan.uniforms is None else plan.uniforms[k]
        ref = reference_transform(Image.open(os.path.join(root, rel)), size, u)
        diff = _levels((pixels[k].cpu() - ref).abs())
        assert diff.mean() <= mean_tol + 1e-3 and diff.max() <= max_tol + 1e-3, (
            name,
            rel,
            diff.mean(),
            diff.max(),
        )


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd_images")
    shapes = [(50, 70), (61, 43), (23, 97), (128, 128)]
    paths = []
    for i, (h, w) in enumerate(shapes):
        for ext, kw in ((".jpg", {"quality": 92}), (".png", {})):
            rel = f"img{i}{ext}"
            noise_image(root / rel, h, w, seed=i, smooth=True, **kw)
            paths.append(rel)
    return root, paths


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("train", [False, True])
def test_backend_matches_reference_on_odd_sizes(odd_images, name, train):
    root, paths = odd_images
    backend = _backend(name, root, 32)
    plan = CropPlan(counter_uniforms(7, 3, np.arange(len(paths))) if train else None)
    out = backend.load(paths, plan)
    assert out.ok.all() and not out.failures
    assert out.pixels.shape == (len(paths), 3, 32, 32) and out.pixels.dtype == torch.float32
    _check_against_reference(root, paths, plan, out.pixels, 32, name)
    backend.close()


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backend_matches_reference_on_the_synthetic_dataset(tmp_path_factory, name):
    root = synthetic(tmp_path_factory)
    paths = [p.images[0] for p in read_fashiongen(root, "val")][:6] + [
        t.target for t in read_fashioniq(root, "val")
    ][:6]
    backend = _backend(name, root, 40)
    plan = CropPlan(counter_uniforms(0, 0, np.arange(len(paths))))
    out = backend.load(paths, plan)
    assert out.ok.all()
    _check_against_reference(root, paths, plan, out.pixels, 40, name)


@pytest.fixture(scope="module")
def broken_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    good = noise_image(root / "good.jpg", 40, 30, smooth=True)
    noise_image(root / "good.png", 20, 50, seed=1, smooth=True)
    data = (root / "good.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "garbage.jpg").write_bytes(b"\xff\xd8" + os.urandom(200))
    (root / "text.png").write_bytes(b"not an image")
    assert good.shape == (40, 30, 3)
    return root


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_backend_reports_bad_files_and_keeps_the_rest(broken_images, name):
    paths = ["good.jpg", "truncated.jpg", "missing.jpg", "good.png", "garbage.jpg", "text.png"]
    backend = _backend(name, broken_images, 24)
    plan = CropPlan(counter_uniforms(1, 0, np.arange(len(paths))))
    out = backend.load(paths, plan)
    assert out.ok.tolist() == [True, False, False, True, False, False]
    assert sorted(p for p, _ in out.failures) == ["garbage.jpg", "missing.jpg", "text.png", "truncated.jpg"]
    assert all(reason for _, reason in out.failures)
    _check_against_reference(
        broken_images, ["good.jpg", "good.png"], plan.subset(np.array([0, 3])), out.pixels, 24, name
    )
    again = backend.load(["good.jpg"], CropPlan())  # still usable after a failing batch
    assert again.ok.all() and again.pixels.shape == (1, 3, 24, 24)


def test_backend_selection_and_errors(monkeypatch, tmp_path):
    monkeypatch.delenv("FAMEVIL_FAST_DATA_BACKEND", raising=False)
    assert choose_backend("cpu") == "pil"
    monkeypatch.setenv("FAMEVIL_FAST_DATA_BACKEND", "torchvision")
    assert choose_backend("cpu") == "torchvision"
    with pytest.raises(ValueError, match="unknown data backend"):
        make_backend("opencv", tmp_path, 32)
    with pytest.raises(ValueError, match="image_size"):
        make_backend("pil", tmp_path, 0)
    assert "pil" in available_backends()


def test_empty_and_all_failed_batches(tmp_path):
    for name in available_backends():
        backend = make_backend(name, tmp_path, 16)
        out = backend.load(["nope.jpg"], CropPlan())
        assert out.pixels.shape == (0, 3, 16, 16) and out.ok.tolist() == [False]


def test_torchvision_batched_path_matches_reference(odd_images, broken_images):
    if "torchvision" not in available_backends():
        pytest.skip("torchvision is not installed")
    from famevil_fast.data.backends.torchvision_backend import TorchvisionBackend

    root, paths = odd_images
    backend = TorchvisionBackend(root, 32, "cpu", resampler="torch")  # the code path CUDA runs, on the CPU
    plan = CropPlan(counter_uniforms(4, 0, np.arange(len(paths))))
    out = backend.load(paths, plan)
    assert out.ok.all()
    _check_against_reference(root, paths, plan, out.pixels, 32, "torchvision-batched")
    bad = TorchvisionBackend(broken_images, 24, "cpu", resampler="torch")
    out = bad.load(["good.jpg", "garbage.jpg", "truncated.jpg", "good.png", "missing.jpg"], CropPlan())
    assert out.ok.tolist() == [True, False, False, True, False] and out.pixels.shape == (2, 3, 24, 24)
    with pytest.raises(ValueError, match="resampler"):
        TorchvisionBackend(root, 32, "cpu", resampler="cv2")


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_exif_orientation_is_ignored_like_the_pil_reference(tmp_path, name):
    pixels = np.random.default_rng(3).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).resize((45, 30), Image.Resampling.NEAREST)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    backend = _backend(name, tmp_path, 20)
    plan = CropPlan(counter_uniforms(0, 0, np.arange(1)))
    out = backend.load(["rotated.jpg"], plan)
    assert out.ok.all()
    _check_against_reference(tmp_path, ["rotated.jpg"], plan, out.pixels, 20, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_gpu_backend_matches_reference_and_skips_bad_files(odd_images, broken_images, name):
    if name not in available_backends():
        pytest.skip(f"backend {name} is not installed")
    root, paths = odd_images
    backend = make_backend(name, root, 32, "cuda")
    plan = CropPlan(counter_uniforms(5, 0, np.arange(len(paths))))
    out = backend.load(paths, plan)
    assert out.ok.all() and out.pixels.device.type == "cuda" and out.pixels.shape == (len(paths), 3, 32, 32)
    _check_against_reference(root, paths, plan, out.pixels, 32, f"{name}-gpu")
    backend.close()
    bad = make_backend(name, broken_images, 24, "cuda")
    names = ["good.jpg", "truncated.jpg", "missing.jpg", "good.png", "garbage.jpg", "text.png"]
    plan = CropPlan(counter_uniforms(1, 0, np.arange(len(names))))
    out = bad.load(names, plan)
    assert out.ok.tolist() == [True, False, False, True, False, False]
    _check_against_reference(
        broken_images, ["good.jpg", "good.png"], plan.subset(np.array([0, 3])), out.pixels, 24, f"{name}-gpu"
    )
    bad.close()
