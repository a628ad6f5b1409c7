"""The bytes and FLOPs floor of one training step of ``bench_train_step``'s configurations, op by op.

The step runs on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``): every ATen call with its
shapes and dtypes, no arithmetic and no device, so that a ViT-B/16 four-task step at batch 64 is counted on
the CPU in seconds. Each call that does work (views and other aliases do not) is charged the bytes of the
tensors it reads and writes and, for products and attention, the FLOPs of torch's FLOP counter. Its floor is
the longer of its bytes at the copy bandwidth and its FLOPs at the matrix peak (by default the H200's
measured 4.3 TB/s and 790 TFLOP/s, bench/RESULTS.md). Summed, the floors give the time of the step if every
kernel ran at its roofline and none were fused: what tuning kernels one by one could reach at best, and, by
kind of call, where fusing them could save bytes. The call count approximates the step's kernel count.

bf16 autocast follows CUDA's rules: CPU autocast casts the products to bf16 as CUDA autocast does, and
``CudaFloat32Ops`` casts the ops that CUDA autocast runs in float32 (LayerNorm, softmax, the losses' logs and
exponentials, sums), which CPU autocast leaves in bf16. The forward and backward are counted as a CUDA graph
records them (``simulated_capture``: static shapes, no value read back), the optimizer step beside them.

A configuration name may carry extras after ``+``: ``+quick_gelu`` (e.g. ``plain+quick_gelu``) counts its
step with every QuickGELU as the registered operator of its Triton kernels (``famevil_fast.ops.quick_gelu``),
one call each way, as ``fast_quick_gelu`` does; ``+bf16_model`` counts the model built in bfloat16 and run
without autocast, so that the residual stream, the LayerNorms and the parameters are bf16: a bound on what
a bf16 residual stream would save (without float32 master weights, whose casts it leaves out);
``+master_weights`` counts the model's parameters in bf16 under autocast with float32 masters in the
optimizer (``train.master_weights``), the masters' gradient and weight copies included.
Configurations that put every op on Triton (``fast_triton``) are not counted.

    python bench/step_floor.py --batch 64 --workload all4 --configs faithful,plain,plain+quick_gelu,fast
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import CONFIGS, TASKS  # noqa: E402

from famevil_fast.capture import simulated_capture  # noqa: E402
from famevil_fast.model import FameViL, FameViLConfig, clip_preset  # noqa: E402
from famevil_fast.ops.layer_norm import LOW_PRECISION  # noqa: E402
from famevil_fast.text import EOT_ID, SOT_ID  # noqa: E402
from famevil_fast.train.master_weights import MasterAdamW, MasterWeights  # noqa: E402
from famevil_fast.train.optim import freeze_backbone  # noqa: E402

COPY_TBPS = 4.3  # device copy, bytes read + written (H200, bench/RESULTS.md)
MATRIX_TFLOPS = 790.0  # dense bf16 matrix products (H200)
KINDS = ("matmul", "attention", "cast", "optimizer", "other")
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "convolution", "convolution_backward", "_scaled_mm"}
_ALLOCATIONS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "_unsafe_view"}
_ALLOCATIONS |= {"_reshape_alias", "lift_fresh_copy", "set_"}
# the CPU kernels of scaled dot-product attention take the CUDA flash kernels' FLOP formulas (same arguments)
_FLASH = torch.ops.aten._scaled_dot_product_flash_attention
_FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_backward
_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _FLASH,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _FLASH_BACKWARD,
}
# the ops CUDA autocast runs in float32 (torch.amp's documented list and autocast_mode.cpp's). For some
# (softmax, log_softmax, sum, cumsum, prod, norm) CUDA passes dtype=float32 to the op instead of casting
# its input: here the cast is a call of its own, which no configuration counted so far reaches with
# 16-bit inputs (the eager attention's softmax would, in bf16)
CUDA_FLOAT32_OPS = frozenset(
    "__pow__ __rdiv__ __rpow__ __rtruediv__ acos asin binary_cross_entropy_with_logits cosh "
    "cosine_embedding_loss cdist cosine_similarity cross_entropy cumprod cumsum dist erfinv exp expm1 "
    "group_norm hinge_embedding_loss kl_div l1_loss layer_norm log log_softmax log10 log1p log2 "
    "margin_ranking_loss mse_loss multilabel_margin_loss multi_margin_loss nll_loss norm normalize pdist "
    "poisson_nll_loss pow prod reciprocal rsqrt sinh smooth_l1_loss soft_margin_loss softmax softmin "
    "softplus sum renorm tan triplet_margin_loss logsumexp linalg_vector_norm linalg_matrix_norm "
    "frobenius_norm nuclear_norm huber_loss nll_loss2d".split()
)


class CudaFloat32Ops(TorchFunctionMode):
    """Runs the ops of ``CUDA_FLOAT32_OPS`` on float32 copies of their 16-bit floating inputs while
    autocast is on, as CUDA autocast does (use inside CPU autocast, which casts the products)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", None) in CUDA_FLOAT32_OPS and torch.is_autocast_enabled("cpu"):
            args, kwargs = tree_map(_to_float32, (args, kwargs))
        return func(*args, **kwargs)


