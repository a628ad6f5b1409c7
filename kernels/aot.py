"""Ahead-of-time compilation of every kernel for NVIDIA targets, without a GPU.

``variants()`` lists each kernel with the launch configurations the launchers use (tiles from
``configs`` for a representative shape); ``compile_variant`` builds one with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, which runs Triton's whole
code generation down to PTX and a cubin; the summary of each gives its shared memory, and its registers and
spill stack per thread (``resource_usage``). Needs the real compiler, so run it with TRITON_INTERPRET=0:

    TRITON_INTERPRET=0 python -m famevil_fast.kernels.aot --arch 90 --arch 80
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from famevil_fast.kernels import configs
from famevil_fast.kernels.activation import QUICK_GELU_ALPHA, quick_gelu_bwd_kernel, quick_gelu_fwd_kernel
from famevil_fast.kernels.adapter_backward import adapter_bwd_dx_weights_kernel, adapter_dp_kernel
from famevil_fast.kernels.adapter_forward import (
    adapter_fwd_columns_kernel,
    adapter_fwd_fused_kernel,
    adapter_up_residual_kernel,
    scaled_down_weights_kernel,
)
from famevil_fast.kernels.contrastive import (
    combine_lse_kernel,
    contrastive_lse_grad_kernel,
    contrastive_lse_kernel,
    row_dots_kernel,
)
from famevil_fast.kernels.decode_attention import decode_cross_attention_kernel, decode_self_attention_kernel
from famevil_fast.kernels.decode_greedy import greedy_pick_kernel
from famevil_fast.kernels.ln_linear import (
    ACTIVATIONS,
    ln_linear_dx_kernel,
    ln_linear_fwd_kernel,
    ln_linear_row_constants_kernel,
)
from famevil_fast.kernels.weight_grads import weight_grad_epilogue_kernel, weight_grad_partials_kernel

FP32_POINTERS = {"mean_ptr", "rstd_ptr", "v1_ptr", "cb_ptr", "m_part_ptr", "csp_part_ptr", "g_part_ptr"}
FP32_POINTERS |= {"cs_part_ptr", "ds_part_ptr", "v_ptr", "c_ptr"}
FP32_POINTERS |= {"scale_ptr", "lse_ptr", "col_part_ptr", "lse_x_ptr", "g_x_ptr", "lse_y_ptr", "g_y_ptr"}
FP32_POINTERS |= {"row_share_ptr", "col_share_ptr", "dots_ptr", "part_ptr", "logits_ptr"}
INT32_POINTERS = {"order_ptr", "counts_ptr", "row_key_ptr", "col_key_ptr", "index_ptr"}
INT64_POINTERS = {"shortlist_ptr", "tokens_ptr"}
BOOL_POINTERS = {"done_ptr"}
FLOAT_SCALARS = {"eps", "smoothing", "row_uniform", "col_uniform", "scale"}
ALIGNED_INTS = {
    "d",
    "r",
    "n_out",
    "k_lin",
    "n_elements",
}  # widths of 768 / 64 / 512 / 2048, element counts of MLP activations: multiples of 16, as at run time
DTYPE_NAMES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}


@dataclass(frozen=True)
class Variant:
    """One kernel with fixed compile-time arguments; ``dtype`` is the activation/parameter element type."""

    name: str
    kernel: triton.JITFunction
    constexprs: dict = field(hash=False)
    num_warps: int
    num_stages: int
    dtype: str
    maxnreg: int | None = None
    has_dot: bool = True

    def attrs(self) -> dict[tuple[int], list]:
        """What Triton's launcher specialises on at run time: 16-byte aligned pointers and widths that are
        multiples of 16 (it is what lets loads vectorise)."""
        aligned = {}
        for i, (name, kind) in enumerate(self.signature().items()):
            if kind.startswith("*") or name in ALIGNED_INTS:
                aligned[(i,)] = [["tt.divisibility", 16]]
        return aligned

    def signature(self) -> dict[str, str]:
        sig = {}
        for name in self.kernel.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name in FP32_POINTERS:
                sig[name] = "*fp32"
            elif name in INT32_POINTERS:
                sig[name] = "*i32"
            elif name in INT64_POINTERS:
                sig[name] = "*i64"
            elif name in BOOL_POINTERS:
                sig[name] = "*i1"
            elif name.endswith("_ptr"):
                sig[name] = f"*{self.dtype}"
            elif name in FLOAT_SCALARS:
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        return sig


def _dot(dtype: str) -> dict:
    """As ``configs.dot_args`` sets them at run time (float32 with TF32 allowed)."""
    return {"DOT": DTYPE_NAMES[dtype], "PRECISION": "tf32" if dtype == "fp32" else "ieee"}


def _launch(t: configs.Tiles) -> dict:
    return {"num_warps": t.num_warps, "num_stages": t.num_stages, "maxnreg": t.maxnreg}


def _fused(dtype: str, mixed: bool, r: int) -> list[Variant]:
    t = configs.adapter_fused_tiles(r, 4 if dtype == "fp32" else 2)
    fwd = {"BLOCK_M": t.block_m, "BLOCK_K": t.block_k, "BLOCK_N": t.block_n, "BLOCK_R": r, "MIXED": mixed}
    fwd |= {"NUM_RES": 3, "SAVE": True, "ONE_PASS": False, **_dot(dtype)}
    u = configs.dp_tiles(r)
    dp = {"BLOCK_M": u.block_m, "BLOCK_R": u.block_n, "BLOCK_N": u.block_k, "MIXED": mixed, "SAVE_H": False}
    dp |= _dot(dtype)
    v = configs.dx_weight_tiles(r)
    bwd = {"BLOCK_M": v.block_m, "BLOCK_D": v.block_n, "BLOCK_R": r, "MIXED": mixed, **_dot(dtype)}
    c = configs.row_constants_tiles()
    return [
        Variant(f"adapter_fwd_fused_r{r}", adapter_fwd_fused_kernel, fwd, **_launch(t), dtype=dtype),
        Variant(  # the one-pass LayerNorm (configs.ADAPTER_ONE_PASS_LN) and its weight preparation
            f"adapter_fwd_fused_r{r}_one_pass",
            adapter_fwd_fused_kernel,
            fwd | {"ONE_PASS": True},
            **_launch(t),
            dtype=dtype,
        ),
        Variant(
            "scaled_down_weights",
            scaled_down_weights_kernel,
            {"BLOCK_R": c.block_m, "BLOCK_K": c.block_k},
            **_launch(c),
            dtype=dtype,
            has_dot=False,
        ),
        Variant(f"adapter_dp_r{r}", adapter_dp_kernel, dp, **_launch(u), dtype=dtype),
        Variant(
            f"adapter_bwd_dx_weights_r{r}", adapter_bwd_dx_weights_kernel, bwd, **_launch(v), dtype=dtype
        ),
        *(_autocast_products(fwd, dp, bwd, (t, u, v), r) if dtype == "fp32" else []),
    ]


def _autocast_products(fwd: dict, dp: dict, bwd: dict, tiles: tuple, r: int) -> list[Variant]:
    """The fused kernels on float32 rows with bf16 products, as a float32 stream under autocast runs them
    (``launch.adapter_output``'s ``product_dtype``)."""
    kernels = (
        (f"adapter_fwd_fused_r{r}_bf16_products", adapter_fwd_fused_kernel, fwd),
        (f"adapter_dp_r{r}_bf16_products", adapter_dp_kernel, dp),
        (f"adapter_bwd_dx_weights_r{r}_bf16_products", adapter_bwd_dx_weights_kernel, bwd),
    )
    return [
        Variant(name, kernel, args | _dot("bf16"), **_launch(t), dtype="fp32")
        for (name, kernel, args), t in zip(kernels, tiles)
    ]


def _ln_linear(dtype: str, mixed: bool, n_out: int, activation: str | None) -> list[Variant]:
    t = configs.ln_linear_tiles(n_out)
    fwd = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "MIXED": mixed}
    fwd["ACT"] = ACTIVATIONS[activation]
    fwd |= {"SAVE_STATS": True, **_dot(dtype)}
    u = configs.dx_tiles(n_out)
    dx = {"BLOCK_M": u.block_m, "BLOCK_N": u.block_n, "BLOCK_K": u.block_k, "MIXED": mixed, **_dot(dtype)}
    dx["SAVE_XHAT"] = not mixed  # one task: the weight-gradient products read the stored xhat
    out = [
        Variant(f"ln_linear_fwd_{n_out}", ln_linear_fwd_kernel, fwd, **_launch(t), dtype=dtype),
        Variant(f"ln_linear_dx_{n_out}", ln_linear_dx_kernel, dx, **_launch(u), dtype=dtype),
    ]
    if mixed:  # the same kernel for rows of one task, which stores xhat
        one_task = dx | {"MIXED": False, "SAVE_XHAT": True}
        name = f"ln_linear_dx_{n_out}_xhat"
        out.append(Variant(name, ln_linear_dx_kernel, one_task, **_launch(u), dtype=dtype))
    return out


