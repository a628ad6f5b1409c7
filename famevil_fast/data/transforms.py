"""The reference image transforms, expressed as crop boxes plus one resampling rule shared by every backend.

Train (FAME-ViL, all tasks): random resized crop to S x S (area 0.8-1.0 of the image, aspect 0.75-1.3),
horizontal flip with probability 1/2, CLIP normalisation. Eval, with R = round(S * 256 / 224), centre crop S
and CLIP normalisation after a resize chosen by ``eval_resize`` (the official code squashes):

- ``"keep_aspect"`` (default, fixed): the shorter side to R and the longer one to int(R * long / short),
  aspect kept, as torchvision's ``Resize(R)``;
- ``"squash"`` (faithful to the official code): exactly R x R, aspect not preserved.

Square images (FashionGen) give the same pixels either way.

Both are written as a box in source pixels (top, left, height, width; fractional) plus a flip flag, so each
decoding backend only has to "resample this box to S x S": PIL does it with ``Image.resize(box=...)`` on the
CPU and :func:`resample_batch` does it with two batched matrix products on any torch device. The resampling
rule is PIL's antialiased bilinear (triangle filter widened by the downscale factor, taps clipped to the
image).

Training randomness is counter based: the uniforms of a sample are a hash of (seed, epoch, position in the
epoch, image slot), so a resumed run redraws exactly the crops and flips it would have drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE: tuple[float, float] = (0.8, 1.0)
TRAIN_RATIO: tuple[float, float] = (0.75, 1.3)  # the official configs' ratio, not torchvision's 4/3
N_UNIFORMS = 6  # area, log-aspect, x, y, flip, view choice
EVAL_RESIZE_MODES: tuple[str, ...] = ("keep_aspect", "squash")  # fixed default first, then the faithful one


def check_eval_resize(mode: str) -> str:
    """``mode`` when it is one of :data:`EVAL_RESIZE_MODES`; ValueError naming the choices otherwise."""
    if mode not in EVAL_RESIZE_MODES:
        raise ValueError(f"eval_resize must be one of {EVAL_RESIZE_MODES}, got {mode!r}")
    return mode


# ------------------------------------------------------------------------------------------ randomness

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def counter_uniforms(
    seed: int, epoch: int, positions: np.ndarray, slot: int = 0, n: int = N_UNIFORMS
) -> np.ndarray:
    """Uniforms in [0, 1) of shape (len(positions), n), a pure function of (seed, epoch, position, slot)."""
    positions = np.asarray(positions, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(
            np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x100000001B3) + np.uint64(epoch & 0xFFFFFFFF)
        )
        key = _splitmix64(key ^ np.uint64(slot * 0x9E37 + 1))
        base = _splitmix64(positions * np.uint64(0xD6E8FEB86659FD93) ^ key)
        words = _splitmix64(
            base[:, None] + np.arange(1, n + 1, dtype=np.uint64)[None, :] * np.uint64(0x632BE59BD9B4E019)
        )
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ------------------------------------------------------------------------------------------ crop boxes


@dataclass(frozen=True)
class CropPlan:
    """How to crop a list of images: ``uniforms`` (n, 6) for random train crops, or None for the eval crop,
    whose resize ``eval_resize`` chooses ("keep_aspect" or "squash", see the module docstring)."""

    uniforms: np.ndarray | None = None
    scale: tuple[float, float] = TRAIN_SCALE
    ratio: tuple[float, float] = TRAIN_RATIO
    eval_resize: str = "keep_aspect"

    def __post_init__(self) -> None:
        check_eval_resize(self.eval_resize)

    def boxes(self, sizes: np.ndarray, image_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (n, 4) float64: top, left, height, width; flips (n,) bool) for ``sizes`` (n, 2)."""
        if self.uniforms is None:
            return eval_boxes(sizes, image_size, self.eval_resize), np.zeros(len(sizes), dtype=bool)
        return train_boxes(sizes, self.uniforms, self.scale, self.ratio)

    def subset(self, index: np.ndarray) -> CropPlan:
        if self.uniforms is None:
            return self
        return CropPlan(self.uniforms[index], self.scale, self.ratio, self.eval_resize)


