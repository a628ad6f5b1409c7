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
