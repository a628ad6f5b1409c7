"""Training recipes as YAML files (installed as ``famevil_fast.configs``); ``resolve`` finds one by path or
by name."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def available() -> list[str]:
    return sorted(
        p.name[: -len(".yaml")] for p in resources.files(__name__).iterdir() if p.name.endswith(".yaml")
    )


def resolve(name_or_path: str) -> Path:
    """A config file: an existing path, or the name of a packaged recipe (with or without .yaml)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = name_or_path[: -len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    packaged = resources.files(__name__) / f"{stem}.yaml"
    if packaged.is_file():
        return Path(str(packaged))
    raise FileNotFoundError(
        f"config {name_or_path!r} is neither a file nor a packaged recipe ({', '.join(available())})"
    )
