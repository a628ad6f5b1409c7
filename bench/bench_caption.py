"""Caption decoding throughput (target 4 of bench/RESULTS.md): tokens/s of decoding, greedy and with beam
search, by re-encoding the prefix every step (the official decoding), by the key/value-cached decoder, and by
the cached decoder replayed as one CUDA graph (``generate(..., cuda_graph=True)``); all three must give
identical tokens, so the model runs in float32 (in bf16 the one-token and the whole-prefix kernels round
differently, and a random model's near-tied logits then flip). On a GPU, ``graph+triton`` replays the same
graph for the model with ``backend="triton"``, whose decoder runs each layer fused (``model/decode_step.py``:
seven kernels a layer instead of about thirty; under a graph only their device time counts); whether its
tokens equal re-encoding's is reported, and so is its kernel count a step. ``compiled`` and
``compiled+graph`` run the static-shape step under ``torch.compile`` (``generate(..., compiled=True)``),
eagerly and captured; the compiler fuses the work around the matrix products, so its tokens too are
reported rather than required to match (the first call of each shape compiles, outside the timing).

The model has random weights with the end token's logit pushed down, so every caption runs the full length
and each method decodes the same number of tokens. On a GPU: ViT-B/16, 64 images at 76 tokens (the
length of a FashionGen caption: the 77-token context less the start token; the official decoding runs to
the longest reference of the batch), 16 images at 76 tokens, then 64 and 16 images at 30 tokens, greedy and
3 beams; on the CPU:
the micro model (a check that the harness runs, not a measurement).

``BENCH_CAPTION_CASES`` picks the cases (``images:tokens:beams`` comma-separated, e.g. ``16:76:1,64:76:1``)
and ``BENCH_CAPTION_METHODS`` the methods beside re-encoding (comma-separated names of the table), so that a
short run on a card times what it needs.
"""

from __future__ import annotations

import copy
import functools
import os
import statistics
import time

import torch

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.model.generation import EOT_ID, generate, generate_by_reencoding
from famevil_fast.ops._backend import triton_runs_on

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PRESET = "ViT-B-16" if CUDA else "micro"
# images, tokens, beams
DEFAULT_CASES = (
    [(64, 76, 1), (16, 76, 1), (64, 30, 1), (16, 30, 1), (16, 30, 3)] if CUDA else [(2, 6, 1), (2, 6, 2)]
)
METHODS = ("kv-cache", "kv+graph", "graph+triton", "compiled", "compiled+graph")
DEFAULT_METHODS = ("kv-cache", "kv+graph", "graph+triton")  # compiled ones: the caption_compiled part
REPEATS = 5 if CUDA else 1
LONG_REPEATS = 3  # cases past 50 tokens: re-encoding takes seconds a call


TOP_KERNELS = 6  # kernels listed per decoding method, for the first case


def _model() -> FameViL:
    torch.manual_seed(0)
    model = FameViL(FameViLConfig(clip=clip_preset(PRESET))).to(DEVICE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(std=0.02)
        model.heads["cap"].bias[EOT_ID] = -1e4  # no caption ends early
    return model


def cases() -> list[tuple[int, int, int]]:
    """(images, tokens, beams) of each case: ``BENCH_CAPTION_CASES`` or the defaults."""
    given = os.environ.get("BENCH_CAPTION_CASES", "").strip()
    if not given:
        return DEFAULT_CASES
    out = []
    for item in given.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"BENCH_CAPTION_CASES: {item!r} is not images:tokens:beams (positive integers)")
        out.append(tuple(int(p) for p in parts))
    return out


def methods_chosen() -> tuple[str, ...]:
    """The methods timed beside re-encoding: ``BENCH_CAPTION_METHODS`` or ``DEFAULT_METHODS`` (the compiled
    ones compile anew for each case's shapes: they are timed when named)."""
    given = [m.strip() for m in os.environ.get("BENCH_CAPTION_METHODS", "").split(",") if m.strip()]
    unknown = [m for m in given if m not in METHODS]
    if unknown:
        raise ValueError(f"BENCH_CAPTION_METHODS: unknown {unknown}; known: {', '.join(METHODS)}")
    return tuple(given) or DEFAULT_METHODS


