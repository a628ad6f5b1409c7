"""Reference crops, counter-based randomness and the batched resampler against PIL."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from famevil_fast.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    EVAL_RESIZE_MODES,
    CropPlan,
    counter_uniforms,
    eval_boxes,
    eval_resize,
    eval_resized_sizes,
    normalize,
    pil_resample,
    reference_transform,
    resample_batch,
    to_device,
    train_boxes,
)


def test_counter_uniforms_are_pure_uniform_and_distinct():
    a = counter_uniforms(3, 1, np.arange(5000))
    assert a.shape == (5000, 6) and a.min() >= 0.0 and a.max() < 1.0
    assert np.array_equal(a[100:200], counter_uniforms(3, 1, np.arange(100, 200)))
    assert abs(a.mean() - 0.5) < 0.01 and abs(a.var() - 1 / 12) < 0.005
    assert abs(np.corrcoef(a[:, 0], a[:, 1])[0, 1]) < 0.05
    for other in (
        counter_uniforms(4, 1, np.arange(5000)),
        counter_uniforms(3, 2, np.arange(5000)),
        counter_uniforms(3, 1, np.arange(5000), slot=1),
    ):
        assert np.abs(other - a).mean() > 0.2


@pytest.mark.parametrize("size", [(256, 256), (300, 200), (97, 151), (1, 5)])
def test_train_boxes_inside_image_with_area_and_aspect(size):
    h, w = size
    u = counter_uniforms(0, 0, np.arange(2000))
    boxes, flips = train_boxes(np.tile([[h, w]], (2000, 1)), u)
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + bh <= h + 1e-9).all() and (left + bw <= w + 1e-9).all()
    area = bh * bw / (h * w)
    assert area.max() <= 1.0 + 1e-9
    fits = (bh < h - 1e-9) & (bw < w - 1e-9)  # boxes that were not shrunk to fit
    assert ((area[fits] >= 0.8 - 1e-9) & (area[fits] <= 1.0 + 1e-9)).all()
    aspect = bw[fits] / bh[fits]
    assert ((aspect >= 0.75 - 1e-9) & (aspect <= 1.3 + 1e-9)).all()  # the official configs' range
    assert 0.45 < flips.mean() < 0.55


def test_train_aspect_range_ends_at_the_official_configs_ratio():
    """Aspect uniforms 0 and 1 give 0.75 and 1.3 (torchvision's default would end at 4/3); a smaller area
    leaves room for both in a square image."""
    u = np.array([[0.0, 0.0, 0.5, 0.5, 0.9, 0.0], [0.0, 1.0, 0.5, 0.5, 0.9, 0.0]])
    boxes, _ = train_boxes(np.array([[1000, 1000], [1000, 1000]]), u, scale=(0.5, 0.5))
    np.testing.assert_allclose(boxes[:, 3] / boxes[:, 2], [0.75, 1.3])
    np.testing.assert_allclose(boxes[:, 2] * boxes[:, 3], 0.5e6)


def _resize_then_centre_crop(img: Image.Image, s: int, mode: str) -> np.ndarray:
    """The eval transform written the plain way: PIL resize of the whole image, then the centre crop
    (torchvision's Resize(R) / Resize((R, R)) and CenterCrop(S) rules, restated here independently)."""
    r = eval_resize(s)
    h, w = img.height, img.width
    if mode == "squash":
        rh, rw = r, r
    elif w <= h:
        rh, rw = int(r * h / w), r
    else:
        rh, rw = r, int(r * w / h)
    top, left = int(round((rh - s) / 2)), int(round((rw - s) / 2))
    return np.asarray(img.resize((rw, rh), Image.Resampling.BILINEAR))[top : top + s, left : left + s]


@pytest.mark.parametrize("mode", EVAL_RESIZE_MODES)
@pytest.mark.parametrize("shape", [(123, 87), (87, 123), (50, 50), (40, 97)])
def test_eval_box_equals_resize_then_centre_crop(mode, shape):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    for s in (224, 64, 33):
        ref = _resize_then_centre_crop(img, s, mode)
        box = eval_boxes([shape], s, mode)[0]
        out = np.asarray(pil_resample(img, box, False, s))
        assert out.shape == ref.shape == (s, s, 3)
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
        plan_box = CropPlan(eval_resize=mode).boxes(np.asarray([shape]), s)[0][0]
        assert np.array_equal(plan_box, box)


def test_eval_resize_keeps_the_aspect_by_default_and_squashes_when_asked():
    """the official code's quirk the official eval resize squashes to R x R; the default keeps the aspect
    (shorter side R, as torchvision's Resize(R)); square images are the same either way."""
    sizes = np.array([[300, 200], [200, 300], [256, 256], [97, 61], [61, 97], [5, 1]])
    r = eval_resize(224)
    assert r == 256
    assert eval_resized_sizes(sizes, 224, "squash").tolist() == [[r, r]] * len(sizes)
    assert eval_resized_sizes(sizes, 224).tolist() == [
        [384, 256],
        [256, 384],
        [256, 256],
        [407, 256],
        [256, 407],
        [1280, 256],
    ]
    keep, squash = eval_boxes(sizes, 224), eval_boxes(sizes, 224, "squash")
    assert np.array_equal(keep, CropPlan().boxes(sizes, 224)[0])  # the default plan keeps the aspect
    assert np.array_equal(keep[2], squash[2])  # square: the same box
    assert not np.allclose(keep[[0, 1, 3, 4, 5]], squash[[0, 1, 3, 4, 5]])
    # keep_aspect: a square box (no distortion beyond the long side's rounding down to whole pixels),
    # centred; squash: the image's own aspect (distorted)
    top, left, bh, bw = keep.T
    assert np.allclose(bh, bw, rtol=1 / 256)
    assert np.allclose(top + bh / 2, sizes[:, 0] / 2, atol=0.5 * sizes[:, 0] / 256)
    assert np.allclose(left + bw / 2, sizes[:, 1] / 2, atol=0.5 * sizes[:, 1] / 256)
    assert np.allclose(squash[:, 2] / squash[:, 3], sizes[:, 0] / sizes[:, 1])


def test_eval_resize_matches_torchvision_resize_sizes():
    T = pytest.importorskip("torchvision.transforms")
    rng = np.random.default_rng(3)
    for h, w in rng.integers(1, 400, (40, 2)):
        img = Image.new("RGB", (int(w), int(h)))
        for s in (224, 64):
            r = eval_resize(s)
            out = T.Resize(r)(img)
            assert eval_resized_sizes([[h, w]], s)[0].tolist() == [out.height, out.width]
            assert eval_resized_sizes([[h, w]], s, "squash")[0].tolist() == [r, r]


def test_eval_resize_is_checked_and_kept_by_subsets_and_training_ignores_it():
    with pytest.raises(ValueError, match=r"eval_resize must be one of \('keep_aspect', 'squash'\)"):
        CropPlan(eval_resize="stretch")
    with pytest.raises(ValueError, match="eval_resize must be one of"):
        eval_boxes([[10, 20]], 8, "crop")
    squash = CropPlan(eval_resize="squash")
    assert squash.subset(np.array([0])).eval_resize == "squash"
    u = counter_uniforms(0, 0, np.arange(4))
    train = CropPlan(u, eval_resize="squash")
    assert train.subset(np.array([1, 2])).eval_resize == "squash"
    sizes = np.array([[300, 200], [61, 97], [64, 64], [10, 80]])
    # the training transform (random resized crop) is the same whatever the eval resize
    for a, b in zip(CropPlan(u).boxes(sizes, 32), train.boxes(sizes, 32)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("h,w,s", [(64, 64, 48), (50, 37, 64), (37, 80, 17), (256, 200, 32), (9, 9, 1)])
def test_resample_batch_matches_pil(h, w, s):
    rng = np.random.default_rng(h * w + s)
    n = 6
    imgs = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    u = counter_uniforms(1, 0, np.arange(n))
    boxes, flips = CropPlan(u).boxes(np.tile([[h, w]], (n, 1)), s)
    boxes = np.concatenate([boxes, eval_boxes([[h, w]], s)])
    flips = np.concatenate([flips, [True]])
    imgs = np.concatenate([imgs, imgs[:1]])
    ref = np.stack(
        [np.asarray(pil_resample(Image.fromarray(im), b, f, s)) for im, b, f in zip(imgs, boxes, flips)]
    )
    padded = torch.zeros((n + 1, 3, h + 3, w + 5), dtype=torch.uint8)  # padding must not leak in
    padded[:, :, :h, :w] = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    padded[:, :, h:, :] = 255
    padded[:, :, :, w:] = 255
    sizes = torch.tensor([[h, w]] * (n + 1))
    out = resample_batch(padded, sizes, torch.from_numpy(boxes), torch.from_numpy(flips), s)
    diff = (out.permute(0, 2, 3, 1).double() - torch.from_numpy(ref).double()).abs()
    assert diff.max() <= 1.0 + 1e-4  # PIL rounds its intermediate pass to 8 bits
    assert diff.mean() < 0.5


def test_resample_batch_mixed_sizes_in_one_padded_batch():
    rng = np.random.default_rng(1)
    shapes = [(40, 30), (25, 60), (60, 60)]
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    sizes = np.asarray(shapes)
    boxes, flips = CropPlan(counter_uniforms(0, 0, np.arange(3))).boxes(sizes, 20)
    padded = torch.zeros((3, 3, 60, 60), dtype=torch.uint8)
    for k, im in enumerate(imgs):
        padded[k, :, : im.shape[0], : im.shape[1]] = torch.from_numpy(im).permute(2, 0, 1)
    out = resample_batch(
        padded, torch.from_numpy(sizes), torch.from_numpy(boxes), torch.from_numpy(flips), 20
    )
    for k, im in enumerate(imgs):
        ref = np.asarray(pil_resample(Image.fromarray(im), boxes[k], bool(flips[k]), 20)).astype(np.float64)
        assert np.abs(out[k].permute(1, 2, 0).numpy() - ref).max() <= 1.0 + 1e-4


def test_resample_batch_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        resample_batch(
            torch.zeros(2, 4, 8, 8), torch.zeros(2, 2), torch.zeros(2, 4), torch.zeros(2, dtype=bool), 4
        )
    with pytest.raises(ValueError, match="do not match a batch of 2"):
        resample_batch(
            torch.zeros(2, 3, 8, 8), torch.zeros(3, 2), torch.zeros(2, 4), torch.zeros(2, dtype=bool), 4
        )


def test_normalize_and_reference_transform_match_torchvision_style_pipeline():
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert (normalize(x.clone()) - (x.float() / 255 - mean) / std).abs().max() < 1e-5
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    outs = {}
    for mode in EVAL_RESIZE_MODES:
        outs[mode] = out = reference_transform(img, 32, eval_resize=mode)
        crop = _resize_then_centre_crop(img, 32, mode)
        expected = (torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255 - mean[0]) / std[0]
        assert out.shape == (3, 32, 32) and (out - expected).abs().max() < 1.5 / 255 / 0.26
    assert torch.equal(reference_transform(img, 32), outs["keep_aspect"])  # the default
    assert (outs["keep_aspect"] - outs["squash"]).abs().mean() > 0.1  # a non-square image: not the same
    flipped = reference_transform(img, 32, uniforms=np.array([0.5, 0.5, 0.5, 0.5, 0.1, 0.0]))
    same = reference_transform(img, 32, uniforms=np.array([0.5, 0.5, 0.5, 0.5, 0.9, 0.0]))
    assert torch.equal(flipped, same.flip(-1))


def test_normalize_takes_other_statistics_per_call():
    x = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    plain = normalize(x.clone())
    custom = normalize(x.clone(), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert (custom - (x.float() / 255 - 0.5) / 0.5).abs().max() < 1e-5
    assert torch.equal(normalize(x.clone()), plain)  # the default statistics again, not the last ones


def test_to_device_keeps_a_tensor_already_there():
    t = torch.arange(5)
    assert to_device(t, "cpu") is t and to_device(t, torch.device("cpu")) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_to_device_does_not_wait_for_the_stream():
    """A host tensor reaches the GPU without the host waiting for kernels queued before it (a plain copy
    from pageable memory would wait for them: it is what serialised the data thread behind the kernels)."""
    cpu = torch.arange(1000, dtype=torch.float32)
    assert torch.equal(to_device(cpu, "cuda").cpu(), cpu)
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of device time at H100/H200 clocks
    start = time.perf_counter()
    moved = to_device(cpu, "cuda")
    host_seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    waited = time.perf_counter() - start
    assert host_seconds < 0.25 * waited, (host_seconds, waited)
    assert moved.is_cuda and torch.equal(moved.cpu(), cpu)


def test_crop_boxes_of_an_empty_batch():
    """A batch whose images are all missing has nothing to crop (reshape(0, -1) used to raise)."""
    for plan in (CropPlan(counter_uniforms(0, 0, np.arange(0))), CropPlan(np.zeros((0, 6)))):
        boxes, flips = plan.boxes(np.zeros((0, 2), dtype=np.int64), 32)
        assert boxes.shape == (0, 4) and flips.shape == (0,)
    boxes, flips = train_boxes(np.zeros((0, 2)), np.zeros((0, 6)))
    assert boxes.shape == (0, 4) and flips.shape == (0,)


def test_to_rgb_scales_16_bit_images():
    from famevil_fast.data.transforms import to_rgb

    values = np.array([[0, 257, 32896], [65535, 1000, 128]], dtype=np.uint16)
    for image in (Image.fromarray(values), Image.fromarray(values.astype(np.int32))):
        assert image.mode in ("I;16", "I")
        out = np.asarray(to_rgb(image))
        assert out.shape == (2, 3, 3) and out.dtype == np.uint8
        assert out[..., 0].tolist() == [[0, 1, 128], [255, 4, 0]] and (out[..., 1] == out[..., 0]).all()
    gray = Image.fromarray(np.array([[0, 200]], dtype=np.uint8))
    assert np.asarray(to_rgb(gray))[0, :, 0].tolist() == [0, 200]  # 8-bit images unchanged
