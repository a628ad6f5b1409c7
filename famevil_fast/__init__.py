"""famevil_fast: a fast multi-task vision-language model for fashion (FAME-ViL and relatives).

    import famevil_fast
    model = famevil_fast.FameViL.from_clip("ViT-B-16.pt")
    image_emb = model.encode_image(famevil_fast.load_images(["dress.jpg"], size=224))
    text_emb = model.encode_text(famevil_fast.tokenize(["red silk dress"]))

Heavy submodules load on first use; the compiled extension is tried once at import (see ``_ext``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from famevil_fast import _ext  # noqa: F401  (warns once when the compiled part is missing)

__version__ = "0.1.0"

_LAZY = {
    "FameViL": ("famevil_fast.model.famevil", "FameViL"),
    "FameViLConfig": ("famevil_fast.model.config", "FameViLConfig"),
    "CLIPConfig": ("famevil_fast.model.config", "CLIPConfig"),
    "CLIP": ("famevil_fast.model.clip", "CLIP"),
    "tokenize": ("famevil_fast.text.tokenizer", "tokenize"),
    "decode": ("famevil_fast.text.tokenizer", "decode"),
    "load_images": ("famevil_fast.data.image_files", "load_images"),
}

if TYPE_CHECKING:
    from famevil_fast.data.image_files import load_images
    from famevil_fast.model.clip import CLIP
    from famevil_fast.model.config import CLIPConfig, FameViLConfig
    from famevil_fast.model.famevil import FameViL
    from famevil_fast.text.tokenizer import decode, tokenize


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'famevil_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names with the lazily loaded ones among them (for ``dir()`` and completion)."""
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CLIP",
    "CLIPConfig",
    "FameViL",
    "FameViLConfig",
    "decode",
    "load_images",
    "tokenize",
    "__version__",
]