def train_boxes(
    sizes: np.ndarray,
    uniforms: np.ndarray,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
) -> tuple[np.ndarray, np.ndarray]:
    """Random resized crop boxes, closed form: area fraction in ``scale``, aspect log-uniform in ``ratio``.

    A box that would leave the image is shrunk to fit along that side (torchvision instead retries, then
    falls back to a centre crop); the position is uniform over the remaining room.
    """
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    if len(sizes) == 0:  # every image of a batch missing: nothing to crop (reshape(0, -1) is ambiguous)
        return np.zeros((0, 4), dtype=np.float64), np.zeros(0, dtype=bool)
    u = np.asarray(uniforms, dtype=np.float64).reshape(len(sizes), -1)
    h, w = sizes[:, 0], sizes[:, 1]
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = np.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1])
    image_aspect = w / h
    fw = np.minimum(np.sqrt(area * aspect / image_aspect), 1.0)
    fh = np.minimum(np.sqrt(area * image_aspect / aspect), 1.0)
    top = u[:, 3] * (1.0 - fh) * h
    left = u[:, 2] * (1.0 - fw) * w
    boxes = np.stack([top, left, fh * h, fw * w], axis=1)
    return boxes, u[:, 4] < 0.5


def eval_resize(image_size: int) -> int:
    """R = round(S * 256 / 224): the side the eval transform resizes to before its centre crop of S."""
    return int(round(image_size * 256 / 224))


def eval_resized_sizes(sizes: np.ndarray, image_size: int, mode: str = "keep_aspect") -> np.ndarray:
    """(n, 2) integer (height, width) of each image after the eval resize: R x R for "squash"; for
    "keep_aspect" the shorter side R and the longer int(R * long / short), as torchvision's ``Resize(R)``
    (a square image is R x R either way)."""
    check_eval_resize(mode)
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    r = float(eval_resize(image_size))
    if mode == "squash":
        return np.full(sizes.shape, r)
    h, w = sizes[:, 0], sizes[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):  # empty or degenerate sizes: no division needed
        return np.stack(
            [np.where(h <= w, r, np.floor(r * h / w)), np.where(w <= h, r, np.floor(r * w / h))], axis=1
        )


def eval_boxes(sizes: np.ndarray, image_size: int, mode: str = "keep_aspect") -> np.ndarray:
    """Boxes equal to "resize (``mode``, see :func:`eval_resized_sizes`), centre crop S", the crop offset
    being round((resized - S) / 2) per axis as torchvision's ``CenterCrop``."""
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    resized = eval_resized_sizes(sizes, image_size, mode)
    offset = np.round((resized - image_size) / 2.0)  # half to even, as Python's round
    h, w = sizes[:, 0], sizes[:, 1]
    rh, rw = resized[:, 0], resized[:, 1]
    top, left = offset[:, 0] * h / rh, offset[:, 1] * w / rw
    return np.stack([top, left, image_size * h / rh, image_size * w / rw], axis=1)


# ------------------------------------------------------------------------------------------ decoding

# PIL modes holding more than 8 bits per sample (16-bit grayscale PNG and TIFF open as "I;16" or "I")
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB, the way every backend reads it.

    16-bit samples (modes "I;16*" and "I") are scaled to 8 bits as round(v / 257), which is what DALI's
    decoder does; PIL's own ``convert("RGB")`` would clip them at 255 instead (a saturated white image).
    """
    if image.mode in _WIDE_MODES:
        wide = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    return image.convert("RGB")  # also loads the pixels (a copy when already RGB)


# ------------------------------------------------------------------------------------------ resampling


def pil_resample(image: Image.Image, box: np.ndarray, flip: bool, image_size: int) -> Image.Image:
    """The reference: PIL antialiased bilinear resampling of ``box`` (top, left, height, width) to S x S."""
    top, left, height, width = (float(v) for v in box)
    out = image.resize(
        (image_size, image_size), Image.Resampling.BILINEAR, box=(left, top, left + width, top + height)
    )
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def _axis_weights(
    start: torch.Tensor, length: torch.Tensor, extent: torch.Tensor, n_in: int, n_out: int
) -> torch.Tensor:
    """(B, n_out, n_in) resampling matrices of PIL's antialiased bilinear filter for one axis."""
    scale = length / n_out  # (B,)
    support = torch.clamp(scale, min=1.0)  # filter widened when downscaling
    centre = (
        start[:, None] + (torch.arange(n_out, device=start.device, dtype=start.dtype) + 0.5) * scale[:, None]
    )
    src = torch.arange(n_in, device=start.device, dtype=start.dtype) + 0.5
    w = torch.clamp(1.0 - (src[None, None, :] - centre[:, :, None]).abs() / support[:, None, None], min=0.0)
    w = w * (src[None, None, :] < extent[:, None, None])  # taps beyond this image's own size
    return w / w.sum(dim=2, keepdim=True).clamp(min=1e-12)


