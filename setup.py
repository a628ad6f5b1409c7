"""Build script for famevil_fast and its compiled extension ``famevil_fast._C``.

The CPU sources in ``csrc/`` are always compiled. The CUDA sources (``csrc/**/*.cu``) are compiled when
the installed torch is a CUDA build and a CUDA toolkit is found, for sm_80 and sm_90 unless
``TORCH_CUDA_ARCH_LIST`` says otherwise. ``FAMEVIL_FAST_CUDA=0`` forces the CUDA part off and
``FAMEVIL_FAST_CUDA=1`` makes a missing toolkit an error.

Four things are handled here so that a plain ``pip install --no-build-isolation .`` works on a machine
without a GPU: ``CUDA_HOME`` is found even when ``nvcc`` on PATH is a wrapper script, the CUDA headers and
libraries that pip installs with torch (``site-packages/nvidia/*/include``) are added, a default arch
list is set because arch detection needs a GPU, and OpenMP (which spreads ``at::parallel_for`` over the
cores) is used only where the C++ compiler supports it: Apple's clang does not, and the CPU kernels are then
built to run on one thread (``famevil-fast info`` says which), vectorised through ``-fopenmp-simd`` where
the compiler takes it.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0"


def _toolkit_root_candidates() -> list[Path]:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
        candidates.extend(_exec_targets(real))
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    return [Path(c) for c in candidates if c]


def _exec_targets(script: Path) -> list[str]:
    """Toolkit roots named by an `exec /path/bin/nvcc` line in an nvcc wrapper script."""
    try:
        text = script.read_text(errors="ignore")[:4096]
    except OSError:
        return []
    roots = []
    for token in text.split():
        if token.endswith("/bin/nvcc"):
            roots.append(str(Path(token).parent.parent))
    return roots


def find_cuda_home() -> Path | None:
    """The first toolkit root holding both a real nvcc and cuda_runtime.h."""
    for root in _toolkit_root_candidates():
        if (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file():
            return root
    return None


def pip_cuda_dirs() -> tuple[list[str], list[str]]:
    """Include and library folders of the CUDA packages pip installed beside torch (nvidia/*)."""
    includes, libs = [], []
    for site in sys.path:
        base = Path(site) / "nvidia"
        if not base.is_dir():
            continue
        for inc in sorted(base.glob("*/include")):
            includes.append(str(inc))
        for lib in sorted(base.glob("*/lib")):
            libs.append(str(lib))
    return includes, libs


def want_cuda(torch_cuda_version: str | None) -> bool:
    flag = os.environ.get("FAMEVIL_FAST_CUDA", "").strip()
    if flag == "0":
        return False
    cuda_home = find_cuda_home()
    possible = torch_cuda_version is not None and cuda_home is not None
    if flag == "1" and not possible:
        reason = "torch is a CPU-only build" if torch_cuda_version is None else "no CUDA toolkit (nvcc) found"
        raise SystemExit(f"FAMEVIL_FAST_CUDA=1 but the CUDA extension cannot be built: {reason}")
    if possible:
        os.environ["CUDA_HOME"] = str(cuda_home)
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    return possible


def nvcc_version(cuda_home: str) -> str:
    out = subprocess.run(
        [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True
    )
    return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else "unknown"


OPENMP_PROBE = """#include <omp.h>
int main() { int n = 0;
#pragma omp parallel reduction(+ : n)
  n += 1;
  return n > 0 && omp_get_max_threads() > 0 ? 0 : 1; }
"""


SIMD_PROBE = """int main() { float x[8] = {0}; float s = 0;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < 8; ++i) s += x[i];
  return s == 0 ? 0 : 1; }
"""


def compiler_builds_openmp(compiler: str, flag: str = "-fopenmp", probe: str = OPENMP_PROBE) -> bool:
    """Whether ``compiler`` (the command torch's build runs: ``CXX``, default ``c++``) compiles and links
    the ``probe`` program with ``flag``."""
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cpp"
        source.write_text(probe)
        command = [*shlex.split(compiler), flag, str(source), "-o", str(Path(tmp) / "probe")]
        try:
            return subprocess.run(command, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def cpu_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags of the C++ sources. ``-fno-trapping-math`` lets GCC vectorise the branch-free
    selects of the CPU kernels (NaN and inf still propagate); ``-fopenmp`` where the compiler has it."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    compiler = os.environ.get("CXX", "c++")
    if compiler_builds_openmp(compiler):
        return ["-O3", "-fopenmp", "-fno-trapping-math"], ["-fopenmp"]
    print(
        f"famevil_fast: {compiler!r} cannot build OpenMP code (-fopenmp, as Apple's clang): the CPU kernels "
        "will not use OpenMP threads (one thread where torch's parallel backend is OpenMP, as in its wheels)"
    )
    # the kernels' `omp simd` loops still vectorise where the compiler takes the pragmas without the runtime
    simd = ["-fopenmp-simd"] if compiler_builds_openmp(compiler, "-fopenmp-simd", SIMD_PROBE) else []
    return ["-O3", *simd, "-fno-trapping-math"], []


def extension_modules():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised only by a wrong install command
        raise SystemExit(
            "famevil_fast compiles its extension against the installed torch. Install torch first, then "
            "build without isolation: pip install --no-build-isolation ."
        ) from exc

    with_cuda = want_cuda(torch.version.cuda)
    # cpp_extension reads CUDA_HOME when it is imported, so import it only after want_cuda().
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp") if "tests" not in p.parts
    )
    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
    # torch chooses the C++ standard (C++20 for torch >= 2.10)
    cxx_flags, link_flags = cpu_flags()
    define_macros = []
    include_dirs = [str(ROOT / "csrc")]
    if with_cuda:
        includes, libs = pip_cuda_dirs()
        define_macros.append(("FAMEVIL_FAST_WITH_CUDA", "1"))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        print(
            f"famevil_fast: building CUDA sources with {nvcc_version(os.environ['CUDA_HOME'])} "
            f"for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
        )
        ext = CUDAExtension(
            "famevil_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs + includes,
            library_dirs=libs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        print(
            "famevil_fast: building the CPU sources only (no CUDA toolkit, CPU torch, or FAMEVIL_FAST_CUDA=0)"
        )
        ext = CppExtension(
            "famevil_fast._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # as pip and setuptools run it; tests import the helpers above
    ext_modules, cmdclass = extension_modules()
    setup(
        packages=find_packages(include=["famevil_fast", "famevil_fast.*"])
        + ["famevil_fast.kernels", "famevil_fast.configs"],
        package_dir={"famevil_fast.kernels": "kernels", "famevil_fast.configs": "configs"},
        package_data={"famevil_fast": ["py.typed", "_C.pyi"], "famevil_fast.configs": ["*.yaml"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