def _methods(model, pixels, length, beams, triton_model=None, chosen=METHODS):
    def decode(m=model, **options):
        return lambda: generate(m, pixels, max_len=length, num_beams=beams, **options)

    out = {
        "re-encoding": lambda: generate_by_reencoding(model, pixels, max_len=length, num_beams=beams),
        "kv-cache": decode(),
        "kv+graph": decode(cuda_graph=True),
        "compiled": decode(compiled=True),
        "compiled+graph": decode(compiled=True, cuda_graph=True),
    }
    if triton_model is not None:  # the same graph with the adapters and XAA blocks on their Triton kernels
        out["graph+triton"] = decode(triton_model, cuda_graph=True)
    return {k: fn for k, fn in out.items() if k == "re-encoding" or k in chosen}


# must give exactly the re-encoding tokens; the Triton kernels sum in another order, so theirs are reported
EXACT = ("re-encoding", "kv-cache", "kv+graph")


def _seconds(fn, repeats: int = REPEATS) -> float:
    fn()  # warm-up (and capture, for the graphed decoder)
    times = []
    for _ in range(repeats):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if CUDA:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_caption_decoding_report(kernel_breakdown):
    model = _model()
    triton_model = None
    if triton_runs_on(DEVICE):  # a copy: a graph is cached per model and parameter storage
        triton_model = copy.deepcopy(model).set_runtime(backend="triton")
    size = model.config.clip.vision.image_size
    name = torch.cuda.get_device_name() if CUDA else "CPU (harness check only)"
    print(f"\ncaption decoding, {PRESET}, {name}, torch {torch.__version__}, float32")
    head = f"{'images':>6} {'tokens':>6} {'beams':>5} {'method':>14} {'ms':>9} {'tokens/s':>10}"
    print(f"{head} {'x re-encoding':>13}")
    chosen = methods_chosen()
    for case, (batch, length, beams) in enumerate(cases()):
        pixels = torch.randn(batch, 3, size, size, device=DEVICE)
        methods = _methods(model, pixels, length, beams, triton_model, chosen)
        repeats = LONG_REPEATS if length > 50 else REPEATS
        outputs, times = {}, {}
        with torch.no_grad():  # each method timed right after its first run: the graphed ones share one
            for k, fn in methods.items():  # live graph a model, which the next method's capture replaces
                outputs[k] = fn()
                times[k] = _seconds(fn, repeats)
        tokens = batch * length
        for k, seconds in times.items():
            ratio = times["re-encoding"] / seconds
            same = torch.equal(outputs[k], outputs["re-encoding"])
            row = f"{batch:>6} {length:>6} {beams:>5} {k:>14} {seconds * 1e3:>9.2f} {tokens / seconds:>10.0f}"
            print(f"{row} {ratio:>13.2f}  tokens {'identical' if same else 'DIFFER'}", flush=True)
        with torch.no_grad():  # what bounds it: the shared vision pass, and the cached decoder's kernels
            vision = _seconds(functools.partial(model.vision_memory, pixels, "cap"))
            eager = {"kv-cache": methods.get("kv-cache")}
            if "graph+triton" in methods:
                eager["fused kv-cache"] = functools.partial(
                    generate, triton_model, pixels, max_len=length, num_beams=beams
                )
            if "compiled" in methods or "compiled+graph" in methods:
                eager["compiled kv-cache"] = functools.partial(
                    generate, model, pixels, max_len=length, num_beams=beams, compiled=True
                )
            profiles = {k: kernel_breakdown(fn, DEVICE, top=0) for k, fn in eager.items() if fn is not None}
        line = f"  vision pass (in every method): {vision * 1e3:.2f} ms"
        for name, kernels in profiles.items():
            if kernels is not None:
                count, kernel_ms = sum(k[1] for k in kernels), sum(k[2] for k in kernels)
                line += (
                    f"; {name} decode: {count} kernels ({count // length} a step), {kernel_ms:.2f} ms in them"
                )
        print(line, flush=True)
        if case == 0:  # which kernels the decode's device time goes to
            for name, kernels in profiles.items():
                for kernel, calls, ms in (kernels or [])[:TOP_KERNELS]:
                    print(f"    {name:<17} {ms:9.2f} ms {calls:7d}x  {kernel}", flush=True)
        for k in (k for k in EXACT if k in methods):
            assert torch.equal(outputs[k], outputs["re-encoding"]), f"{k} tokens differ from re-encoding"