def _decoding(dtype: str) -> list[Variant]:
    """The fused decoding step's kernels (one task, no statistics), with the tiles of a step's few rows
    (``configs.has_few_rows``): LN + projection without activation, LN2 + fc1 with QuickGELU and with GELU
    (also with the tiles of many rows), the output projection adding the residual stream, the two adapters
    with their columns spread (cross-attention: no residual; task adapter: fc2 and two residual terms), the
    self-attention over the cache, the cross-attention with its LayerNorm and query projection, and the
    greedy choice with the next input embedding (with and without a caption shortlist)."""
    out = []
    for few in (True, False):
        t = configs.ln_linear_tiles(2048, few)
        fwd = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "MIXED": False}
        fwd |= {"SAVE_STATS": False, **_dot(dtype)}
        acts = (None, "quick_gelu", "gelu") if few else ("quick_gelu",)
        for act in acts:
            name = f"ln_linear_fwd_{act or 'plain'}{'_few_rows' if few else ''}"
            out.append(
                Variant(
                    name, ln_linear_fwd_kernel, fwd | {"ACT": ACTIVATIONS[act]}, **_launch(t), dtype=dtype
                )
            )
    u = configs.up_residual_tiles(True)
    up = {"BLOCK_M": u.block_m, "BLOCK_N": u.block_n, "BLOCK_K": u.block_k, "NUM_RES": 1, "MIXED": False}
    out.append(
        Variant("linear_residual", adapter_up_residual_kernel, up | _dot(dtype), **_launch(u), dtype=dtype)
    )
    a = configs.adapter_columns_tiles(64, True)
    columns = {"BLOCK_M": a.block_m, "BLOCK_K": a.block_k, "BLOCK_N": a.block_n, "BLOCK_R": 64, **_dot(dtype)}
    att = configs.decode_attention_tiles(64)
    out.append(
        Variant(
            "decode_self_attention",
            decode_self_attention_kernel,
            {"BLOCK_T": att.block_m, "BLOCK_D": att.block_n},
            **_launch(att),
            dtype=dtype,
            has_dot=False,
        )
    )
    cross = configs.decode_cross_attention_tiles(64)
    out.append(
        Variant(
            "decode_cross_attention",
            decode_cross_attention_kernel,
            {"BLOCK_K": cross.block_k, "BLOCK_T": cross.block_m, "BLOCK_D": cross.block_n},
            **_launch(cross),
            dtype=dtype,
            has_dot=False,
        )
    )
    pick = configs.greedy_pick_tiles(512)
    for shortlist in (False, True):
        out.append(
            Variant(
                f"greedy_pick{'_shortlist' if shortlist else ''}",
                greedy_pick_kernel,
                {"BLOCK_V": pick.block_m, "BLOCK_W": pick.block_n, "SHORTLIST": shortlist, "EMBED": True},
                **_launch(pick),
                dtype=dtype,
                has_dot=False,
            )
        )
    # the cross-attention adapter (no residual), the task adapter with fc2 and two residual terms, and a
    # training call on few rows (statistics and h saved)
    for res, linear, save in ((0, False, False), (2, True, False), (1, False, True)):
        name = f"adapter_fwd_columns_r64_res{res}{'_linear' if linear else ''}{'_save' if save else ''}"
        flags = {"NUM_RES": res, "LINEAR": linear, "SAVE": save}
        out.append(Variant(name, adapter_fwd_columns_kernel, columns | flags, **_launch(a), dtype=dtype))
    return out