def _to_float32(x: object) -> object:
    if isinstance(x, torch.Tensor) and x.dtype in LOW_PRECISION:
        return x.float()
    return x


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """CUDA autocast's casts on CPU tensors: CPU autocast for the products, ``CudaFloat32Ops`` the rest."""
    with torch.autocast("cpu", dtype=dtype), CudaFloat32Ops():
        yield


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches in ``t``: its elements, or its storage when that is smaller (broadcasts)."""
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


def _tensors(tree: object) -> dict[int, torch.Tensor]:
    return {id(t): t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


def kind_of(name: str) -> str:
    if name in _MATMUL:
        return "matmul"
    if "attention" in name:
        return "attention"
    if name in ("_to_copy", "copy_"):
        return "cast"
    if name.startswith(("_fused_adam", "_foreach_")):
        return "optimizer"
    return "other"


@dataclass
class Tally:
    calls: int = 0
    flops: float = 0.0
    bytes: float = 0.0
    floor_s: float = 0.0


@dataclass
class OpCounter(TorchDispatchMode):
    """Every ATen call that does work: its kind's tally and its own (by op name)."""

    tflops: float = MATRIX_TFLOPS
    tbps: float = COPY_TBPS
    by_kind: dict[str, Tally] = field(default_factory=lambda: {k: Tally() for k in KINDS})
    by_op: dict[str, Tally] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in ("aten", "famevil_fast") and not _no_work(func):
            self.charge(func, args, kwargs, out)
        return out

    def charge(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        read = _tensors((args, kwargs))
        written = {**_tensors(out), **_mutated(func, args, kwargs)}
        nbytes = sum(map(_tensor_bytes, read.values())) + sum(map(_tensor_bytes, written.values()))
        formula = flop_registry.get(_ATTENTION_FLOPS.get(func.overloadpacket, func.overloadpacket))
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        floor = max(flops / (self.tflops * 1e12), nbytes / (self.tbps * 1e12))
        for tally in (self.by_kind[kind_of(name)], self.by_op.setdefault(name, Tally())):
            tally.calls += 1
            tally.flops += flops
            tally.bytes += nbytes
            tally.floor_s += floor

    def total(self) -> Tally:
        kinds = self.by_kind.values()
        return Tally(*(sum(getattr(t, f) for t in kinds) for f in ("calls", "flops", "bytes", "floor_s")))


def _no_work(func) -> bool:
    """Views and other aliases of an input, and bare allocations, launch no kernel."""
    if func.overloadpacket.__name__ in _ALLOCATIONS:
        return True
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _mutated(func, args, kwargs) -> dict[int, torch.Tensor]:
    """The tensors (or lists of them) an in-place or out= call writes, from its schema. The fused Adam
    kernels write the gradients back only when they unscale them (a ``grad_scale`` is given)."""
    values = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
    unscaled = func.overloadpacket.__name__.startswith("_fused_adam") and values.get("grad_scale") is None
    written = [
        values.get(a.name)
        for a in func._schema.arguments
        if a.alias_info is not None and a.alias_info.is_write and not (unscaled and a.name == "grads")
    ]
    return _tensors(written)


def fake_batch(
    task: str, batch: int, image_size: int, context: int = 77, pixel_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Inputs of ``task``'s training batch (values do not matter to the count, only shapes and dtypes)."""
    ids = torch.zeros(batch, context, dtype=torch.long)
    ids[:, 0], ids[:, context // 2] = SOT_ID, EOT_ID
    pixels = torch.zeros(batch, 3, image_size, image_size, dtype=pixel_dtype)
    if task == "tgir":
        return {"ref_pixels": pixels, "target_pixels": torch.zeros_like(pixels), "input_ids": ids}
    out = {"pixels": pixels, "input_ids": ids}
    if task == "scr":
        out["labels"] = torch.zeros(batch, dtype=torch.long)
    return out


def count_step(
    name: str, preset: str, batch: int, workload: str, tflops: float = MATRIX_TFLOPS, tbps: float = COPY_TBPS
) -> OpCounter:
    """The calls of one training step of configuration ``name`` (``bench_train_step.CONFIGS``): per task, or
    in shared mixed-task passes where the configuration has them, then the optimizer step. A first step
    runs uncounted, so that the optimizer's state exists, as in a replayed step."""
    opts = config_options(name)
    bf16_model = opts["bf16_model"]
    counter = OpCounter(tflops=tflops, tbps=tbps)
    with FakeTensorMode():
        with _default_dtype(torch.bfloat16 if bf16_model else torch.get_default_dtype()):
            model = FameViL(FameViLConfig(clip=clip_preset(preset)))
        model.set_runtime(
            attention=opts["attention"], backend=opts["backend"], residual_stream=opts["residual_stream"]
        )
        if opts["quick_gelu"] == "triton":
            _quick_gelu_operator(model)
        if opts["frozen"]:
            freeze_backbone(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if opts["master_weights"]:
            optimizer = MasterAdamW([{"params": params}], MasterWeights(model), lr=1e-5, fused=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
        size = model.config.clip.vision.image_size
        tasks = TASKS if workload == "all4" else (workload,)
        pixel_dtype = torch.bfloat16 if bf16_model else torch.float32
        batches = {t: fake_batch(t, batch, size, pixel_dtype=pixel_dtype) for t in tasks}
        micro_steps = [batches] if opts["mixed"] else [{t: b} for t, b in batches.items()]
        bf16 = opts["precision"] == "bf16" and not bf16_model
        for counted in (contextlib.nullcontext(), counter):
            optimizer.zero_grad(set_to_none=True)
            with counted:
                for micro in micro_steps:
                    with simulated_capture():
                        with cuda_autocast() if bf16 else contextlib.nullcontext():
                            outs = (
                                model.forward_mixed(micro)
                                if len(micro) > 1
                                else {t: model(b, t) for t, b in micro.items()}
                            )
                            total = sum(o.loss for o in outs.values()) / len(batches)
                        total.backward()
                optimizer.step()
    return counter


def config_options(name: str) -> dict:
    """The options of configuration ``name``: ``bench_train_step.CONFIGS``'s, with its extras applied."""
    base, *extras = name.split("+")
    opts = dict(CONFIGS[base])
    if "quick_gelu" in extras:
        opts["quick_gelu"] = "triton"
    if "bf16_model" in extras:
        opts["bf16_model"] = True
    if "master_weights" in extras:
        opts["master_weights"] = True
    return opts


def _quick_gelu_operator(model: FameViL) -> None:
    """Every QuickGELU of ``model`` as the registered operator of its Triton kernels, which fake tensors
    run through its fake implementation (nothing launches, Triton need not run here)."""
    from famevil_fast.kernels import custom_ops  # noqa: F401  (registers torch.ops.famevil_fast)

    from famevil_fast.model.clip import QuickGELU

    for module in model.modules():
        if isinstance(module, QuickGELU):
            module.forward = torch.ops.famevil_fast.quick_gelu


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


EXTRAS = ("quick_gelu", "bf16_model", "master_weights")


def known_config(name: str) -> str | None:
    """Why ``name`` cannot be counted (None when it can): a configuration of ``bench_train_step``, alone or
    with extras of ``EXTRAS`` after ``+``, that does not put every op on Triton (the fused adapters' eager
    path launches kernels, which fake tensors cannot run)."""
    base, *extras = name.split("+")
    if base not in CONFIGS or any(extra not in EXTRAS for extra in extras):
        return f"unknown configuration {name!r}"
    if CONFIGS[base]["backend"] == "triton":
        return f"{base} puts every op on Triton, which is not counted here"
    return None


def table(rows: dict[str, OpCounter]) -> str:
    """One line per configuration and kind of call: calls, GFLOP, GB and floor."""
    lines = [f"{'config':>20} {'kind':>10} {'calls':>7} {'GFLOP':>9} {'GB':>8} {'floor ms':>9}"]
    for name, counter in rows.items():
        for kind, t in [*counter.by_kind.items(), ("total", counter.total())]:
            lines.append(
                f"{name:>20} {kind:>10} {t.calls:>7} {t.flops / 1e9:>9.1f} {t.bytes / 1e9:>8.2f} "
                f"{t.floor_s * 1e3:>9.2f}"
            )
    return "\n".join(lines)


def top_ops(counter: OpCounter, n: int) -> str:
    """The ``n`` ops with the largest summed floor."""
    ranked = sorted(counter.by_op.items(), key=lambda kv: -kv[1].floor_s)[:n]
    return "\n".join(
        f"{t.floor_s * 1e3:>9.2f} ms {t.calls:>6}x {t.bytes / 1e9:>8.2f} GB {t.flops / 1e9:>9.1f} GFLOP  {op}"
        for op, t in ranked
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="ViT-B-16", help="CLIP preset (default ViT-B-16)")
    parser.add_argument("--batch", type=int, default=64, help="samples per task (default 64)")
    parser.add_argument("--workload", default="all4", choices=[*TASKS, "all4"], help="one task or all4")
    parser.add_argument(
        "--configs",
        default="faithful,plain,plain+quick_gelu,plain_frozen,fast",
        help="comma-separated bench_train_step names, each optionally with extras after +: "
        + ", ".join(EXTRAS),
    )
    parser.add_argument("--tflops", type=float, default=MATRIX_TFLOPS, help="matrix peak, TFLOP/s")
    parser.add_argument("--tbps", type=float, default=COPY_TBPS, help="copy bandwidth, TB/s")
    parser.add_argument("--top", type=int, default=12, help="ops listed per configuration by floor")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if refused := [reason for c in names if (reason := known_config(c))]:
        known = f"{list(CONFIGS)}, each optionally with +{' or +'.join(EXTRAS)}"
        parser.error(f"--configs: {'; '.join(refused)} (known: {known})")
    rows = {n: count_step(n, args.preset, args.batch, args.workload, args.tflops, args.tbps) for n in names}
    print(f"{args.preset}, batch {args.batch}, {args.workload}: {args.tflops:g} TFLOP/s, {args.tbps:g} TB/s")
    print(table(rows))
    for name, counter in rows.items():
        print(f"\n{name}: the {args.top} ops with the largest floor")
        print(top_ops(counter, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
