"""Input pipeline speed (target 6 of bench/RESULTS.md): decoded, cropped, flipped and normalised images per
second.

Every file backend (PIL, torchvision, DALI when installed) decodes the same 256 x 256 product images as JPEG
(quality 90, like FashionIQ) and as RGB PNG (like FashionGen) into 224 x 224 CLIP-normalised training
crops on the device; the pre-decoded cache backend does the same from memory-mapped shards, and the whole
``TrainLoader`` (prefetch thread included) is timed on the cache. On a GPU the target is >= 20,000
images/s into the trainer.

``test_backend`` times one (source, backend) with pytest-benchmark; ``test_data_report`` times all of them
in one process and prints the table (median of the timed rounds after one warm-up). On the CPU the image
count shrinks so that ``pytest bench/bench_data.py --benchmark-disable`` finishes in seconds.
"""

from __future__ import annotations

import datetime
import io
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from famevil_fast.data.backends import available_backends, make_backend
from famevil_fast.data.backends.cache_backend import CacheBackend
from famevil_fast.data.cache import build_cache
from famevil_fast.data.loader import TrainLoader
from famevil_fast.data.tasks import SampleTable
from famevil_fast.data.transforms import CropPlan, counter_uniforms

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
N_IMAGES = 1024 if CUDA else 32
BATCH = 256 if CUDA else 16
ROUNDS = 5 if CUDA else 2
SOURCE_SIZE, IMAGE_SIZE = 256, 224
SOURCES = ("jpeg", "png")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _product_pixels(n: int) -> list[np.ndarray]:
    from famevil_fast.data.synthetic.generate import _product_views, sample_product
    from famevil_fast.data.synthetic.render import render_view

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        spec, view = sample_product(rng), _product_views(rng)[0]
        out.append(render_view(spec, view, SOURCE_SIZE, SOURCE_SIZE))
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    started = time.perf_counter()
    root = tmp_path_factory.mktemp("bench_data")
    encoded = []  # 64 distinct images, encoded once; the N files repeat their bytes (decoders keep no cache)
    for i, pixels in enumerate(_product_pixels(min(N_IMAGES, 64))):
        noise = np.random.default_rng(i).integers(0, 6, pixels.shape, dtype=np.uint8)  # photos are not flat
        img = Image.fromarray(pixels + noise)
        jpeg, png = io.BytesIO(), io.BytesIO()
        img.save(jpeg, format="JPEG", quality=90)
        img.save(png, format="PNG", compress_level=6)
        encoded.append((jpeg.getvalue(), png.getvalue()))
    for i in range(N_IMAGES):
        jpeg, png = encoded[i % len(encoded)]
        (root / f"{i:05d}.jpg").write_bytes(jpeg)
        (root / f"{i:05d}.png").write_bytes(png)
    build_cache(root, root / "cache", keys=[f"{i:05d}.png" for i in range(N_IMAGES)], tokenize=False)
    print(
        f"\n{N_IMAGES} test images and their cache written in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    return root


def _paths(source: str) -> list[str]:
    ext = "jpg" if source == "jpeg" else "png"
    return [f"{i:05d}.{ext}" for i in range(N_IMAGES)]


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _make(name: str, root: Path):
    if name == "cache":
        return CacheBackend(root / "cache", IMAGE_SIZE, DEVICE)
    return make_backend(name, root, IMAGE_SIZE, DEVICE)


def _backend_rate(backend, paths: list[str], rounds: int = ROUNDS) -> float:
    """Median images per second of ``backend.load`` over batches of BATCH training crops."""
    batches = [paths[i : i + BATCH] for i in range(0, len(paths) - BATCH + 1, BATCH)]
    plans = [CropPlan(counter_uniforms(0, r, np.arange(BATCH))) for r in range(len(batches))]
    backend.load(batches[0], plans[0])  # warm-up (pipelines, pools, page cache)
    _sync()
    times = []
    for r in range(rounds):
        k = r % len(batches)
        start = time.perf_counter()
        out = backend.load(batches[k], plans[k])
        _sync()
        times.append(time.perf_counter() - start)
        assert out.ok.all()
    return BATCH / statistics.median(times)


def _loader_rate(root: Path) -> float:
    keys = [(f"{i:05d}.png",) for i in range(N_IMAGES)]
    table = SampleTable("bench", ("pixels",), {"pixels": keys}, {"ids": torch.arange(N_IMAGES)})
    loader = TrainLoader(table, CacheBackend(root / "cache", IMAGE_SIZE, DEVICE), BATCH, prefetch=3)
    stream = loader.stream()
    for _ in range(4):  # the batches the prefetch thread made ahead (3) and one more: the timed ones are new
        next(stream)
    _sync()
    start = time.perf_counter()
    n = 0
    for _ in range(16 if CUDA else 3):
        n += next(stream)["pixels"].shape[0]
    _sync()
    rate = n / (time.perf_counter() - start)
    loader.close()
    return rate


BACKENDS = ("pil", "torchvision", "dali", "cache")


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", BACKENDS)
def test_backend(benchmark, images, name: str, source: str) -> None:
    if name == "cache" and source == "jpeg":
        pytest.skip("the cache holds decoded pixels; its source format does not matter")
    if name != "cache" and name not in available_backends():
        pytest.skip(f"{name} is not installed")
    backend = _make(name, images)
    paths = _paths(source)[:BATCH]
    plan = CropPlan(counter_uniforms(0, 0, np.arange(BATCH)))
    backend.load(paths, plan)
    benchmark.extra_info.update({"backend": name, "source": source, "batch": BATCH, "device": str(DEVICE)})
    result = benchmark.pedantic(lambda: (backend.load(paths, plan), _sync())[0], rounds=ROUNDS, iterations=1)
    assert result.ok.all() and result.pixels.shape == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_data_report(images) -> None:
    card = torch.cuda.get_device_name() if CUDA else f"CPU ({os.cpu_count()} cores)"
    rows = []
    for name in BACKENDS:
        if name != "cache" and name not in available_backends():
            continue
        backend = _make(name, images)
        for source in SOURCES if name != "cache" else ("png",):
            label = "decoded uint8 shards" if name == "cache" else f"{source.upper()} 256 px"
            rows.append((name, label, _backend_rate(backend, _paths(source))))
            print(f"{name} {label}: {rows[-1][2]:,.0f} images/s", flush=True)  # kept if the run is cut
        backend.close()
    rows.append(("TrainLoader(cache)", "prefetch thread, 3 deep", _loader_rate(images)))
    lines = [
        f"Input pipeline, {card}, torch {torch.__version__}, {datetime.date.today()}: "
        f"{BATCH}-image batches of {IMAGE_SIZE} px training crops on {DEVICE}, median of {ROUNDS} rounds",
        "",
        "| backend | source | images / s |",
        "|---|---|---:|",
    ]
    lines += [f"| {n} | {s} | {r:,.0f} |" for n, s, r in rows]
    print("\n" + "\n".join(lines))
    assert all(r > 0 for _, _, r in rows)


def _stage_ms(fn, rounds: int = ROUNDS):
    """(median milliseconds, last result) of ``fn`` with the device synchronised around each call."""
    out, times = fn(), []
    for _ in range(rounds):
        _sync()
        start = time.perf_counter()
        out = fn()
        _sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def test_cache_stage_report(images) -> None:
    """Where a batch of the cache backend's time goes: gathering the uint8 images into (pinned) host memory,
    the copy to the device, the crop-resize-flip, the normalisation, and the whole ``load``."""
    from famevil_fast.data.transforms import normalize, resample_batch

    backend = CacheBackend(images / "cache", IMAGE_SIZE, DEVICE, resampler="torch")
    keys = _paths("png")[:BATCH]
    sizes = np.asarray([[e.height, e.width] for e in map(backend.cache.entry, keys)], dtype=np.int64)
    plan = CropPlan(counter_uniforms(0, 0, np.arange(BATCH)))
    boxes, flips = plan.boxes(sizes, IMAGE_SIZE)
    gather_ms, host = _stage_ms(lambda: backend.gather(keys, sizes))
    in_ram = [np.array(backend.cache.get(k)) for k in keys]  # the same pixels in anonymous memory
    spans = np.array_split(np.arange(BATCH), backend.num_threads)

    def copy_from_ram() -> None:
        dst = host.numpy()
        list(backend.pool.map(lambda span: [dst.__setitem__(k, in_ram[k]) for k in span], spans))

    ram_ms, _ = _stage_ms(copy_from_ram)
    copy_ms, on_device = _stage_ms(lambda: host.to(DEVICE, non_blocking=True).permute(0, 3, 1, 2))
    crop_args = (torch.from_numpy(sizes), torch.from_numpy(boxes), torch.from_numpy(flips), IMAGE_SIZE)
    resample_ms, crops = _stage_ms(lambda: resample_batch(on_device, *crop_args))
    normalize_ms, _ = _stage_ms(lambda: normalize(crops.clone()))
    clone_ms, _ = _stage_ms(lambda: crops.clone())
    load_ms, loaded = _stage_ms(lambda: backend.load(keys, plan))
    backend.close()
    stages = [
        ("gather into host memory", gather_ms),
        ("  same, from process memory", ram_ms),
        ("copy to the device", copy_ms),
        ("crop, resize, flip", resample_ms),
        ("normalise", max(normalize_ms - clone_ms, 0.0)),
        ("whole load", load_ms),
    ]
    lines = [f"cache backend stages, {BATCH} images of {SOURCE_SIZE} px to {IMAGE_SIZE} px on {DEVICE}"]
    lines += [
        f"  {name:26} {ms:8.2f} ms  {BATCH / max(ms, 1e-6) * 1e3:10,.0f} images/s" for name, ms in stages
    ]
    print("\n" + "\n".join(lines))
    assert loaded.ok.all() and loaded.pixels.shape == (BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