def _row_constants(dtype: str) -> Variant:
    c = configs.row_constants_tiles()
    constants = {"BLOCK_R": c.block_m, "BLOCK_K": c.block_k}
    return Variant(
        "ln_linear_row_constants",
        ln_linear_row_constants_kernel,
        constants,
        **_launch(c),
        dtype=dtype,
        has_dot=False,
    )


def _activation(dtype: str) -> list[Variant]:
    """The QuickGELU kernels (elementwise, no matrix product)."""
    t = configs.elementwise_tiles()
    constants = {"ALPHA": QUICK_GELU_ALPHA, "BLOCK": t.block_m}
    kernels = (("quick_gelu_fwd", quick_gelu_fwd_kernel), ("quick_gelu_bwd", quick_gelu_bwd_kernel))
    return [Variant(name, k, constants, **_launch(t), dtype=dtype, has_dot=False) for name, k in kernels]


def _split_adapter(dtype: str, mixed: bool, r: int) -> list[Variant]:
    t = configs.up_residual_tiles()
    up = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, "NUM_RES": 3, "MIXED": mixed}
    u = configs.dp_tiles(r)
    dp = {"BLOCK_M": u.block_m, "BLOCK_R": u.block_n, "BLOCK_N": u.block_k, "MIXED": mixed}
    dp["SAVE_H"] = False
    out = [
        Variant(
            "adapter_up_residual", adapter_up_residual_kernel, up | _dot(dtype), **_launch(t), dtype=dtype
        ),
        Variant(f"adapter_dp_r{r}", adapter_dp_kernel, dp | _dot(dtype), **_launch(u), dtype=dtype),
    ]
    if dtype != "fp32":  # rows of one task on a GPU: the dp kernel also writes h for the weight GEMM
        low_h = dp | _dot(dtype) | {"MIXED": False, "SAVE_H": True}
        out.append(Variant(f"adapter_dp_r{r}_low_h", adapter_dp_kernel, low_h, **_launch(u), dtype=dtype))
    return out