def resample_batch(
    images: torch.Tensor, sizes: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, image_size: int
) -> torch.Tensor:
    """Crop-resize-flip a padded batch on its device: (B, 3, H, W) -> (B, 3, S, S) float32 in [0, 255].

    ``sizes`` (B, 2) are the true (height, width) of each image inside the padding, ``boxes`` (B, 4) the
    source boxes (top, left, height, width), ``flips`` (B,) bool. Same filter as :func:`pil_resample`.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"resample_batch: images must be (B, 3, H, W), got {tuple(images.shape)}")
    b = images.shape[0]
    if sizes.shape != (b, 2) or boxes.shape != (b, 4) or flips.shape != (b,):
        raise ValueError(
            f"resample_batch: sizes {tuple(sizes.shape)}, boxes {tuple(boxes.shape)}, "
            f"flips {tuple(flips.shape)}"
            f" do not match a batch of {b}"
        )
    dev = images.device
    sizes = to_device(sizes.to(torch.float32), dev)
    boxes = to_device(boxes.to(torch.float32), dev)
    wy = _axis_weights(boxes[:, 0], boxes[:, 2], sizes[:, 0], images.shape[2], image_size)
    wx = _axis_weights(boxes[:, 1], boxes[:, 3], sizes[:, 1], images.shape[3], image_size)
    wx = torch.where(to_device(flips, dev).view(b, 1, 1), wx.flip(1), wx)
    x = images.to(torch.float32)
    x = torch.matmul(x, wx.transpose(1, 2).unsqueeze(1))  # (B, 3, H, S)
    return torch.matmul(wy.unsqueeze(1), x)  # (B, 3, S, S)


def normalize(
    pixels: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD
) -> torch.Tensor:
    """(B, 3, S, S) values in [0, 255] -> CLIP-normalised float32 (in place when already float32)."""
    x = pixels if pixels.dtype == torch.float32 else pixels.to(torch.float32)
    factor, shift = _normalize_constants(x.device, tuple(mean), tuple(std))
    return x.mul_(factor).sub_(shift)


_NORMALIZE_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalize_constants(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(1 / (255 std), mean / std) as (1, 3, 1, 1) float32 tensors on ``device``, made once per device."""
    key = (device, mean, std)
    constants = _NORMALIZE_CONSTANTS.get(key)
    if constants is None:
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        constants = (1.0 / (255.0 * s)).to(device), (m / s).to(device)
        _NORMALIZE_CONSTANTS[key] = constants
    return constants


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device`` without holding up the host. A copy to a GPU from pageable memory first waits for
    all earlier work on the current stream, which would serialise a data thread's next batch behind this
    batch's kernels; staging through pinned memory makes it an ordinary asynchronous copy."""
    device = torch.device(device)
    if t.device.type == device.type and device.index in (None, t.device.index):
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def reference_transform(
    image: Image.Image,
    image_size: int,
    uniforms: np.ndarray | None = None,
    eval_resize: str = "keep_aspect",
) -> torch.Tensor:
    """The reference pipeline for one PIL image: (3, S, S) normalised float32 (eval crop without uniforms,
    with the resize ``eval_resize`` chooses)."""
    u = None if uniforms is None else np.asarray(uniforms).reshape(1, -1)
    plan = CropPlan(u, eval_resize=eval_resize)
    boxes, flips = plan.boxes(np.asarray([[image.height, image.width]]), image_size)
    out = pil_resample(to_rgb(image), boxes[0], bool(flips[0]), image_size)
    pixels = torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).unsqueeze(0)
    return normalize(pixels)[0]
