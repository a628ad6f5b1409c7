"""Tokenizer speed: 10,000 fashion captions (title + description, 30-60 words) on one CPU core.

Compares ``famevil_fast.text.tokenize`` (cold caches each round, and warm) with open_clip's pure-Python
tokenizer, and asserts the 10,000 captions take under one second. Everything runs pinned to a single core,
with the Rust thread pool limited to one thread, and is timed in CPU time of this process
(``time.process_time``), which on one core is the run time without the waits that other processes on a
shared machine would add. ``pytest bench/bench_tokenizer.py --benchmark-disable`` runs each case once.
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import importlib.util  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from types import ModuleType  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from famevil_fast.text import get_tokenizer, tokenize  # noqa: E402
from famevil_fast.text.vocab import default_vocab_path  # noqa: E402

N_CAPTIONS = 10_000
N_REFERENCE = 1_000
BUDGET_S = 1.0

_COLORS = (
    "black white off-white ivory cream ecru beige tan camel brown chocolate navy midnight blue indigo "
    "teal green olive khaki sage mint yellow mustard orange rust red burgundy pink blush fuchsia "
    "purple lilac grey charcoal silver gold multicolor"
).split()
_MATERIALS = (
    "cotton poplin linen silk satin crepe chiffon wool cashmere mohair alpaca merino jersey denim "
    "leather suede lambskin calfskin nylon polyester viscose tweed velvet corduroy twill canvas mesh "
    "neoprene shearling fleece"
).split()
_GARMENTS = (
    "shirt t-shirt tank blouse sweater cardigan hoodie sweatshirt jacket blazer coat parka trench "
    "bomber vest dress skirt trousers jeans shorts jumpsuit sneakers boots loafers sandals pumps "
    "derbys backpack tote clutch wallet belt scarf beanie cap"
).split()
_FITS = "slim relaxed oversized cropped regular boxy tailored straight-leg wide-leg tapered".split()
_DETAILS = [
    "spread collar",
    "button closure at front",
    "patch pocket at chest",
    "tonal stitching",
    "rib knit crewneck collar, cuffs, and hem",
    "zip closure at back",
    "two-way zip closure",
    "logo embroidered at chest",
    "graphic printed in black at front",
    "drop-tail hem",
    "adjustable drawstring at hood",
    "welt pockets at waist",
    "five-pocket styling",
    "fading and whiskering throughout",
    "belt loops",
    "darts at bust",
    "vented side seams",
    "concealed zip closure at side",
    "lace-up closure",
    "round toe",
    "rubber sole in white",
    "padded collar",
    "leather lining",
    "gold-tone hardware",
    "silver-tone hardware",
    'approx. 3" heel',
    "fully lined",
    "partially lined",
    "contrast stitching in tan",
    "raw edge at hem",
    "crinkled texture",
    "semi-sheer",
    "pleated front",
    "single-button closure",
    "notched lapel",
    "flap pockets at waist",
    "100% virgin wool",
    "70% cotton, 30% polyamide",
    "made in Italy",
    "model is 6'1\" and wears size M",
]
_UNICODE = [
    "crêpe de chine",
    "Hermès-inspired",
    "café-au-lait",
    "piqué knit",
    "naïve print",
    "jacquard — woven",
    "it’s “oversized”",
    "size 40 ½",
    "black &amp; white",
    "M&amp;M print",
    "made in Japan 日本",
    "🔥 bestseller",
]
_SYLLABLES = "ka ro mi sen do lu va ne ti zo ber gal mar fen qui sto ria le on".split()


def _caption(rng: random.Random) -> str:
    brand = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).capitalize()
    title = (
        f"{brand} {rng.choice(_COLORS)} {rng.choice(_MATERIALS)} {rng.choice(_FITS)} {rng.choice(_GARMENTS)}"
    )
    parts = [
        f"{rng.choice(['Long sleeve', 'Short sleeve', 'Sleeveless'])} {rng.choice(_MATERIALS)} "
        f"{rng.choice(_GARMENTS)} in {rng.choice(_COLORS)}"
    ]
    target = rng.randint(24, 52)
    while sum(len(part.split()) for part in parts) < target:
        parts.append(rng.choice(_UNICODE) if rng.random() < 0.005 else rng.choice(_DETAILS).capitalize())
    parts.append(f'Approx. {rng.randint(1, 99)}" length')
    return f"{title.title()}. " + ". ".join(parts) + "."


def fashion_captions(n: int, seed: int = 0) -> list[str]:
    """Synthetic FashionGen-like product texts; about 6% hold non-ASCII characters or HTML entities."""
    rng = random.Random(seed)
    return [_caption(rng) for _ in range(n)]


def _open_clip_tokenizer() -> ModuleType:
    """open_clip's tokenizer module, loaded on its own (importing the whole package takes seconds)."""
    spec = importlib.util.spec_from_file_location(
        "_open_clip_tokenizer", default_vocab_path().parent / "tokenizer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return fashion_captions(N_CAPTIONS)


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    return _open_clip_tokenizer()


@pytest.fixture
def single_core() -> Iterator[None]:
    """Run the test on one CPU core with one torch thread."""
    pin = hasattr(os, "sched_getaffinity")
    cpus = os.sched_getaffinity(0) if pin else set()
    threads = torch.get_num_threads()
    if pin:
        os.sched_setaffinity(0, {min(cpus)})
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if pin:
            os.sched_setaffinity(0, cpus)


def _record_rate(benchmark, n: int) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["captions_per_s"] = round(n / stats.stats.min)


@pytest.mark.benchmark(group="tokenize", timer=time.process_time)
def test_tokenize_cold(benchmark, captions: list[str], single_core: None) -> None:
    tokenizer = get_tokenizer()
    out = benchmark.pedantic(tokenizer, args=(captions,), setup=tokenizer.clear_cache, rounds=3, iterations=1)
    assert out.shape == (N_CAPTIONS, 77)
    _record_rate(benchmark, N_CAPTIONS)


@pytest.mark.benchmark(group="tokenize", timer=time.process_time)
def test_tokenize_warm(benchmark, captions: list[str], single_core: None) -> None:
    tokenizer = get_tokenizer()
    tokenizer(captions)
    out = benchmark.pedantic(tokenizer, args=(captions,), rounds=3, iterations=1)
    assert out.shape == (N_CAPTIONS, 77)
    _record_rate(benchmark, N_CAPTIONS)


@pytest.mark.benchmark(group="tokenize", timer=time.process_time)
def test_open_clip_reference(
    benchmark, captions: list[str], reference: ModuleType, single_core: None
) -> None:
    subset = captions[:N_REFERENCE]
    out = benchmark.pedantic(reference.tokenize, args=(subset,), rounds=1, iterations=1)
    assert torch.equal(out, tokenize(subset))
    _record_rate(benchmark, N_REFERENCE)


def test_10k_captions_under_one_second(captions: list[str], single_core: None) -> None:
    tokenizer = get_tokenizer()
    best_cpu, best_wall = float("inf"), float("inf")
    for _ in range(3):
        tokenizer.clear_cache()
        cpu, wall = time.process_time(), time.perf_counter()
        tokenizer(captions)
        best_cpu = min(best_cpu, time.process_time() - cpu)
        best_wall = min(best_wall, time.perf_counter() - wall)
    print(
        f"\n{N_CAPTIONS:,} captions, cold caches, one core: {best_cpu:.3f} s CPU "
        f"({N_CAPTIONS / best_cpu:,.0f} captions/s), {best_wall:.3f} s wall"
    )
    assert best_cpu < BUDGET_S, (
        f"tokenising {N_CAPTIONS} captions took {best_cpu:.3f} s (budget {BUDGET_S} s)"
    )
