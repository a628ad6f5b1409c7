"""What a wheel holds: every folder of Python modules in the package is a package that setuptools finds, so
an installed famevil_fast has all of them (not only a checkout, where folders import as namespaces)."""

from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def test_every_module_folder_is_a_package_the_wheel_includes():
    found = set(find_packages(str(ROOT), include=["famevil_fast", "famevil_fast.*"]))
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "famevil_fast").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert folders - found == set()
    assert (ROOT / "kernels" / "__init__.py").is_file()  # installed as famevil_fast.kernels


def _setup_module():
    """setup.py's helpers, without running the build (it builds only when run as a script)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("famevil_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_compiler(tmp_path: Path, refused: tuple[str, ...]) -> Path:
    """A C++ compiler that refuses the options ``refused`` (as Apple's clang refuses -fopenmp) and builds
    anything else with the real one."""
    script = tmp_path / "clang++"
    tests = " || ".join(f'[ "$a" = "{flag}" ]' for flag in refused)
    script.write_text(
        "#!/bin/sh\n"
        f'for a in "$@"; do if {tests}; then echo "unsupported option $a" >&2; exit 1; fi; done\n'
        'exec c++ "$@"\n'
    )
    script.chmod(0o755)
    return script


def test_the_extension_uses_openmp_only_where_the_compiler_builds_it(tmp_path, monkeypatch, capsys):
    import shutil

    import pytest

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    setup = _setup_module()
    monkeypatch.setenv("CXX", "c++")
    if setup.compiler_builds_openmp("c++"):  # GCC, LLVM's clang: threads
        assert setup.cpu_flags() == (["-O3", "-fopenmp", "-fno-trapping-math"], ["-fopenmp"])
    if not setup.compiler_builds_openmp("c++", "-fopenmp-simd", setup.SIMD_PROBE):
        pytest.skip("this compiler takes neither -fopenmp nor -fopenmp-simd")
    assert not setup.compiler_builds_openmp(str(tmp_path / "missing-c++"))
    no_runtime = _fake_compiler(tmp_path, ("-fopenmp",))
    assert not setup.compiler_builds_openmp(str(no_runtime))
    monkeypatch.setenv("CXX", str(no_runtime))  # the pragmas without threads: vectorised, one thread
    assert setup.cpu_flags() == (["-O3", "-fopenmp-simd", "-fno-trapping-math"], [])
    assert "the CPU kernels will not use OpenMP threads" in capsys.readouterr().out
    (tmp_path / "none").mkdir()
    monkeypatch.setenv("CXX", str(_fake_compiler(tmp_path / "none", ("-fopenmp", "-fopenmp-simd"))))
    assert setup.cpu_flags() == (["-O3", "-fno-trapping-math"], [])


def test_info_says_whether_the_cpu_kernels_are_threaded(capsys):
    from famevil_fast import _ext
    from famevil_fast.cli.main import main

    assert main(["info"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "CPU kernels threaded" in line)
    threaded = _ext.cpu_ext_threaded()
    if not _ext.cpu_ext_available():
        assert threaded is None and "no extension" in row
    elif threaded is None:  # an extension built before it reported this
        assert "unknown" in row
    else:
        assert ("yes (" in row) == threaded and ("no (" in row) == (not threaded)


def test_linux_only_dependencies_are_marked_so_other_systems_install_the_extras():
    """Triton and DALI have Linux wheels only: without a marker, `pip install ".[triton]"` fails on macOS."""
    import pytest
    from packaging.requirements import Requirement

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    linux_only = [
        Requirement(r)
        for group in extras.values()
        for r in group
        if Requirement(r).name in ("triton", "nvidia-dali-cuda130")
    ]
    assert len(linux_only) == 3  # triton, dali, dev's dali
    for requirement in linux_only:
        assert requirement.marker is not None
        assert requirement.marker.evaluate({"platform_system": "Linux"})
        assert not requirement.marker.evaluate({"platform_system": "Darwin"})
        assert not requirement.marker.evaluate({"platform_system": "Windows"})