def _weight_grads(dtype: str, mixed: bool, n_out: int, has_g: bool) -> list[Variant]:
    t = configs.weight_tiles(n_out)
    part = {"BLOCK_M": t.block_m, "BLOCK_D": t.block_n, "BLOCK_R": t.block_k, "HAS_G": has_g, "MIXED": mixed}
    u = configs.epilogue_tiles(n_out)
    epi = {"BLOCK_D": u.block_n, "BLOCK_R": u.block_k, "HAS_G": has_g}
    partials = Variant(
        f"weight_grad_partials_{n_out}",
        weight_grad_partials_kernel,
        part | _dot(dtype),
        **_launch(t),
        dtype=dtype,
    )
    epilogue = Variant(
        f"weight_grad_epilogue_{n_out}",
        weight_grad_epilogue_kernel,
        epi,
        **_launch(u),
        dtype=dtype,
        has_dot=False,
    )
    return [partials, epilogue]


def _contrastive(dtype: str) -> list[Variant]:
    """The log-sum-exp sweep (both forms of its column statistics, and over library-GEMM products), the
    gradient tile (of the log-sum-exps
    alone or of the whole loss; G is stored in the input dtype for bf16 and fp32) and the row dots."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    t, g = configs.contrastive_lse_tiles(torch_dtype), configs.contrastive_grad_tiles(torch_dtype)
    sweep = {"BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": t.block_k, **_dot(dtype), "COLS": True}
    grad = {"BLOCK_M": g.block_m, "BLOCK_N": g.block_n, "BLOCK_K": g.block_k, **_dot(dtype), "HAS_Y": True}
    forms = (("contrastive_lse", False), ("contrastive_lse_shared_cols", True))
    sweeps = [
        Variant(
            name,
            contrastive_lse_kernel,
            {**sweep, "SHARED_COL_SCALE": on, "FROM_LOGITS": False},
            **_launch(t),
            dtype=dtype,
        )
        for name, on in forms
    ]
    lt = configs.contrastive_logits_lse_tiles()
    from_logits = {**sweep, "BLOCK_M": lt.block_m, "BLOCK_N": lt.block_n, "BLOCK_K": lt.block_k}
    from_logits |= {"SHARED_COL_SCALE": False, "FROM_LOGITS": True}
    sweeps.append(
        Variant(
            "contrastive_lse_from_logits",
            contrastive_lse_kernel,
            from_logits,
            **_launch(lt),
            dtype=dtype,
            has_dot=False,
        )
    )
    loss_g = configs.contrastive_loss_grad_tiles(torch_dtype)
    grads = [
        Variant(
            "contrastive_lse_grad",
            contrastive_lse_grad_kernel,
            {**grad, "TARGETS": False},
            **_launch(g),
            dtype=dtype,
        ),
        Variant(
            "contrastive_loss_grad",
            contrastive_lse_grad_kernel,
            {**grad, "TARGETS": True},
            **_launch(loss_g),
            dtype=dtype,
        ),
    ]
    r = configs.row_dots_tiles()
    dots = [
        Variant(
            f"row_dots{'_indexed' if on else ''}",
            row_dots_kernel,
            {"BLOCK_M": r.block_m, "BLOCK_D": r.block_n, "INDEXED": on},
            **_launch(r),
            dtype=dtype,
            has_dot=False,
        )
        for on in (False, True)
    ]
    c = configs.combine_lse_tiles()
    combine = Variant(
        "combine_lse",
        combine_lse_kernel,
        {"BLOCK_P": c.block_m, "BLOCK_N": c.block_n},
        **_launch(c),
        dtype=dtype,
        has_dot=False,
    )
    return [*sweeps, *grads, *dots, combine]


def variants(dtype: str, mixed: bool, full: bool = False) -> list[Variant]:
    """Every kernel as the launchers configure it: the adapter at d = 768 with r = 64 (on chip) and
    r = 512 (split), the key/value projection 768 -> 1536, the fused decoding step's kernels, QuickGELU.
    ``full`` adds the other tile shapes in use (r = 128 on chip, the ReLU-free projection, and for
    task-grouped rows the weight-gradient reduction at r = 512; rows of one task take library GEMMs
    there)."""
    out = (
        _fused(dtype, mixed, 64)
        + _ln_linear(dtype, mixed, 512, activation="relu")
        + _split_adapter(dtype, mixed, 512)
    )
    out += _weight_grads(dtype, mixed, 64, has_g=True) + _contrastive(dtype) + [_row_constants(dtype)]
    out += _decoding(dtype) + _activation(dtype)
    if full:
        out += _fused(dtype, mixed, 128) + _ln_linear(dtype, mixed, 1536, activation=None)
        out += _weight_grads(dtype, mixed, 512, has_g=True) if mixed else []
    return out


def compile_variant(v: Variant, arch: int) -> dict:
    """Compile one variant for sm_<arch>; returns a summary (sizes, wgmma use, seconds)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    start = time.perf_counter()
    src = ASTSource(v.kernel, v.signature(), v.constexprs, v.attrs())
    options = {"num_warps": v.num_warps, "num_stages": v.num_stages}
    if v.maxnreg is not None:
        options["maxnreg"] = v.maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    return {
        "kernel": v.name,
        "dtype": v.dtype,
        "mixed": bool(v.constexprs.get("MIXED", False)),
        "arch": arch,
        "ptx_target": f"sm_{arch}" in ptx,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "wgmma": "wgmma" in ptx,
        "mma": "mma" in ptx,
        "has_dot": v.has_dot,
        # a warpgroup MMA covers 64 rows: smaller row blocks (tiles of few rows) use mma.sync on Hopper too
        "warpgroup_rows": v.constexprs.get("BLOCK_M", 64) >= 64,
        "shared_bytes": compiled.metadata.shared,
        **resource_usage(compiled.asm["cubin"]),
        "seconds": round(time.perf_counter() - start, 3),
    }


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread and spill stack bytes per thread of a cubin's kernel, from cuobjdump
    -res-usage (shipped with Triton's NVIDIA backend); empty when the tool is missing. A kernel at 255
    registers with a stack has spilled; registers also bound how many programs share a multiprocessor."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    found = {key: re.search(rf"{key}:(\d+)", report) for key in ("REG", "STACK")}
    if not all(found.values()):
        return {}
    return {"registers": int(found["REG"].group(1)), "spill_stack_bytes": int(found["STACK"].group(1))}


def plan(archs: list[int], full: bool = False) -> list[tuple[str, bool, bool, int, int]]:
    """Jobs (dtype, mixed, full, variant index, arch): every kernel in fp32 (single task) and in bf16
    (task-grouped rows) for each arch."""
    jobs = []
    for arch in archs:
        for dtype, mixed in (("fp32", False), ("bf16", True)):
            jobs += [(dtype, mixed, full, i, arch) for i in range(len(variants(dtype, mixed, full)))]
    return jobs


def _compile_job(job: tuple[str, bool, bool, int, int]) -> dict:
    dtype, mixed, full, index, arch = job
    return compile_variant(variants(dtype, mixed, full)[index], arch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--full", action="store_true", help="every tile shape in use, not one per kernel")
    args = parser.parse_args(argv)
    if configs.interpreting():
        print("aot: TRITON_INTERPRET=1 replaces the compiler; run with TRITON_INTERPRET=0", file=sys.stderr)
        return 2
    jobs = plan(args.arch or [90], args.full)
    if args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(_compile_job, jobs))
    else:
        results = [_compile_job(job) for job in jobs]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
