"""Training-step throughput (target 1 of bench/RESULTS.md): the same FAME-ViL model in several configurations,
per task and for the round-robin four-task step.

1. ``faithful``: float32, eager (explicit softmax) attention, whole backbone trained, unfused adapters and
   losses (the official code's setting);
2. ``plain``: plain PyTorch: bf16 autocast, SDPA, fused AdamW, PyTorch references for adapters and losses,
   one pass per task; ``plain_graphed``: the same step captured as a CUDA graph (``torch.cuda.graph``),
   the best plain-PyTorch setting at this size, where launches dominate; ``plain_frozen``: backbone frozen;
3. ``fast``: famevil_fast's own choices: bf16, each op on the backend it picks automatically for its size
   (docs/ops.md), the four-task step in shared mixed-task passes, forward and backward replayed as a CUDA
   graph per task layout (``famevil_fast.train.cuda_graph``); ``fast_frozen``: backbone frozen, so the
   weight-gradient GEMMs of frozen layers are skipped; ``fast_triton``: every op on its Triton kernel
   (under a graph only device time counts, which is where the fused kernels may pay at this size);
   ``fast_quick_gelu``: ``fast`` with the MLPs' QuickGELU on its Triton kernels; ``fast_bf16_stream``:
   ``fast`` with the residual stream in bf16 (``residual_stream="autocast"``), and
   ``fast_bf16_stream_quick_gelu`` with both; ``fast_frozen_bf16_stream_quick_gelu`` is that with the
   backbone frozen (for the frozen ITC step of target 1); ``fast_master_weights`` and
   ``fast_frozen_master_weights`` are those two with the parameters in bf16 and float32 master copies in
   the optimizer (``train.master_weights``: autocast casts no weight). With bf16 parameters the automatic
   choice takes the Triton adapters for a graphed step's one-task calls of 12,608 rows or more (the ITC
   step's vision tower); ``fast_master_weights_torch_ops`` keeps every op but QuickGELU on PyTorch, so that
   the two effects can be told apart.

Two probes of a bf16 residual stream (bench/step_floor.py counts its bytes): ``bf16_model_graphed``, the
graphed plain step of the model converted to bf16 (parameters, residual stream and LayerNorms in bf16, no
autocast, AdamW on the bf16 parameters: not a training recipe, a measure of the stream's cost), and
``bf16_model_quick_gelu``, the same with QuickGELU on its kernels. Their names start with neither ``plain``
nor ``fast``: they are no baseline.

``plain_frozen_graphed`` is ``plain_frozen`` replayed as a CUDA graph. The ``*_compiled`` configurations add
``torch.compile`` (Inductor, default mode) of the step's forward to a graphed configuration, so that the
compiled step is also replayed as one CUDA graph (what ``mode="reduce-overhead"`` does):
``plain_compiled``, ``plain_frozen_compiled`` (target 1's best plain-PyTorch frozen step),
``fast_compiled`` and ``fast_frozen_compiled``. Compiling takes about a minute per configuration and batch
layout on a GPU, so they run only with ``TRAIN_STEP_COMPILE=1``. ``TRAIN_STEP_CONFIGS`` (comma-separated
names) and ``TRAIN_STEP_CELLS`` (e.g. ``64:itc,64:all4``) narrow a run; ``TRAIN_STEP_PROFILE`` names the
configurations whose four-task step is profiled kernel by kernel (default ``plain``).

Every configuration starts from the same weights and batch; the first step's losses must agree with the
faithful ones within bf16 tolerance. Reported: ms/step (median), samples/s, peak memory and model FLOPs
utilisation (FLOPs of one eager step counted by torch's FlopCounterMode, against the card's measured bf16
peak when known). The count includes the products inside the fused ops: while the counter counts they run
as their registered ``torch.ops.famevil_fast`` operators, whose FLOP formulas count what it counts for the
PyTorch references, so a step on the Triton kernels (``fast_triton``) counts the FLOPs of the same step on
the references (``test_fast_triton_counts_the_reference_flops``). "x best plain" divides by the fastest
plain-PyTorch configuration measured with the same backbone setting (trained or frozen). On a GPU:
ViT-B/16, batch 64 and 256. On the CPU: the micro model at batch 4, one timed step (a check that the
harness runs, not a measurement); graph capture is simulated there, and ``fast_triton`` runs only under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import copy
import gc
import os
import statistics
import time

import pytest
import torch

from famevil_fast.model import FameViL, FameViLConfig, clip_preset
from famevil_fast.ops._backend import triton_runs_on
from famevil_fast.text import EOT_ID, SOT_ID
from famevil_fast.train.cuda_graph import GraphedStep
from famevil_fast.train.master_weights import MasterAdamW, MasterWeights
from famevil_fast.train.optim import freeze_backbone

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PRESET = "ViT-B-16" if CUDA else "micro"
BATCHES = (64, 256) if CUDA else (4,)
# every workload at the first batch size, the four-task step at the larger ones
WORKLOADS = ("itc", "tgir", "scr", "cap", "all4")
CELLS = [(BATCHES[0], w) for w in WORKLOADS] + [(b, "all4") for b in BATCHES[1:]]


def parse_cells(text: str) -> list[tuple[int, str]]:
    """``TRAIN_STEP_CELLS``: comma-separated ``batch:workload`` pairs, e.g. "64:all4,256:all4"."""
    cells = []
    for cell in (c.strip() for c in text.split(",")):
        if not cell:
            continue
        batch, sep, workload = cell.partition(":")
        if not sep or not batch.strip().isdigit() or int(batch) < 1 or workload.strip() not in WORKLOADS:
            raise ValueError(f"TRAIN_STEP_CELLS: {cell!r} is not batch:workload with workload in {WORKLOADS}")
        cells.append((int(batch), workload.strip()))
    if not cells:
        raise ValueError(f"TRAIN_STEP_CELLS: no cell in {text!r}")
    return cells


if os.environ.get("TRAIN_STEP_CELLS", "").strip():
    CELLS = parse_cells(os.environ["TRAIN_STEP_CELLS"])
STEPS = 10 if CUDA else 1
WARMUP = 3 if CUDA else 1
FAITHFUL_STEPS = 5 if CUDA else 1
TASKS = ("itc", "tgir", "scr", "cap")
BF16_PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0}  # dense bf16, measured or datasheet

_PLAIN = dict(
    precision="bf16",
    attention="sdpa",
    backend="torch",
    mixed=False,
    frozen=False,
    graphs=False,
    compile=False,
    quick_gelu=None,
    bf16_model=False,
    residual_stream="float32",
    master_weights=False,
)
_FAST = dict(_PLAIN, attention="auto", backend=None, mixed=True, graphs=True)
CONFIGS = {
    "faithful": dict(_PLAIN, precision="fp32", attention="eager"),
    "plain": _PLAIN,
    "plain_graphed": dict(_PLAIN, graphs=True),
    "plain_compiled": dict(_PLAIN, graphs=True, compile=True),
    "plain_frozen": dict(_PLAIN, frozen=True),
    "plain_frozen_graphed": dict(_PLAIN, frozen=True, graphs=True),
    "plain_frozen_compiled": dict(_PLAIN, frozen=True, graphs=True, compile=True),
    "fast": _FAST,
    "fast_compiled": dict(_FAST, compile=True),
    "fast_frozen": dict(_FAST, frozen=True),
    "fast_frozen_compiled": dict(_FAST, frozen=True, compile=True),
    "fast_triton": dict(_FAST, backend="triton"),
    "fast_quick_gelu": dict(_FAST, quick_gelu="triton"),
    "fast_bf16_stream": dict(_FAST, residual_stream="autocast"),
    "fast_bf16_stream_quick_gelu": dict(_FAST, residual_stream="autocast", quick_gelu="triton"),
    "fast_frozen_bf16_stream_quick_gelu": dict(
        _FAST, frozen=True, residual_stream="autocast", quick_gelu="triton"
    ),
    "fast_master_weights": dict(_FAST, residual_stream="autocast", quick_gelu="triton", master_weights=True),
    "fast_master_weights_torch_ops": dict(
        _FAST, backend="torch", residual_stream="autocast", quick_gelu="triton", master_weights=True
    ),
    "fast_frozen_master_weights": dict(
        _FAST, frozen=True, residual_stream="autocast", quick_gelu="triton", master_weights=True
    ),
    "bf16_model_graphed": dict(_PLAIN, graphs=True, bf16_model=True),
    "bf16_model_quick_gelu": dict(_PLAIN, graphs=True, bf16_model=True, quick_gelu="triton"),
}
COMPILE = os.environ.get("TRAIN_STEP_COMPILE") == "1"
SELECTED = [c.strip() for c in os.environ.get("TRAIN_STEP_CONFIGS", "").split(",") if c.strip()]
if unknown := [c for c in SELECTED if c not in CONFIGS]:
    raise ValueError(f"TRAIN_STEP_CONFIGS: unknown configuration(s) {unknown}; known: {list(CONFIGS)}")


def skip_reason(name: str) -> str | None:
    """Why configuration ``name`` does not run in this session, or None."""
    if SELECTED and name not in SELECTED:
        return "not in TRAIN_STEP_CONFIGS"
    if CONFIGS[name]["compile"] and not COMPILE:
        return "torch.compile configurations run with TRAIN_STEP_COMPILE=1"
    if "triton" in (CONFIGS[name]["backend"], CONFIGS[name]["quick_gelu"]) and not triton_runs_on(DEVICE):
        return f"Triton kernels do not run on {DEVICE} here"
    return None


def runnable(name: str) -> bool:
    return skip_reason(name) is None


def random_batch(task: str, batch: int, size: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    lengths = torch.randint(20, 70, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, n + 1] = SOT_ID, EOT_ID
        ids[i, 1 : n + 1] = torch.randint(1, SOT_ID, (n,), generator=g)
    out = {"pixels": torch.randn(batch, 3, size, size, generator=g), "input_ids": ids}
    if task == "tgir":
        out = {
            "ref_pixels": out["pixels"],
            "target_pixels": torch.randn(batch, 3, size, size, generator=g),
            "input_ids": ids,
        }
    if task == "scr":
        out["labels"] = torch.randint(0, 121, (batch,), generator=g)
    return {k: v.to(DEVICE) for k, v in out.items()}


class Setup:
    def __init__(self, base: FameViL, name: str) -> None:
        opts = CONFIGS[name]
        self.opts = opts
        self.model = copy.deepcopy(base).set_runtime(
            attention=opts["attention"],
            backend=opts["backend"],
            residual_stream=opts["residual_stream"],
            activation_backend=opts["quick_gelu"],  # None: that of backend
        )
        if opts["bf16_model"]:
            self.model.to(torch.bfloat16)
        self._inputs: dict[int, dict] = {}
        if opts["frozen"]:
            freeze_backbone(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if CUDA and opts["precision"] == "bf16" else {}
        if opts["master_weights"]:
            weights = MasterWeights(self.model)
            self.optimizer = MasterAdamW([{"params": params}], weights, lr=1e-5, **fused)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=1e-5, **fused)
        self.autocast = opts["precision"] == "bf16" and not opts["bf16_model"]  # a bf16 model runs without it
        bf16 = torch.bfloat16 if self.autocast else None
        step_losses = self.losses
        if opts["compile"]:  # a fresh cache: every configuration compiles ``losses``, recompiles are capped
            torch._dynamo.reset()
            step_losses = torch.compile(self.losses)
        self.graphed = GraphedStep(step_losses, params, autocast_dtype=bf16) if opts["graphs"] else None
        self.weight = 1.0  # 1 / tasks of the step: each task's loss is averaged into the step's gradient

    def losses(self, batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.opts["mixed"] and len(batches) > 1:
            outs = self.model.forward_mixed(batches)
        else:
            outs = {t: self.model(b, t) for t, b in batches.items()}
        losses = {t: o.loss for t, o in outs.items()}
        return sum(losses.values()) * self.weight, losses

    def micro_steps(self, batches) -> list[dict[str, dict[str, torch.Tensor]]]:
        """One shared pass for a mixed step; otherwise one pass per task, gradients accumulated (as the
        trainer does, and so that only one task's activations are alive at a time)."""
        if self.opts["mixed"]:
            return [batches]
        return [{t: b} for t, b in batches.items()]

    def model_inputs(self, batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """``batches`` as the model takes them: a bf16 model's pixels in bf16 (converted once per batch)."""
        if not self.opts["bf16_model"]:
            return batches
        if id(batches) not in self._inputs:
            self._inputs[id(batches)] = {
                t: {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in b.items()}
                for t, b in batches.items()
            }
        return self._inputs[id(batches)]

    def step(self, batches: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        self.weight = 1.0 / len(batches)
        batches = self.model_inputs(batches)
        losses: dict[str, torch.Tensor] = {}
        if self.graphed is not None:
            for micro in self.micro_steps(batches):
                losses.update(self.graphed(micro))
            with self.graphed.untouched_grads_hidden():
                self.optimizer.step()
            self.graphed.zero_grad()
            return losses
        for micro in self.micro_steps(batches):
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=self.autocast):
                total, micro_losses = self.losses(micro)
            total.backward()
            losses.update({t: v.detach() for t, v in micro_losses.items()})
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def eager_flops(self, batches) -> int:
        """FLOPs of one eager step (a replayed graph is invisible to the counter). The fused ops' products
        are counted through their operators' FLOP formulas, as the references' products are: eager
        automatic choices may differ from those inside a graph, the count does not."""
        from torch.utils.flop_counter import FlopCounterMode

        self.weight = 1.0 / len(batches)
        batches = self.model_inputs(batches)
        counter = FlopCounterMode(display=False)
        with counter:  # entered once: entering it again would clear the counts
            for micro in self.micro_steps(batches):
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=self.autocast):
                    total, _ = self.losses(micro)
                total.backward()
        self.model.zero_grad(set_to_none=self.graphed is None)
        return counter.get_total_flops()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def time_steps(setup: Setup, batches, steps: int = STEPS, warmup: int = WARMUP) -> float:
    for _ in range(warmup):
        setup.step(batches)
    times = []
    for _ in range(steps):
        _sync()
        start = time.perf_counter()
        setup.step(batches)
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_tflops() -> float | None:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def workload_batches(workload: str, batch: int, size: int) -> dict[str, dict[str, torch.Tensor]]:
    tasks = TASKS if workload == "all4" else (workload,)
    return {t: random_batch(t, batch, size, seed=i) for i, t in enumerate(tasks)}


@pytest.fixture(scope="module")
def base_model() -> FameViL:
    torch.manual_seed(0)
    model = FameViL(FameViLConfig(clip=clip_preset(PRESET))).to(DEVICE)
    with torch.no_grad():  # non-zero adapters, so that every branch does real work
        for name, p in model.named_parameters():
            if name.endswith("up.weight"):
                p.normal_(std=0.02)
    return model


def first_step(base_model: FameViL, name: str, batches) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """(task losses, gradients the optimizer reads, on the host) of the first step of configuration ``name``;
    a parameter it trains that gets no gradient has a zero one."""
    setup = Setup(base_model, name)
    names = {id(p): n for n, p in setup.model.named_parameters()}
    grads: dict[str, torch.Tensor] = {}
    optimizer_step = setup.optimizer.step

    # the model's parameters (a MasterAdamW holds their float32 masters, and reads the model's gradients)
    stepped = getattr(setup.optimizer, "model_params", None)
    stepped = stepped or [p for group in setup.optimizer.param_groups for p in group["params"]]

    def step_reading_grads(*args, **kwargs):
        for p in stepped:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[names[id(p)]] = grad.detach().to("cpu", torch.float32, copy=True)
        return optimizer_step(*args, **kwargs)

    setup.optimizer.step = step_reading_grads
    losses = {t: float(v) for t, v in setup.step(batches).items()}
    setup = None
    release()
    return losses, grads


@pytest.fixture(scope="module")
def faithful_first_step(base_model):
    size = base_model.config.clip.vision.image_size
    batches = workload_batches("all4", BATCHES[0], size)
    return batches, first_step(base_model, "faithful", batches)


def grad_error(reference: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> float:
    """Relative error of ``grads`` against ``reference``, all of ``grads``' parameters together."""
    diff = sum(float((reference[n] - g).square().sum()) for n, g in grads.items())
    norm = sum(float(reference[n].square().sum()) for n in grads)
    return (diff / norm) ** 0.5 if norm > 0 else float("inf")


GRAD_TOL = 0.25  # bf16 configurations measured 0.03 against float32 (micro model, CPU)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_first_step_losses_agree(faithful_first_step, base_model, name):
    """The first step's losses (the forward) and the gradients its optimizer reads (the backward) agree with
    the faithful float32 step's: a configuration that skipped or scaled part of the backward would
    otherwise time as a faster step."""
    if not runnable(name):
        pytest.skip(f"{name}: {skip_reason(name)}")
    batches, (reference, ref_grads) = faithful_first_step
    losses, grads = first_step(base_model, name, batches)
    tol = 0.0 if name == "faithful" else 3e-2
    for task in TASKS:
        ref, got = reference[task], losses[task]
        assert abs(got - ref) <= tol * max(1.0, abs(ref)) + 1e-5, (name, task, got, ref)
    assert grads and set(grads) <= set(ref_grads), (name, sorted(set(grads) - set(ref_grads))[:5])
    err = grad_error(ref_grads, grads)
    assert err <= (1e-3 if name == "faithful" else GRAD_TOL), f"{name}: gradients off by {err:.3f} (relative)"


def test_grad_error_sees_a_scaled_or_missing_gradient():
    ref = {"a": torch.ones(3), "b": torch.full((2,), 2.0)}
    assert grad_error(ref, dict(ref)) == 0.0
    assert grad_error(ref, {"a": 2 * ref["a"], "b": 2 * ref["b"]}) == pytest.approx(1.0)
    assert grad_error(ref, {"a": ref["a"], "b": torch.zeros(2)}) > GRAD_TOL


def test_parse_cells():
    assert parse_cells("64:all4, 256:all4,") == [(64, "all4"), (256, "all4")]
    for bad in ("64", "64:al4", "x:itc", "0:itc", ","):
        with pytest.raises(ValueError):
            parse_cells(bad)


def test_fast_triton_counts_the_reference_flops(base_model, monkeypatch: pytest.MonkeyPatch):
    """The FLOPs behind ``fast_triton``'s MFU: one eager four-task step with every op on its Triton kernel
    (mixed-task adapters, fused projections, the Triton contrastive loss) counts what the same step counts
    with every op on its PyTorch reference. Without the fused operators' FLOP formulas it counts less (on
    the micro model, 80% of the ITC step's and 95% of the four-task step's FLOPs)."""
    if not runnable("fast_triton"):
        pytest.skip(f"fast_triton: {skip_reason('fast_triton')}")
    monkeypatch.setitem(CONFIGS, "fast_on_references", dict(CONFIGS["fast_triton"], backend="torch"))
    batches = workload_batches("all4", BATCHES[0], base_model.config.clip.vision.image_size)
    counts = {}
    for name in ("fast_triton", "fast_on_references"):
        setup = Setup(base_model, name)
        counts[name] = setup.eager_flops(batches)
        setup = None
        release()
    assert counts["fast_on_references"] > 0
    assert counts["fast_triton"] == counts["fast_on_references"], counts


NAME_WIDTH = max(map(len, CONFIGS))
HEADER = (
    f"{'batch':>5} {'workload':>8} {'config':>{NAME_WIDTH}} {'ms/step':>9} {'samples/s':>10} {'peak GiB':>9} "
    f"{'MFU %':>6} {'x faithful':>10} {'x plain':>8} {'x best plain':>12}"
)


ROW = f"{{:>5}} {{:>8}} {{:>{NAME_WIDTH}}} " + (
    "{:>9.2f} {:>10.0f} {:>9.2f} {:>6.1f} {:>10.2f} {:>8.2f} {:>12.2f}"
)
NAN = float("nan")


def measure(base_model: FameViL, name: str, batches, peak: float | None) -> tuple[float, float, float]:
    """(seconds per step, peak GiB, MFU) of one configuration; NaNs (and the reason printed) when it fails,
    e.g. out of memory or an op that a CUDA graph cannot capture. The peak covers building the setup, the
    warm-up (with a graphed step's capture, where its activations are allocated) and the timed steps."""
    setup = None
    try:
        if CUDA:  # from before the setup: a replayed graph allocates nothing, its capture did
            torch.cuda.reset_peak_memory_stats()
        setup = Setup(base_model, name)
        steps = FAITHFUL_STEPS if name == "faithful" else STEPS
        seconds = time_steps(setup, batches, steps=steps, warmup=min(WARMUP, steps))
        memory = torch.cuda.max_memory_allocated() / 2**30 if CUDA else NAN
        flops = setup.eager_flops(batches)
    except Exception as error:  # report and go on with the other configurations
        print(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
        return NAN, NAN, NAN
    finally:
        setup = None  # drop the last reference before collecting
        release()
    mfu = flops / seconds / (peak * 1e12) if peak else NAN
    return seconds, memory, mfu


def release() -> None:
    """Free the memory of configurations no longer referenced: a graphed setup references itself through
    its step function, so its graphs' memory pools go only when the cycle is collected."""
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


def best_plain(results: dict[str, float], name: str) -> float:
    """Seconds of the best plain-PyTorch configuration comparable with ``name`` (frozen or not)."""
    frozen = CONFIGS[name]["frozen"]
    keys = [k for k, c in CONFIGS.items() if k.startswith("plain") and c["frozen"] == frozen]
    times = [results[k] for k in keys if k in results and results[k] == results[k]]
    return min(times) if times else NAN


def test_train_step_report(base_model):
    size = base_model.config.clip.vision.image_size
    peak = peak_tflops()
    device = torch.cuda.get_device_name() if CUDA else "CPU (harness check only)"
    print(f"\ntraining step, {PRESET}, {device}, torch {torch.__version__}\n{HEADER}", flush=True)
    rows = []
    for batch, workload in CELLS:
        batches = workload_batches(workload, batch, size)
        samples = batch * len(batches)
        results: dict[str, float] = {}
        for name in filter(runnable, CONFIGS):
            seconds, memory, mfu = measure(base_model, name, batches, peak)
            results[name] = seconds
            row = (
                batch,
                workload,
                name,
                seconds * 1e3,
                samples / seconds,
                memory,
                100 * mfu,
                results.get("faithful", NAN) / seconds,
                results.get("plain", NAN) / seconds,
                best_plain(results, name) / seconds,
            )
            rows.append(row)
            print(ROW.format(*row), flush=True)
    assert any(r[3] > 0 for r in rows)


KERNEL_KINDS = (  # (kind, name fragments), first match wins
    ("attention", ("flash", "fmha", "attention")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "splitk", "wgmma", "sm90_", "sm80_")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("optimizer", ("multi_tensor", "adam")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    kinds = (kind for kind, parts in KERNEL_KINDS if any(p in lowered for p in parts))
    return next(kinds, "elementwise/other")


PROFILED = [c.strip() for c in os.environ.get("TRAIN_STEP_PROFILE", "plain").split(",") if c.strip()]
if unknown := [c for c in PROFILED if c not in CONFIGS]:
    raise ValueError(f"TRAIN_STEP_PROFILE: unknown configuration(s) {unknown}; known: {list(CONFIGS)}")


def profile_rows(base_model: FameViL, name: str, batches, kernel_breakdown) -> list | None:
    """Every kernel of one four-task step of configuration ``name`` (a graphed one captured first, so that
    the profiled step is a replay): (kernel, launches, ms), or None without a device profile."""
    setup = Setup(base_model, name)
    setup.step(batches)
    rows = kernel_breakdown(lambda: setup.step(batches), DEVICE, top=0)
    setup = None
    release()
    return rows


@pytest.mark.parametrize("name", PROFILED)
def test_train_step_profile(base_model, kernel_breakdown, name):
    """Where the device time of one four-task step goes, by kind of kernel and by kernel, for each
    configuration of ``TRAIN_STEP_PROFILE`` (default ``plain``, the eager bf16 step whose kernels
    ``plain_graphed`` replays; at batch 64 ``fast`` replays them too, its mixed-task adapters keeping the
    per-task PyTorch path)."""
    if not runnable(name):
        pytest.skip(f"{name}: {skip_reason(name)}")
    size = base_model.config.clip.vision.image_size
    rows = profile_rows(base_model, name, workload_batches("all4", BATCHES[0], size), kernel_breakdown)
    print(f"\ndevice time of one {name} four-task step, {PRESET}, batch {BATCHES[0]}")
    if rows is None:
        print("  (no device profile on the CPU)")
        return
    total = sum(ms for _, _, ms in rows)
    kinds: dict[str, tuple[int, float]] = {}
    for kernel, calls, ms in rows:
        n, t = kinds.get(kernel_kind(kernel), (0, 0.0))
        kinds[kernel_kind(kernel)] = (n + calls, t + ms)
    print(f"  {sum(c for _, c, _ in rows)} kernels, {total:.2f} ms")
    for kind, (calls, ms) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"  {kind:<18} {ms:>8.2f} ms {100 * ms / total:>5.1f}% {calls:>6} kernels")
    for kernel, calls, ms in rows[:16]:
        print(f"    {ms:>8.2f} ms {calls:>5}x  {kernel}")
    assert total > 0
