"""Every public function and public method of a public class in famevil_fast/ and kernels/ is annotated."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("famevil_fast", "kernels")
IMPLICIT_ARGS = ("self", "cls", "ctx")


def _exempt(fn: ast.FunctionDef) -> bool:
    """Triton kernels and fake (meta) implementations of custom ops."""
    for decorator in fn.decorator_list:
        name = ast.unparse(decorator.func if isinstance(decorator, ast.Call) else decorator)
        if "jit" in name or "register_fake" in name:
            return True
    return False


def _public_functions(tree: ast.Module) -> list[ast.FunctionDef]:
    functions = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions.append(node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            if any("autograd.Function" in ast.unparse(base) for base in node.bases):
                continue
            functions += [n for n in node.body if isinstance(n, ast.FunctionDef)]
    return [f for f in functions if not f.name.startswith("_") and not _exempt(f)]


def _missing_annotations(fn: ast.FunctionDef) -> list[str]:
    args = [a for a in fn.args.args + fn.args.kwonlyargs if a.arg not in IMPLICIT_ARGS]
    args += [a for a in (fn.args.vararg, fn.args.kwarg) if a is not None]
    missing = [a.arg for a in args if a.annotation is None]
    if fn.returns is None:
        missing.append("return")
    return missing


def test_public_functions_are_annotated():
    unannotated = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for fn in _public_functions(ast.parse(path.read_text())):
                missing = _missing_annotations(fn)
                if missing:
                    unannotated.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} {missing}")
    assert unannotated == [], "public functions missing type hints:\n" + "\n".join(unannotated)
